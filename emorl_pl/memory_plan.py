"""Peak GPU memory per rank of a GRPO run, piece by piece, from the model's geometry and the run's settings.

Arithmetic on sizes: ``plan(geometry, settings)`` models what the code holds (``AudioLMPolicy``,
``GRPOModule``, ``emorl_pl.grpo``, FSDP2 via ``emorl_pl.strategies``). The constants it shares with that code
(the logits chunk, the CPU lm_head packing thresholds, the default LoRA targets, ``VLLMSettings``' defaults)
are read from the code's own modules, never copied (so this module imports torch). ``PlanSettings``' defaults
describe a plain layout (an unsharded reference copy, units gathered one at a time); ``emorl_pl.plan_cli``
reads the numbers from a model's ``config.json`` and the run's LightningCLI YAML files and sets what the code
does under FSDP2 (the reference sharded like the policy, the rollout gathering every unit). Notation (per rank):

    V vocabulary, D LM hidden, L LM layers, I LM intermediate, kv = kv_heads * head_dim
    B utterances per batch, G samples per utterance, n = B * G rollout rows, m micro-batch rows
    P prompt tokens (audio tokens + chat template text), T = max_new_tokens
    b_p parameter bytes (policy dtype), b_a compute bytes (2 under bf16 autocast or bf16 weights), b_l logits
    N ranks that shard the model (FSDP2's shard degree: every rank, or under HSDP the ranks of one node), 1 otherwise

A step goes through stages (prompt encoding, rollout, no-grad log-prob passes, the policy's forward and
backward per micro-batch, the optimizer step; validation between steps). What is held throughout
("always": parameters, optimizer moments, the reference copy, ...) adds to each stage's own transient
pieces; the peak is the largest stage. Every size is an upper bound for the stage's worst moment: the
longest prompt (``audio_seconds``) and completions that run to ``max_new_tokens``.

Activation sizes per token and layer were counted from what autograd saves (``saved_tensors_hooks``) in
a transformers 5.17 Qwen2 decoder layer (sdpa) on torch 2.11, for each precision and LoRA mode
(``layer_activation_bytes``); a mixture-of-experts layer (Qwen3-Omni) uses the same table with the k routed
experts' width k x I_e for I, plus its router (``_router_bytes``), and was checked against the measured CPU
peak of the real-shape model (tests/test_memory_plan_families.py); everything else is counted from the code
that allocates it.

Building the prompts, the processor pads each clip's waveform to the feature extractor's window (or, Qwen3-Omni,
to the batch's longest clip) and computes its log-mel features on the host (``feature_extraction_bytes``): on the
CPU that is a stage of its own, the largest with Qwen2.5-Omni's 300 s window (164 MiB per clip); on a GPU it is
host RAM (a note). The features themselves are held through the step, on the policy's device.

``rollout_engine="vllm"`` (``emorl_pl.modules.vllm_engine``): a colocated ``vllm.LLM`` samples the rollouts.
It holds its own whole copy of the weights, W = params x b_e (b_e: ``VLLMSettings.dtype``, "auto" = the
config's 16-bit dtype), and reserves R = max(u x GPU memory, W + A) with u = ``gpu_memory_utilization``:
vLLM sizes its KV cache pool as what is left of u x GPU after W and its profiled activations A (estimated by
``engine_activation_bytes``). Without sleep mode R is held throughout; with ``enable_sleep_mode`` the engine
sleeps (``LLM.sleep(level=1)``: weights to host RAM, KV cache freed) outside the rollout and validation, so
R only counts there. The trainer's own decode pieces (its KV cache, the gathered units, sampling logits) are
then not used. ``VLLMSettings``' defaults are that dataclass's own (``vllm_engine_defaults``).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from emorl_pl import kernels
from emorl_pl.modules import fused_decode, vllm_engine
from emorl_pl.modules.policy import LM_PROJECTIONS  # LoraSettings(target_modules=None): these

GiB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
STRATEGIES = ("single", "ddp", "fsdp2")
MEL_FRAMES_PER_SECOND = 100  # Whisper feature extractor: hop 160 at 16 kHz
# Chat template + instruction tokens (Qwen2 BPE) of AudioLMPolicy's prompt with the 4 IEMOCAP labels, not
# counting <|AUDIO|> itself; each further label adds about 2 (", label"). Counted with the real tokenizer.
TEXT_TOKENS = {"ir": 74, "eur": 94, "esr": 178}
TEXT_TOKENS_PER_EXTRA_LABEL = 2
# What a CUDA process holds besides tensors (context, cuBLAS/NCCL workspaces): an allowance, not modelled.
CUDA_RUNTIME_BYTES = 2 * GiB
MARGIN = 0.15  # the plan asks for this much headroom below the GPU's memory
# vLLM's own dtype names (``LLM(dtype=...)``) -> bytes; "auto" resolves to the config's dtype (``engine_dtype``).
VLLM_DTYPES = {"auto": None, "float32": "float32", "float": "float32", "bfloat16": "bfloat16", "float16": "float16",
               "half": "float16"}
# The engine's profile run (its activation peak, ``engine_activation_bytes``): vLLM forwards a batch of
# max_num_batched_tokens tokens (V1 picks 8192 to 16384 by GPU and entry point; the smaller is taken) and samples
# max_num_seqs rows of fp32 logits (default 256). An estimate: CUDA graphs and the encoder cache are not counted.
VLLM_PROFILE_TOKENS = 8192
VLLM_MAX_NUM_SEQS = 256


# ------------------------------------------------------------------------------------------ the engine's code
def vllm_engine_defaults() -> dict[str, Any]:
    """``VLLMSettings``' field defaults, read from ``emorl_pl.modules.vllm_engine`` when called (so a changed
    default changes the plan)."""
    return {f.name: f.default for f in dataclasses.fields(vllm_engine.VLLMSettings)}


def rollout_engines() -> tuple[str, ...]:
    """``vllm_engine.ROLLOUT_ENGINES``."""
    return tuple(vllm_engine.ROLLOUT_ENGINES)


# ------------------------------------------------------------------------------------------ geometry
@functools.cache
def feature_extractor_defaults() -> dict[str, Any]:
    """``WhisperFeatureExtractor.__init__``'s defaults (every family's feature extractor; transformers' own
    code, read when first asked): ``sampling_rate``, ``hop_length``, ``n_fft``, ``chunk_length``."""
    from transformers import WhisperFeatureExtractor

    params = inspect.signature(WhisperFeatureExtractor.__init__).parameters
    return {k: params[k].default for k in ("sampling_rate", "hop_length", "n_fft", "chunk_length")}


def _fe_default(name: str) -> Any:
    return field(default_factory=lambda: feature_extractor_defaults()[name])


@dataclass(frozen=True)
class ModelGeometry:
    """The shapes that set memory: a Qwen2 language model and a Whisper-style audio encoder (Qwen2-Audio, Audio
    Flamingo 3).

    ``projector``: a map from the encoder width to D (with biases): Qwen2-Audio's one linear layer
    (``projector_layers`` 1), Audio Flamingo 3's two (d -> D -> D, ``projector_layers`` 2); False when the
    encoder projects itself.

    Other decoders: ``q_dim`` = heads x head_dim may differ from D (Qwen3); ``attention_bias`` (q, k, v biases:
    Qwen2) and ``qk_norm`` (per-head RMSNorm of q and k: Qwen3). A mixture of experts (Qwen3-Omni-MoE's
    decoder, ``num_experts`` > 0) replaces the MLP by a linear router (E x D, no bias) and E experts of
    ``moe_intermediate_size`` I_e (gate, up, down each): every expert's weights are resident, sharded and (full
    fine-tuning) trained, while each token runs only ``experts_per_token`` k of them, so activations count
    k x I_e where a dense layer counts I. ``tower_params``: when set, the parameters outside the language model
    (audio tower, and the Omni thinkers' vision tower, which is loaded with them), counted by building the model
    on the meta device (``plan_cli.geometry_from_config``) instead of the Whisper-encoder formula.
    ``audio_chunk_tokens``: an encoder that emits that many tokens per 100 mel frames (Qwen3-Omni: 13) instead
    of Whisper's stride-4 (25 per second). ``window_seconds``: the encoder's fixed input window (audio is padded to it).
    ``torch_dtype``: the checkpoint's dtype from config.json (None: not given, transformers' float32).

    The feature extractor (preprocessor_config.json; ``WhisperFeatureExtractor``'s defaults where not given):
    ``feature_window_seconds``, its ``chunk_length``, to which the prompts crop each clip (None: the encoder's
    window; Qwen2.5-Omni's and Qwen3-Omni's is 300 s); ``features_padded_to_window``: whether the processor pads
    every clip's waveform to that whole window (its ``audio_kwargs`` padding "max_length": Qwen2-Audio, Audio
    Flamingo 3, Qwen2.5-Omni) or only to the batch's longest clip (Qwen3-Omni); ``sampling_rate``,
    ``hop_length``, ``n_fft`` of its STFT.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    tie_word_embeddings: bool = False
    audio_d_model: int = 1280
    audio_layers: int = 32
    audio_heads: int = 20
    audio_ffn: int = 5120
    num_mel_bins: int = 128
    max_source_positions: int = 1500
    projector: bool = True
    projector_layers: int = 1
    attention_bias: bool = True
    qk_norm: bool = False
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    tower_params: int | None = None
    audio_chunk_tokens: int | None = None
    name: str = "model"
    torch_dtype: str | None = None  # config.json's dtype of the checkpoint (what vLLM's dtype "auto" follows)
    feature_window_seconds: float | None = None
    features_padded_to_window: bool = True
    sampling_rate: int = _fe_default("sampling_rate")
    hop_length: int = _fe_default("hop_length")
    n_fft: int = _fe_default("n_fft")

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def moe(self) -> bool:
        return self.num_experts > 0

    @property
    def active_intermediate(self) -> int:
        """The MLP width a token's activations go through: I, or k x I_e for a mixture of experts."""
        return self.experts_per_token * self.moe_intermediate_size if self.moe else self.intermediate_size

    @property
    def window_seconds(self) -> float:
        return 2 * self.max_source_positions / MEL_FRAMES_PER_SECOND

    @property
    def feature_seconds(self) -> float:
        """The feature extractor's window: each clip is cropped to it (and, padded to the window, padded to it)."""
        return self.feature_window_seconds if self.feature_window_seconds is not None else self.window_seconds


def attention_params(g: ModelGeometry) -> int:
    """q (D x q_dim), k and v (D x kv each), o (q_dim x D, no bias), with q/k/v biases when ``attention_bias``
    and q/k RMSNorm weights (head_dim each) when ``qk_norm``."""
    d, q, kv = g.hidden_size, g.q_dim, g.kv_dim
    bias = (q + 2 * kv) if g.attention_bias else 0
    return d * q + 2 * d * kv + q * d + bias + (2 * g.head_dim if g.qk_norm else 0)


def mlp_params(g: ModelGeometry) -> int:
    """Dense: gate and up (D x I each), down (I x D). Mixture of experts: the router (E x D) and E experts'
    gate, up and down (D x I_e each): all resident, whatever the tokens pick."""
    d = g.hidden_size
    if g.moe:
        return g.num_experts * d + g.num_experts * 3 * d * g.moe_intermediate_size
    return 3 * d * g.intermediate_size


def lm_layer_params(g: ModelGeometry) -> int:
    """One decoder layer: attention + MLP (or router + experts) + two RMSNorm weights (D each). Qwen2: q
    (D x D + D), k and v (D x kv + kv each), o (D x D), gate/up/down (3 x D x I)."""
    return attention_params(g) + mlp_params(g) + 2 * g.hidden_size


def _max_shard_bytes() -> int:
    """``weight_sync.write_hub_shards``' shard size (its default), read from the code."""
    import inspect

    from emorl_pl.modules.weight_sync import write_hub_shards

    return int(inspect.signature(write_hub_shards).parameters["max_shard_bytes"].default)


def largest_weight(g: ModelGeometry) -> int:
    """Elements of the largest single weight tensor: the embedding (V x D), a dense gate/up/down (D x I), or a
    mixture of experts' fused gate-up of all experts (E x 2 I_e x D, transformers' grouped experts)."""
    mlp = (g.num_experts * 2 * g.moe_intermediate_size * g.hidden_size if g.moe
           else g.hidden_size * g.intermediate_size)
    return max(embedding_params(g), mlp)


def embedding_params(g: ModelGeometry) -> int:
    return g.vocab_size * g.hidden_size


def lm_params(g: ModelGeometry) -> int:
    """embed (V x D) + L layers + final norm (D) + lm_head (V x D, unless tied to the embedding)."""
    head = 0 if g.tie_word_embeddings else embedding_params(g)
    return embedding_params(g) + g.num_layers * lm_layer_params(g) + g.hidden_size + head


def audio_layer_params(g: ModelGeometry) -> int:
    """One encoder layer: q, v, o (d x d + d), k (d x d, no bias), fc1 (d x f + f), fc2 (f x d + d), two
    LayerNorms (2d each)."""
    d, f = g.audio_d_model, g.audio_ffn
    return 3 * (d * d + d) + d * d + (d * f + f) + (f * d + d) + 4 * d


def audio_params(g: ModelGeometry) -> int:
    """conv1 (mels x d x 3 + d), conv2 (d x d x 3 + d), positions (S x d), layers, final LayerNorm (2d),
    and the projector to the LM width (d x D + D, and (D x D + D) per further layer); ``tower_params`` when
    given (every parameter outside the language model)."""
    if g.tower_params is not None:
        return g.tower_params
    d, lm = g.audio_d_model, g.hidden_size
    convs = (g.num_mel_bins * d * 3 + d) + (d * d * 3 + d)
    projector = d * lm + lm + (g.projector_layers - 1) * (lm * lm + lm) if g.projector else 0
    return convs + g.max_source_positions * d + g.audio_layers * audio_layer_params(g) + 2 * d + projector


def total_params(g: ModelGeometry) -> int:
    return lm_params(g) + audio_params(g)


def _projection_shapes(g: ModelGeometry, targets: Sequence[str]) -> dict[str, tuple[int, int]]:
    """(in, out) of each LM projection in ``targets``; an error naming any that is not one. A mixture of
    experts has no dense gate/up/down: ``AudioLMPolicy`` excludes the experts from LoRA (``_lora_excludes``),
    so those names adapt nothing."""
    d, kv, q, inter = g.hidden_size, g.kv_dim, g.q_dim, g.intermediate_size
    shapes = {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
              "gate_proj": (d, inter), "up_proj": (d, inter), "down_proj": (inter, d)}
    unknown = sorted(set(targets) - set(shapes))
    if unknown:
        raise ValueError(f"LoRA target_modules {unknown} are not LM projections {sorted(shapes)}")
    mlp = ("gate_proj", "up_proj", "down_proj") if g.moe else ()
    return {t: shapes[t] for t in targets if t not in mlp}


def lora_adapted_targets(g: ModelGeometry, targets: Sequence[str] = LM_PROJECTIONS) -> tuple[str, ...]:
    """The projections of ``targets`` that get adapters (a mixture of experts: the attention's only)."""
    return tuple(_projection_shapes(g, targets))


def lora_params(g: ModelGeometry, rank: int, targets: Sequence[str] = LM_PROJECTIONS) -> int:
    """LoRA on the LM's projections: r x (in + out) per targeted projection per layer (A: r x in, B: out x r)."""
    shapes = _projection_shapes(g, targets)
    return g.num_layers * sum(rank * (i + o) for i, o in shapes.values())


def lora_target_weight_params(g: ModelGeometry, targets: Sequence[str] = LM_PROJECTIONS) -> int:
    """The base weights LoRA adapts: in x out per targeted projection per layer (what a merge rewrites)."""
    return g.num_layers * sum(i * o for i, o in _projection_shapes(g, targets).values())


def audio_tokens(seconds: float, window_seconds: float = 30.0, chunk_tokens: int | None = None) -> int:
    """<|AUDIO|> expands to ((F - 1) // 2 + 1 - 2) // 2 + 1 tokens for F = 100 * seconds mel frames
    (two stride-2 stages, conv2 then pooling), audio cropped to the encoder window: 30 s -> 750, 8 s -> 200.
    ``chunk_tokens`` (Qwen3-Omni: 13): ``chunk_tokens`` per whole 100 frames, and for the rest r frames three
    stride-2 convolutions, (((r - 1) // 2 + 1 - 1) // 2 + 1 - 1) // 2 + 1 (transformers'
    ``_get_feat_extract_output_lengths``): 30 s -> 390."""
    frames = int(round(min(seconds, window_seconds) * MEL_FRAMES_PER_SECOND))
    if frames < 1:
        raise ValueError(f"audio_seconds must be > 0, got {seconds}")
    if chunk_tokens is not None:
        rest = frames % 100
        tail = (((rest - 1) // 2 + 1 - 1) // 2 + 1 - 1) // 2 + 1 if rest else 0
        return tail + frames // 100 * chunk_tokens
    return ((frames - 1) // 2 + 1 - 2) // 2 + 1


def text_tokens(mode: str, num_labels: int = 4) -> int:
    """Prompt tokens besides the audio: system turn, ``Audio 1:`` line, instruction, generation prompt."""
    if mode not in TEXT_TOKENS:
        raise ValueError(f"mode must be one of {sorted(TEXT_TOKENS)}, got {mode!r}")
    return TEXT_TOKENS[mode] + TEXT_TOKENS_PER_EXTRA_LABEL * max(num_labels - 4, 0)


def feature_samples(g: ModelGeometry, audio_seconds: float | None = None) -> int:
    """N, the samples of each clip's padded waveform in the feature extractor: the whole window when the
    processor pads to it, else the batch's longest clip (``audio_seconds``; None: the window), cropped to it."""
    window = int(round(g.feature_seconds * g.sampling_rate))
    if g.features_padded_to_window or audio_seconds is None:
        return window
    return min(window, int(round(audio_seconds * g.sampling_rate)))


def feature_frames(g: ModelGeometry, audio_seconds: float | None = None) -> int:
    """F = N // hop mel frames per clip (the STFT's N // hop + 1 frames less the last)."""
    return feature_samples(g, audio_seconds) // g.hop_length


def feature_extraction_bytes(g: ModelGeometry, audio_seconds: float | None = None) -> tuple[int, int]:
    """(peak, kept) host bytes per clip of the prompts' feature extraction (``prompting.build_prompts`` ->
    the processor -> ``WhisperFeatureExtractor.__call__`` and ``_torch_extract_fbank_features``, transformers
    5.17, on the CPU whatever the training device), for N samples, F frames, K = n_fft // 2 + 1 frequencies,
    M mels:

    - padding: the waveform (fp32) and its per-sample attention mask (int32), 4 N each;
    - the STFT: the centre-padded waveform 4 (N + n_fft), its windowed frames 4 n_fft (F + 1) and the complex
      spectrum 8 K (F + 1); after it, the spectrum (kept until the function returns), the power spectrum 4 K F,
      the mel spectrogram 4 M F and the log-mel with its two rescaled copies, 3 x 4 M F;

    the peak is the larger of those two moments (the second at 300 s: 164 MiB per clip). Kept afterwards: the
    features (4 M F) and the per-sample mask (4 N), which the returned per-frame mask is a strided view of.
    Measured with the real processors (tests/test_memory_plan_families.py)."""
    n, f = feature_samples(g, audio_seconds), feature_frames(g, audio_seconds)
    k, m = g.n_fft // 2 + 1, g.num_mel_bins
    padded = 4 * n + 4 * n
    stft = 4 * (n + g.n_fft) + 4 * g.n_fft * (f + 1) + 8 * k * (f + 1)
    after = 8 * k * (f + 1) + 4 * k * f + 4 * 4 * m * f
    return padded + max(stft, after), 4 * m * f + 4 * n


# ------------------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class PlanSettings:
    """One rank's view of a run. ``lora_rank`` None = full fine-tuning of the language model.

    ``device`` "cuda" adds the runtime allowance and AdamW's foreach temporaries; "cpu" (to compare with
    a CPU measurement) uses AdamW's per-tensor loop.

    FSDP2Strategy options: ``fsdp_param_dtype``, its mixed-precision policy (weights gathered and computed
    in that dtype, sharded masters and moments stay in the policy dtype); ``fsdp_sync`` "per_step" keeps
    gradients unsharded between the backward passes of one optimizer step; ``shard_degree`` (None: every
    rank), the ranks that shard each parameter: under HSDP (``num_nodes`` > 1) those of one node, each node
    holding a whole sharded copy (``strategies.mesh_shape``).
    What the code does under FSDP2 (``emorl_pl.plan_cli`` sets it): ``reference_sharded`` (full fine-tuning:
    ``AudioLMPolicy`` builds the reference from ``model_dir`` after the policy is sharded, sharded like it,
    in the compute dtype, each rank reading only its rows of each tensor: ``modules/reference.py``,
    ``modules/loading.py``; ``reference_dtype`` is a what-if over that dtype), ``rollout_gathered`` (the whole
    model gathered for the rollout, the "hybrid engine") and ``sharded_loading`` (the policy built on the
    meta device, each rank reading only its shards; only changes the host-RAM note). Without FSDP2 (and by
    these fields' defaults) the reference is ``frozen_copy``, a deep copy of the loaded model in the policy
    dtype, unsharded on every rank.

    ``rollout_engine`` "vllm": a colocated vLLM engine samples the rollouts (``AudioLMPolicy(rollout_engine=...,
    vllm=VLLMSettings(...))``); ``vllm_*`` are its ``VLLMSettings`` (None: that dataclass's default, read from
    ``emorl_pl.modules.vllm_engine``). ``gpu_memory_gib``: the GPU's memory, of which the engine reserves the
    fraction ``vllm_gpu_memory_utilization`` (needed with the engine only).

    ``audio_seconds``: the longest clip, for a processor that pads a batch's features to its longest clip
    (Qwen3-Omni); None: the feature extractor's whole window.
    """

    batch_size: int
    group_size: int
    prompt_tokens: int
    max_new_tokens: int
    micro_batch_size: int
    lora_rank: int | None = None
    lora_targets: tuple[str, ...] = LM_PROJECTIONS
    lora_dropout: float = 0.0
    policy_dtype: str = "float32"
    precision: str = "32-true"
    strategy: str = "single"
    num_gpus: int = 1
    shard_degree: int | None = None
    num_nodes: int = 1
    gradient_checkpointing: bool = False
    beta: float = 0.04
    num_iterations: int = 1
    accumulate_grad_batches: int = 1
    freeze_audio_tower: bool = True
    fused_decode: str = "adapters"
    eval_batch_size: int = 0
    eval_max_new_tokens: int | None = None
    device: str = "cuda"
    fsdp_param_dtype: str | None = None
    fsdp_sync: str = "per_backward"
    reference_sharded: bool = False
    reference_dtype: str | None = None
    sharded_loading: bool = False
    rollout_gathered: bool = False
    rollout_engine: str = "fused"
    vllm_gpu_memory_utilization: float | None = None
    vllm_sleep: bool | None = None
    vllm_dtype: str | None = None
    vllm_max_model_len: int | None = None
    gpu_memory_gib: float | None = None
    audio_seconds: float | None = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "group_size", "prompt_tokens", "max_new_tokens", "micro_batch_size",
                     "num_gpus", "num_nodes", "num_iterations", "accumulate_grad_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.shard_degree is not None and not (1 <= self.shard_degree <= self.num_gpus
                                                  and self.num_gpus % self.shard_degree == 0):
            raise ValueError(f"shard_degree must divide num_gpus {self.num_gpus}, got {self.shard_degree}")
        for name in ("policy_dtype", "reference_dtype", "fsdp_param_dtype"):
            value = getattr(self, name)
            if value is not None and value not in DTYPE_BYTES:
                raise ValueError(f"{name} must be one of {sorted(DTYPE_BYTES)}, got {value!r}")
        if self.fsdp_sync not in ("per_step", "per_backward"):
            raise ValueError(f"fsdp_sync must be per_step or per_backward, got {self.fsdp_sync!r}")
        if self.audio_seconds is not None and not self.audio_seconds > 0:
            raise ValueError(f"audio_seconds must be > 0 or None (the feature window), got {self.audio_seconds}")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1 or None (full fine-tuning), got {self.lora_rank}")
        if self.rollout_engine not in rollout_engines():
            raise ValueError(f"rollout_engine must be one of {rollout_engines()}, got {self.rollout_engine!r}")
        if self.vllm:
            if self.device != "cuda":
                raise ValueError("the vLLM engine is modelled on GPU only (device='cuda')")
            if self.gpu_memory_gib is None or not self.gpu_memory_gib > 0:
                raise ValueError("rollout_engine='vllm' reserves a fraction of the GPU's memory: set gpu_memory_gib")
            if not 0 < self.engine_settings["gpu_memory_utilization"] <= 1:
                raise ValueError(f"vllm gpu_memory_utilization must be in (0, 1], got "
                                 f"{self.engine_settings['gpu_memory_utilization']!r}")
            if self.engine_settings["dtype"] not in VLLM_DTYPES:
                raise ValueError(f"vllm dtype must be one of {sorted(VLLM_DTYPES)}, got {self.engine_settings['dtype']!r}")
            if self.engine_settings["max_model_len"] < 1:
                raise ValueError(f"vllm max_model_len must be >= 1, got {self.engine_settings['max_model_len']}")

    # ----------------------------------------------------------------- derived quantities
    @property
    def lora(self) -> bool:
        return self.lora_rank is not None

    @property
    def vllm(self) -> bool:
        return self.rollout_engine == "vllm"

    @property
    def engine_settings(self) -> dict[str, Any]:
        """The engine's ``VLLMSettings``: the ``vllm_*`` fields given, the dataclass's defaults for the rest."""
        given = {"gpu_memory_utilization": self.vllm_gpu_memory_utilization, "enable_sleep_mode": self.vllm_sleep,
                 "dtype": self.vllm_dtype, "max_model_len": self.vllm_max_model_len}
        return {**vllm_engine_defaults(), **{k: v for k, v in given.items() if v is not None}}

    @property
    def engine_sleeps(self) -> bool:
        return self.vllm and bool(self.engine_settings["enable_sleep_mode"])

    @property
    def shards(self) -> int:
        """Ranks that share each parameter: FSDP2's shard degree (all ranks, or one node's under HSDP)."""
        if self.strategy != "fsdp2":
            return 1
        return self.shard_degree or self.num_gpus

    @property
    def param_bytes(self) -> int:
        """Parameter bytes: the policy dtype, or 2 under a "-true" 16-bit precision (Lightning converts)."""
        if self.precision.endswith("-true") and self.precision.startswith(("bf16", "16")):
            return 2
        return DTYPE_BYTES[self.policy_dtype]

    @property
    def trainable_bytes(self) -> int:
        """Bytes of a trainable parameter (and of its gradient and AdamW moments): peft keeps LoRA adapters in
        fp32 next to 16-bit base weights (``autocast_adapter_dtype``); full fine-tuning trains the weights."""
        return 4 if self.lora else self.param_bytes

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weights the computation sees: FSDP2's ``param_dtype`` when set, else the parameters'."""
        if self.strategy == "fsdp2" and self.fsdp_param_dtype:
            return DTYPE_BYTES[self.fsdp_param_dtype]
        return self.param_bytes

    @property
    def autocast(self) -> bool:
        """bf16/fp16 autocast over fp32 weights (Lightning's "-mixed" precisions)."""
        return self.precision.endswith("-mixed") and self.weight_bytes == 4

    @property
    def act_bytes(self) -> int:
        """Bytes of matmul outputs (activations, KV cache, logits): 2 under autocast or 16-bit weights."""
        return 2 if self.autocast or self.weight_bytes == 2 else 4

    @property
    def rows(self) -> int:
        return self.batch_size * self.group_size

    @property
    def micro_rows(self) -> int:
        return min(self.micro_batch_size, self.rows)

    @property
    def micro_batches_per_step(self) -> int:
        """Backward passes that add into the same gradients before an optimizer step."""
        return self.accumulate_grad_batches * math.ceil(self.rows / self.micro_rows)

    @property
    def shared_prompt(self) -> bool:
        """``completion_logps`` in grad mode runs each prompt once and indexes its keys/values out to the
        rows (``scoring.shared_prompt_hidden``) unless the model is FSDP2-sharded (then: full sequences)."""
        return self.strategy != "fsdp2"

    @property
    def reference_bytes(self) -> int:
        """The reference copy's dtype: given (a what-if), else the compute dtype when sharded, else the policy's."""
        if self.reference_dtype:
            return DTYPE_BYTES[self.reference_dtype]
        return self.weight_bytes if self.reference_sharded else self.param_bytes


# ------------------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class Piece:
    name: str
    bytes: float
    detail: str = ""

    @property
    def gib(self) -> float:
        return self.bytes / GiB


@dataclass(frozen=True)
class Stage:
    """A moment of the step: its transient pieces, on top of the pieces held throughout."""

    name: str
    pieces: tuple[Piece, ...]

    @property
    def bytes(self) -> float:
        return sum(p.bytes for p in self.pieces)


@dataclass(frozen=True)
class Plan:
    geometry: ModelGeometry
    settings: PlanSettings
    always: tuple[Piece, ...]
    stages: tuple[Stage, ...]
    notes: tuple[str, ...] = field(default=())

    @property
    def always_bytes(self) -> float:
        return sum(p.bytes for p in self.always)

    @property
    def peak_stage(self) -> Stage:
        return max(self.stages, key=lambda s: s.bytes)

    @property
    def peak_bytes(self) -> float:
        return self.always_bytes + self.peak_stage.bytes

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GiB

    def stage_total_gib(self, stage: Stage) -> float:
        return (self.always_bytes + stage.bytes) / GiB

    def piece(self, name: str) -> Piece:
        """The piece named ``name`` (held throughout, else in the peak stage, else in any stage)."""
        for p in (*self.always, *self.peak_stage.pieces, *(q for s in self.stages for q in s.pieces)):
            if p.name == name:
                return p
        raise KeyError(name)


def trainable_params(g: ModelGeometry, s: PlanSettings) -> int:
    """LoRA: the adapters; full fine-tuning: the language model, plus the audio tower when not frozen."""
    if s.lora:
        return lora_params(g, s.lora_rank, s.lora_targets)
    return lm_params(g) + (0 if s.freeze_audio_tower else audio_params(g))


def _dtype_name(nbytes: int) -> str:
    return {4: "fp32", 2: "bf16"}[nbytes]


def _shard_note(s: PlanSettings) -> str:
    return f", 1/{s.shards} per rank" if s.shards > 1 else ""


def layer_activation_bytes(g: ModelGeometry, s: PlanSettings, kv_len: int) -> float:
    """Bytes autograd saves per query token in one decoder layer (no checkpointing), input included:

        a_D * D + a_I * I + kv_len * b_mask + (LoRA) targets * r * b_lora

    with (a_D, a_I), counted per precision and LoRA mode:

                          full FT    LoRA, dropout 0   LoRA, dropout > 0
        fp32              40, 16         32, 16             72, 20
        bf16 autocast     34,  8         28,  8             52, 12
        bf16 weights      24,  8         40, 10             64, 14

    (LoRA saves less than full fine-tuning where a frozen weight needs no saved input, e.g. the RMSNorm
    weights; dropout saves a dropped copy of each projection input; peft keeps adapters in fp32 next to
    bf16 weights, whose inputs it upcasts.) ``b_mask * kv_len``: SDPA's attention mask row, one per layer
    (2 bytes under 16-bit compute, else 4).
    """
    table = {
        "fp32": {None: (40, 16), "plain": (32, 16), "dropout": (72, 20)},
        "autocast": {None: (34, 8), "plain": (28, 8), "dropout": (52, 12)},
        "bf16": {None: (24, 8), "plain": (40, 10), "dropout": (64, 14)},
    }
    mode = "autocast" if s.autocast else ("bf16" if s.weight_bytes == 2 else "fp32")
    lora = None if not s.lora else ("dropout" if s.lora_dropout > 0 else "plain")
    a_d, a_i = table[mode][lora]
    adapted = len(lora_adapted_targets(g, s.lora_targets)) if s.lora else 0
    lora_out = adapted * s.lora_rank * (4 if s.weight_bytes == 2 else s.act_bytes) if s.lora else 0
    return (a_d * g.hidden_size + a_i * g.active_intermediate + kv_len * s.act_bytes + lora_out
            + _router_bytes(g, s))


def _router_bytes(g: ModelGeometry, s: PlanSettings) -> float:
    """A mixture of experts also saves, per token and layer, its router logits (E, compute dtype), their fp32
    softmax (E x 4 B), and the k routed copies of the token's hidden state (k x D) with their k weights."""
    if not g.moe:
        return 0
    return g.num_experts * (s.act_bytes + 4) + g.experts_per_token * (g.hidden_size * s.act_bytes + 8)


def _gathered_fraction(s: PlanSettings) -> float:
    """What a gathered weight adds to its local shard: the other ranks' part, or all of it when FSDP2
    gathers in another dtype (``param_dtype``) than the sharded master."""
    return 1.0 if s.weight_bytes != s.param_bytes else 1 - 1 / s.shards


def _fsdp_gathered(g: ModelGeometry, s: PlanSettings) -> Piece | None:
    """FSDP2 all-gathers one unit's full weights while it runs (and prefetches the next in backward):
    the largest unit (embed_tokens or lm_head, V x D) plus one decoder layer, in the compute dtype."""
    if s.shards == 1:
        return None
    largest = max(embedding_params(g), lm_layer_params(g), audio_layer_params(g))
    size = (largest + lm_layer_params(g)) * _gathered_fraction(s) * s.weight_bytes
    return Piece("FSDP2 all-gathered weights", size, "the largest unit (V x D) + one decoder layer")


def _kv_bytes(g: ModelGeometry, rows: int, tokens: int, nbytes: int) -> float:
    """rows x tokens x L x 2 (keys, values) x kv_heads x head_dim x bytes."""
    return rows * tokens * g.num_layers * 2 * g.kv_dim * nbytes


def _encoder_activations(g: ModelGeometry, s: PlanSettings, utterances: int, inputs: bool) -> float:
    """No-grad audio tower on the padded window, per utterance: with ``inputs``, the mel features (mels x F
    in the policy dtype; a training step's are held with the rollout buffers instead), conv1 output (d x 2S),
    then per layer hidden, residual, q/k/v/attention output (S x d each) and the FFN (S x f); SDPA's fused
    kernels (flash / memory-efficient on GPU, flash on CPU, masks included) keep no S x S scores."""
    frames, positions = 2 * g.max_source_positions, g.max_source_positions
    d, b = g.audio_d_model, s.act_bytes
    features = g.num_mel_bins * feature_frames(g, s.audio_seconds) * s.param_bytes if inputs else 0
    return utterances * (features + d * frames * b + positions * (6 * d + g.audio_ffn) * b)


# ------------------------------------------------------------------------------------------ the vLLM engine
def engine_dtype(g: ModelGeometry, s: PlanSettings) -> str:
    """The engine's weight (and KV cache) dtype: ``VLLMSettings.dtype``, or for "auto" the checkpoint's
    16-bit dtype from config.json (vLLM runs a float32 or dtype-less checkpoint in 16 bits under "auto")."""
    name = VLLM_DTYPES[s.engine_settings["dtype"]]
    if name is None:
        name = g.torch_dtype if g.torch_dtype in ("bfloat16", "float16") else "bfloat16"
    return name


def engine_weight_bytes(g: ModelGeometry, s: PlanSettings) -> float:
    """W: the engine's own whole copy of the model, every parameter in its dtype (tensor_parallel_size 1)."""
    return total_params(g) * DTYPE_BYTES[engine_dtype(g, s)]


def engine_activation_bytes(g: ModelGeometry, s: PlanSettings) -> float:
    """A, a small estimate of the activations vLLM profiles before sizing its KV cache: one decoder layer's
    tensors for ``VLLM_PROFILE_TOKENS`` tokens, (4 D + 2 kv + 3 I) x b_e per token (hidden, residual, normed
    input, attention output; q, k, v; gate, up and their product), plus fp32 logits for ``VLLM_MAX_NUM_SEQS``
    rows (V x 4 B each)."""
    b = DTYPE_BYTES[engine_dtype(g, s)]
    per_token = 4 * g.hidden_size + 2 * g.kv_dim + 3 * g.active_intermediate
    return VLLM_PROFILE_TOKENS * per_token * b + VLLM_MAX_NUM_SEQS * g.vocab_size * 4


def engine_kv_bytes_per_token(g: ModelGeometry, s: PlanSettings) -> int:
    """L x 2 (keys, values) x kv x b_e: one token of the engine's KV cache (kv_cache_dtype "auto")."""
    return g.num_layers * 2 * g.kv_dim * DTYPE_BYTES[engine_dtype(g, s)]


def engine_reserved_bytes(g: ModelGeometry, s: PlanSettings) -> float:
    """R = max(u x GPU, W + A): vLLM takes ``gpu_memory_utilization`` of the GPU as a whole (its KV cache pool is
    what remains of it after W and A); a fraction too small for W + A still costs W + A (and leaves no cache)."""
    fraction = s.engine_settings["gpu_memory_utilization"] * s.gpu_memory_gib * GiB
    return max(fraction, engine_weight_bytes(g, s) + engine_activation_bytes(g, s))


def engine_kv_tokens(g: ModelGeometry, s: PlanSettings) -> int:
    """Tokens the engine's KV cache pool holds: (R - W - A) / (L x 2 x kv x b_e)."""
    pool = engine_reserved_bytes(g, s) - engine_weight_bytes(g, s) - engine_activation_bytes(g, s)
    return int(pool // engine_kv_bytes_per_token(g, s))


def engine_min_utilization(g: ModelGeometry, s: PlanSettings) -> float:
    """The smallest ``gpu_memory_utilization`` vLLM starts with: W + A + a KV cache for one ``max_model_len``
    sequence (vLLM refuses a pool smaller than that), over the GPU's memory."""
    need = (engine_weight_bytes(g, s) + engine_activation_bytes(g, s)
            + s.engine_settings["max_model_len"] * engine_kv_bytes_per_token(g, s))
    return need / (s.gpu_memory_gib * GiB)


def _engine_pieces(g: ModelGeometry, s: PlanSettings) -> tuple[Piece, Piece]:
    """The engine's reservation R as two pieces: its weights W, and the rest (KV cache pool + activations)."""
    e, w = s.engine_settings, engine_weight_bytes(g, s)
    dtype = engine_dtype(g, s)
    r = engine_reserved_bytes(g, s)
    return (Piece("vLLM engine: its copy of the weights", w,
                  f"{total_params(g) / 1e9:.2f} B x {DTYPE_BYTES[dtype]} B ({dtype}"
                  + (": dtype auto" if e["dtype"] == "auto" else "") + "), the whole model on every rank"),
            Piece("vLLM engine: KV cache pool + activations", r - w,
                  f"max(gpu_memory_utilization {e['gpu_memory_utilization']:g} x {s.gpu_memory_gib:g} GiB, W + A) - W: "
                  f"~{engine_kv_tokens(g, s)} tokens of KV + {engine_activation_bytes(g, s) / GiB:.2f} GiB activations"))


def _engine_sync(g: ModelGeometry, s: PlanSettings) -> list[Piece]:
    """``AudioLMPolicy.sync_engine_weights`` before a rollout after the weights changed:
    ``weight_sync.iter_merged_weights`` yields one weight at a time and moves it to the CPU. On the device, per
    weight: under FSDP2 the gathered full weight in the compute dtype b_w (cast locally first when b_w is not
    the stored dtype); for an adapted weight, its delta B A x scale in fp32 (n x 4 B), summed in place with the
    base (gathered in the stored dtype under FSDP2; unsharded, the parameter itself), then cast to b_w (no copy
    when b_w is 4). The piece is the largest of these: the largest adapted projection's, or under FSDP2 the
    largest weight's (``largest_weight``)."""
    b_w, b_p, sharded = s.weight_bytes, s.param_bytes, s.shards > 1
    sizes: list[tuple[float, str]] = []
    if s.lora:
        n = max(i * o for i, o in _projection_shapes(g, s.lora_targets).values())
        cast = n * b_w if b_w != 4 else 0
        base = n * b_p if sharded else 0
        sizes.append((n * 4 + cast + base, f"{n / 1e6:.1f} M weights (the largest adapted projection) x (4 fp32 delta"
                      + (f" + {b_w} cast" if cast else "") + (f" + {b_p} gathered base" if base else "") + ") B"))
    if sharded:
        w = largest_weight(g)
        local = w * b_w / s.shards if b_w != b_p else 0
        sizes.append((w * b_w + local, f"the largest weight ({w / 1e6:.0f} M) gathered in {b_w} B"
                      + (" (+ its local cast shard)" if local else "")))
    if not sizes:
        return []
    size, detail = max(sizes)
    return [Piece("engine weight sync: one weight at a time", size, detail + " (weight_sync.iter_merged_weights)")]


def _logits_pieces(g: ModelGeometry, s: PlanSettings, rows: int, grad: bool) -> tuple[Piece, ...]:
    """``completion_logps``'s output projection.

    A plain ``lm_head`` (not FSDP2-sharded) goes through ``kernels.linear_token_logprobs``: c = max(1, C // T)
    (C = ``kernels.LOGITS_CHUNK_TOKENS``)
    rows' (c, T, V) logits at a time, exponentiated in place: z in b_l + its fp32 copy (none when b_l is 4).
    With a gradient and a frozen lm_head (LoRA) the forward also casts the chunk's softmax to b_l for the
    (softmax W) GEMM (none when b_l is 4) and keeps d logp / dh, (rows, T, D) fp32, for backward. When
    lm_head is trained (full fine-tuning) backward recomputes each chunk instead: z, its fp32 copy, the fp32
    softmax-gradient (in place in the fp32 z on CPU, a new tensor elsewhere) and its b_l cast (none when b_l is
    4), and an fp32 (V, D) weight-gradient accumulator.
    An FSDP2 unit runs its own forward: logits (rows, T, V) in b_l, kept for ``_SelectiveLogSoftmax``'s
    backward, which works one row at a time: forward logsumexp makes 2 (T, V) fp32 temporaries (+ 1 upcast
    copy of bf16 logits); backward makes the (rows, T, V) gradient in b_l and, per row, an fp32 softmax
    (+ the upcast copy)."""
    t, v, b = s.max_new_tokens, g.vocab_size, s.act_bytes
    if s.strategy != "fsdp2":
        chunk = min(rows, max(1, kernels.LOGITS_CHUNK_TOKENS // t))
        cells = chunk * t * v
        upcast = 4 if b != 4 else 0  # .float() of fp32 logits is the same tensor
        cast = b if b != 4 else 0
        if not grad:
            return (Piece("logits, a chunk of rows at a time (chunked lm_head)", cells * (b + upcast),
                          f"{chunk} x {t} x {v}: z (and its fp32 copy)"),)
        if s.lora:
            return (Piece("logits per chunk, with the softmax for d logp / dh (chunked lm_head)",
                          cells * (b + upcast + cast), f"{chunk} x {t} x {v}: z, fp32 z (and the softmax's cast)"),
                    Piece("d logp / dh kept for backward", rows * t * g.hidden_size * 4, "rows x T x D fp32"))
        softmax = 0 if s.device == "cpu" else 4  # grpo._softmax_: in place on CPU
        return (Piece("logits recomputed per chunk in backward (chunked lm_head)",
                      cells * (b + upcast + softmax + cast),
                      f"{chunk} x {t} x {v}: z, fp32 z, softmax-gradient (and its cast)"),
                Piece("lm_head weight-gradient accumulator", v * g.hidden_size * 4, "V x D fp32"))
    logits = rows * t * v * b
    upcast = t * v * 4 if b != 4 else 0
    if not grad:
        return (Piece("logits (rows, T, V)", logits, f"{rows} rows x {t} x {v} x {b} B"),
                Piece("log-softmax chunk temporaries", 2 * t * v * 4 + upcast, "per row, fp32"))
    return (Piece("logits (rows, T, V), kept for backward", logits, f"{rows} rows x {t} x {v} x {b} B"),
            Piece("gradient of the logits", logits, "same shape"),
            Piece("log-softmax chunk temporaries", t * v * 4 + 2 * upcast, "per row, fp32"))


def _query_tokens(s: PlanSettings, rows: int, shared: bool) -> tuple[int, int]:
    """(query tokens through the decoder, key length) of one log-prob pass over ``rows`` rows.

    Shared prompt: U = ceil(rows / G) unique prompts of P - 1 tokens once, then T tokens per row;
    full sequences: P + T tokens per row."""
    p, t = s.prompt_tokens, s.max_new_tokens
    if shared:
        unique = min(s.batch_size, math.ceil(rows / s.group_size))
        return unique * (p - 1) + rows * t, p + t
    return rows * (p + t), p + t


def _policy_stages(g: ModelGeometry, s: PlanSettings, gathered: Piece | None) -> list[Stage]:
    """The policy's forward + backward of one micro-batch of m rows, at its two worst moments:

    1. backward starts: every saved activation + logits + their gradient + chunk temporaries;
    2. backward of a decoder layer: saved activations left + the gradients so far (+ with checkpointing,
       that layer's recomputed activations) + a working set of (2 D b_p + 2 I b_a) per token.

    Saved activations: without checkpointing, L x tokens x ``layer_activation_bytes`` (plus, under
    autocast over fp32 weights, the bf16 weight copies each matmul keeps: 2 B per LM layer parameter);
    with checkpointing, each layer keeps only its input, L x tokens x D x b_p. The shared-prompt path
    also keeps the prompt's keys/values indexed to the m rows for every layer (m x (P-1) x L x 2 x kv x b_a),
    and without checkpointing the concatenated [past ; new] keys/values per layer as well.
    Gradients: with one micro-batch per optimizer step they are created during this backward (the
    larger of its two ends: all layers' inputs + lm_head's gradient, or one input + every gradient);
    with more, all exist from the second micro-batch on.
    """
    m = s.micro_rows
    tokens, kv_len = _query_tokens(s, m, s.shared_prompt)
    n_layer = layer_activation_bytes(g, s, kv_len)
    b = s.act_bytes
    saved: list[Piece] = []
    if s.gradient_checkpointing:
        per_layer_saved = tokens * g.hidden_size * s.weight_bytes  # the residual stream: the embedding's dtype
        saved.append(Piece("activations: layer inputs (checkpointing)", g.num_layers * per_layer_saved,
                           f"L x {tokens} tokens x D x {s.weight_bytes} B"))
    else:
        per_layer_saved = tokens * n_layer
        saved.append(Piece("activations: saved for backward", g.num_layers * per_layer_saved,
                           f"L x {tokens} tokens x {n_layer / 1024:.1f} KiB"))
    if s.autocast:  # each matmul keeps the bf16 cast of its fp32 weight for the input's gradient
        layers = 0 if s.gradient_checkpointing else g.num_layers * lm_layer_params(g)
        saved.append(Piece("bf16 weight copies kept by autocast", (layers + embedding_params(g)) * 2,
                           "lm_head" + ("" if s.gradient_checkpointing else " + every LM layer") + ", 2 B each"))
    if s.shared_prompt:
        past = _kv_bytes(g, m, s.prompt_tokens - 1, b) * (1 if s.gradient_checkpointing else 2)
        saved.append(Piece("prompt keys/values indexed to the rows", past,
                           "m x (P-1) x L x 2 x kv" + ("" if s.gradient_checkpointing else ", and [past ; new]")))
    lm_head_in = m * s.max_new_tokens * g.hidden_size * (b if s.autocast else s.weight_bytes)
    if not s.autocast and not s.shared_prompt:  # lm_head keeps a view of the whole last hidden state
        lm_head_in = m * (s.prompt_tokens + s.max_new_tokens) * g.hidden_size * s.weight_bytes
    saved.append(Piece("lm_head input", lm_head_in, "m x T x D"))

    grads = trainable_params(g, s) * s.trainable_bytes / s.shards
    head_grad = 0 if s.lora else embedding_params(g) * s.param_bytes / s.shards
    layer_grad = (lora_params(g, s.lora_rank, s.lora_targets) / g.num_layers if s.lora
                  else lm_layer_params(g)) * s.trainable_bytes / s.shards
    many = s.micro_batches_per_step > 1
    extra = [gathered] if gathered else []
    head_unsharded, layer_unsharded = [], []
    if gathered and not s.lora:  # a unit's gradient is whole until its reduce-scatter (+ that op's input)
        head_unsharded = [Piece("FSDP2 unsharded lm_head gradient", embedding_params(g) * s.weight_bytes,
                                "V x D, before its reduce-scatter")]
        layer_unsharded = [Piece("FSDP2 unsharded layer gradient", 2 * lm_layer_params(g) * s.weight_bytes,
                                 "one layer + its reduce-scatter input")]

    unsharded_accumulation = many and s.shards > 1 and s.fsdp_sync == "per_step"
    if unsharded_accumulation:  # FSDP2 reduce-scatters only at the step's last backward
        grads = trainable_params(g, s) * s.trainable_bytes
    logits_stage = [*saved, *_logits_pieces(g, s, m, grad=True), *extra, *head_unsharded]
    if many:
        logits_stage.append(Piece("gradients (earlier micro-batches)", grads,
                                  "unsharded (FSDP2 sync per_step)" if unsharded_accumulation
                                  else _shard_note(s).lstrip(", ")))

    saved_total = sum(p.bytes for p in saved)
    others = saved_total - g.num_layers * per_layer_saved
    at_top = g.num_layers * per_layer_saved + (grads if many else head_grad + layer_grad)
    at_bottom = per_layer_saved + grads
    layer_stage = [Piece("saved activations left + gradients so far", others + max(at_top, at_bottom),
                         "the larger of the two ends of the backward")]
    if s.gradient_checkpointing:
        copies = lm_layer_params(g) * 2 if s.autocast else 0
        layer_stage.append(Piece("one layer recomputed (checkpointing)", tokens * n_layer + copies,
                                 f"{tokens} tokens x {n_layer / 1024:.1f} KiB" + (" + its bf16 weights" if copies else "")))
    layer_stage.append(Piece("backward working set of one layer",
                             tokens * (2 * g.hidden_size * s.weight_bytes + 2 * g.active_intermediate * b),
                             "(2 D + 2 I) per token"))
    layer_stage += [*extra, *layer_unsharded]
    return [Stage("policy forward+backward: logits", tuple(logits_stage)),
            Stage("policy forward+backward: decoder layers", tuple(layer_stage))]


def plan(g: ModelGeometry, s: PlanSettings) -> Plan:
    """Peak memory per rank of ``s`` on ``g`` (see the module docstring for the notation)."""
    n_total, n_train = total_params(g), trainable_params(g, s)
    b_p, b, b_t = s.param_bytes, s.act_bytes, s.trainable_bytes
    p_len, t = s.prompt_tokens, s.max_new_tokens
    notes: list[str] = []

    adapters = n_train if s.lora else 0
    always = [Piece("parameters", (n_total * b_p + adapters * b_t) / s.shards,
                    f"{n_total / 1e9:.2f} B x {b_p} B ({_dtype_name(b_p)}{_shard_note(s)})"
                    + (f" + {adapters / 1e6:.0f} M adapters x {b_t} B" if s.lora else ""))]
    grads = n_train * b_t / s.shards
    always.append(Piece("optimizer: AdamW exp_avg + exp_avg_sq", 2 * grads,
                        f"2 x {n_train / 1e9:.3g} B trainable x {b_t} B{_shard_note(s)}"))
    if b_t == 4:
        compute = ("bf16 autocast" if s.autocast else f"FSDP2 param_dtype {s.fsdp_param_dtype}"
                   if s.weight_bytes == 2 else "fp32")
        notes.append(f"master weights: none besides the trained parameters themselves (fp32; compute: {compute})")
    else:
        notes.append("master weights: none; trained weights and AdamW moments are 16-bit (pure 16-bit training)")
    if s.lora:
        always.append(Piece("reference model", 0.0, "LoRA: the same weights with the adapters off"))
    else:
        ref_shards = s.shards if s.reference_sharded else 1
        ref = n_total * s.reference_bytes / ref_shards
        where = f"sharded 1/{ref_shards}" if ref_shards > 1 else "unsharded, on every rank"
        always.append(Piece("reference model: frozen copy", ref,
                            f"{n_total / 1e9:.2f} B x {s.reference_bytes} B, {where}"))
        if s.reference_sharded:
            notes.append(f"reference: built from model_dir after the policy is sharded, sharded like it in the compute "
                         f"dtype ({_dtype_name(s.reference_bytes)}), each rank reading only its rows of each tensor")
        elif s.reference_dtype is None:
            notes.append("reference: AudioLMPolicy.load deep-copies the whole model in the policy dtype (frozen_copy), "
                         "unsharded on every rank; under FSDP2 it is sharded like the policy instead")
    if s.strategy == "ddp":
        always.append(Piece("DDP gradient buckets", grads, "a flat copy of the gradients"))
    if s.num_gpus > 1 and s.strategy == "fsdp2" and s.sharded_loading:
        # Each rank reads only its rows of every tensor (policy, and the full fine-tuning reference) from the
        # safetensors files, straight to its device (emorl_pl.modules.loading): nothing whole in host RAM.
        per_rank = n_total * (b_p + (0 if s.lora else s.reference_bytes)) / s.shards / GiB
        whole = n_total * b_p / GiB
        what = "every tensor" if s.lora else "every tensor of the policy and the reference"
        if s.device == "cuda":
            head, to = "none for the weights", f"to its GPU through a 1 MiB buffer, {per_rank:.1f} GiB per GPU"
        else:
            head, to = "no whole copy", (f"into its own memory, {per_rank:.1f} GiB per process, "
                                         f"{s.num_gpus * per_rank:.0f} GiB in all")
        notes.append(f"host RAM while loading: {head}: each of the {s.num_gpus} processes reads only its 1/{s.shards}"
                     f" of {what} from the safetensors files {to}; a folder that cannot be read that way (e.g. .bin "
                     f"weights) loads whole on every process first: {s.num_gpus} x {whole:.1f} = "
                     f"{s.num_gpus * whole:.0f} GiB")
    elif s.num_gpus > 1:
        # Unsharded, the reference is a deep copy next to the loaded model; sharded, it is loaded once the
        # policy is sharded, so one full copy is in host RAM at a time.
        copy_too = not s.lora and not s.reference_sharded
        host = n_total * (b_p + (s.reference_bytes if copy_too else 0)) / GiB
        notes.append(f"host RAM while loading: each of the {s.num_gpus} processes loads the whole model on the CPU in "
                     f"the policy dtype{' and deep-copies the reference' if copy_too else ''}"
                     f"{' before sharding' if s.strategy == 'fsdp2' else ''}: "
                     f"{s.num_gpus} x {host:.1f} = {s.num_gpus * host:.0f} GiB")
    rollout_buffers = s.accumulate_grad_batches * (
        s.batch_size * p_len * g.hidden_size * b_p  # prompt embeddings
        + s.batch_size * audio_tokens(g.window_seconds, g.window_seconds, g.audio_chunk_tokens) * g.audio_d_model * b  # tower output
        + s.rows * t * (8 + 8 + 4 * 4 + (4 if s.vllm else 0)))  # ids, mask, advantages/mask/ref/old (engine) log-probs
    always.append(Piece("rollout buffers", rollout_buffers, "prompt embeddings, audio features, ids, log-probs"))
    # The prompts' mel features (build_prompts: in the policy dtype, on the policy's device) live through the step.
    # On the CPU they are the feature extractor's own arrays, and its per-sample mask stays alive with them.
    frames, samples = feature_frames(g, s.audio_seconds), feature_samples(g, s.audio_seconds)
    fe_peak, _ = feature_extraction_bytes(g, s.audio_seconds)
    mask = 4 * samples if s.device == "cpu" else 4 * frames
    features = g.num_mel_bins * frames * b_p + mask
    always.append(Piece("prompt audio features", s.accumulate_grad_batches * s.batch_size * features,
                        f"B x {g.num_mel_bins} mels x {frames} frames x {b_p} B + the mask"
                        + (f" (per sample, {samples}: the frame mask is a view of it)" if s.device == "cpu" else "")))
    if s.device == "cuda":
        notes.append(f"host RAM while building a batch's prompts: {s.batch_size} x {fe_peak / 2**20:.0f} MiB per process "
                     f"(feature extraction, each clip padded to {samples / g.sampling_rate:g} s: "
                     f"memory_plan.feature_extraction_bytes)")
    if s.device == "cuda":
        always.append(Piece("CUDA context, NCCL, workspaces (allowance)", CUDA_RUNTIME_BYTES, "not modelled"))
    engine: tuple[Piece, ...] = ()  # what the engine adds to the stages that sample (rollout, validation)
    if s.vllm:
        engine = _engine_pieces(g, s)
        if s.engine_sleeps:
            always.append(Piece("vLLM engine, asleep (sleep mode)", 0.0,
                                "weights in host RAM, KV cache freed; its CUDA context is the trainer's"))
        else:
            always += engine
            engine = ()
        engine = (*engine, *_engine_sync(g, s))
        notes += _engine_notes(g, s)

    gathered = _fsdp_gathered(g, s)
    extra = [gathered] if gathered else []
    # Under autocast every matmul casts its fp32 weight to bf16 while it runs; lm_head's is the largest.
    cast = [Piece("bf16 cast of lm_head's weight (autocast)", embedding_params(g) * 2, "V x D x 2 B, while it runs")
            ] if s.autocast else []
    stages: list[Stage] = []

    # Building the prompts: on the CPU the feature extraction is a moment of the step (on a GPU it is host RAM).
    if s.device == "cpu":
        stages.append(Stage("prompt features (feature extractor)", (
            Piece("feature extraction temporaries", s.batch_size * (fe_peak - features),
                  f"{s.batch_size} x {samples} samples: STFT and log-mel (memory_plan.feature_extraction_bytes)"),)))
    # Prompt encoding: the audio tower once per utterance, no grad.
    stages.append(Stage("prompt encoding (audio tower)", (
        Piece("audio encoder activations (no grad)", _encoder_activations(g, s, s.batch_size, inputs=False),
              f"{s.batch_size} x {g.max_source_positions} positions"), *extra)))

    # Rollout: shared prefill of B prompts, decode n rows. The fused step (one device, or FSDP2 with the
    # whole model gathered) copies each utterance's prompt once into its cache, next to T + 1 columns per
    # row for the new tokens; the decoder's own forward repeats the prompt into an (n, P + T) cache. With the
    # vLLM engine none of this is used: the stage is the engine (awake) and the weight sync.
    fused = s.fused_decode != "off" and (s.shards == 1 or s.rollout_gathered)
    if fused:
        kv_cache = Piece("KV cache of the rollout",
                         _kv_bytes(g, s.batch_size, p_len - 1, b) + _kv_bytes(g, s.rows, t + 1, b),
                         f"(B x ({p_len} - 1) + {s.rows} rows x ({t} + 1)) x L x 2 x kv x {b} B: "
                         "the prompt once per utterance")
    else:
        kv_cache = Piece("KV cache of the rollout", _kv_bytes(g, s.rows, p_len + t, b),
                         f"{s.rows} rows x ({p_len} + {t}) x L x 2 x kv x {b} B")
    rollout = [kv_cache,
               Piece("shared prefill cache", _kv_bytes(g, s.batch_size, p_len - 1, b), "B x (P-1), copied into it")]
    rollout.append(Piece("sampling temporaries", s.rows * g.vocab_size * (4 + 4), "logits, their warped copy"))
    if (fused and s.device == "cpu" and b_p == 4 and b == 4 and t + 1 >= fused_decode._PACK_MIN_CALLS
            and g.vocab_size * g.hidden_size >= fused_decode._PACK_MIN_ELEMENTS):
        rollout.append(Piece("prepacked lm_head (CPU)", g.vocab_size * g.hidden_size * 4, "fused_decode: oneDNN linear"))
    if s.fused_decode == "merged" and fused:
        lm_projections = g.num_layers * (lm_layer_params(g) - 2 * g.hidden_size)
        rollout.append(Piece("merged projection weights", lm_projections * b_p, "fused_decode: merged"))
    rollout_extra = extra
    if s.rollout_gathered and s.shards > 1 and s.fused_decode != "off":
        rollout_extra = [Piece("every FSDP2 unit gathered (hybrid engine)", n_total * s.weight_bytes * _gathered_fraction(s),
                               f"the whole model in {s.weight_bytes} B for the rollout")]
    if s.vllm:
        stages.append(Stage("rollout (vLLM engine)", engine))
    else:
        stages.append(Stage("rollout", (*rollout, *rollout_extra, *cast)))

    # Reference (beta > 0) and sampling-policy (mu > 1) log-probs: no grad, m rows at a time.
    if s.beta > 0 or s.num_iterations > 1:
        m = s.micro_rows
        tokens, kv_len = _query_tokens(s, m, shared=True)
        unique = min(s.batch_size, math.ceil(m / s.group_size))
        # An unsharded full-fine-tuning reference is its own copy: nothing to gather for it.
        ref_extra = [] if (s.beta > 0 and not s.lora and not s.reference_sharded) else extra
        nograd = [Piece("prompt keys/values (recorded + indexed to the rows)",
                        _kv_bytes(g, unique + m, p_len - 1, b), "(U + m) x (P-1) x L x 2 x kv"),
                  Piece("last hidden state", m * t * g.hidden_size * 4, "m x T x D"),
                  *_logits_pieces(g, s, m, grad=False), *ref_extra, *cast]
        name = "reference log-probs (no grad)" if s.beta > 0 else "sampling-policy log-probs (no grad)"
        stages.append(Stage(name, tuple(nograd)))

    stages += _policy_stages(g, s, gathered)
    if not s.freeze_audio_tower:
        notes.append("audio tower trainable: its activations during the policy pass are not modelled")

    # Optimizer step: every gradient + AdamW's temporaries (foreach on GPU: sqrt(exp_avg_sq) of all
    # trainable tensors at once; per tensor on CPU: two temporaries the size of the largest).
    if s.device == "cuda":
        adam_tmp = grads
    else:
        largest = (s.lora_rank * max(g.hidden_size, g.q_dim, g.intermediate_size) if s.lora
                   else largest_weight(g))
        adam_tmp = 2 * largest * b_t
    optimizer = [Piece("gradients", grads, f"{n_train / 1e9:.3g} B x {b_t} B{_shard_note(s)}"),
                 Piece("AdamW step temporaries", adam_tmp, "foreach" if s.device == "cuda" else "per tensor")]
    if s.strategy == "ddp":
        optimizer.append(Piece("(DDP buckets counted above)", 0.0))
    stages.append(Stage("optimizer step", tuple(optimizer)))

    # Validation / test between steps: greedy decoding of eval_batch_size utterances, one sample each.
    if s.eval_batch_size:
        t_eval = s.eval_max_new_tokens or t
        encoder = Piece("audio encoder activations (no grad)",
                        _encoder_activations(g, s, s.eval_batch_size, inputs=True),
                        f"{s.eval_batch_size} x {g.max_source_positions} positions, with the mel features")
        if s.device == "cpu":
            stages.append(Stage("validation prompt features (feature extractor)", (
                Piece("feature extraction temporaries", s.eval_batch_size * fe_peak,
                      f"{s.eval_batch_size} x {samples} samples (memory_plan.feature_extraction_bytes)"),)))
        if s.vllm:
            stages.append(Stage("validation (greedy, vLLM engine)", (encoder, *engine)))
        else:
            stages.append(Stage("validation (greedy)", (
                encoder,
                Piece("KV cache", _kv_bytes(g, s.eval_batch_size, p_len + t_eval, b),
                      f"{s.eval_batch_size} rows x ({p_len} + {t_eval})"),
                Piece("sampling temporaries", s.eval_batch_size * g.vocab_size * 8, "logits, argmax"), *rollout_extra,
                *cast)))
    return Plan(g, s, tuple(always), tuple(stages), tuple(notes))


def _engine_notes(g: ModelGeometry, s: PlanSettings) -> list[str]:
    e = s.engine_settings
    notes = []
    if s.num_gpus > 1:
        notes.append(f"vLLM engine: this version colocates it on one process only (several ranks use "
                     f"emorl-rollout-server, on GPUs of its own, not counted here); for {s.num_gpus} GPUs this is a "
                     "what-if of TRL's colocate mode: one engine per rank (tensor_parallel_size 1), each holding "
                     "the whole model")
    else:
        notes.append("vLLM engine: in the trainer's process, on its GPU (colocated)")
    need = engine_min_utilization(g, s)
    if e["gpu_memory_utilization"] < need:
        notes.append(f"vLLM engine: gpu_memory_utilization {e['gpu_memory_utilization']:g} leaves less KV cache than "
                     f"one max_model_len {e['max_model_len']} sequence: vLLM refuses to start; it needs >= {need:.2f}")
    host = engine_weight_bytes(g, s) / GiB if s.engine_sleeps else 0.0
    # write_hub_shards' max_shard_bytes + the weight being added to it; a fused expert weight is held together
    # with its per-expert split (hub_layout.HubConverter) until both are in the shard
    fused_experts = g.num_experts * 2 * g.moe_intermediate_size * g.hidden_size if g.moe else 0
    largest = max(largest_weight(g), 2 * fused_experts) * s.weight_bytes
    sync = (_max_shard_bytes() + largest) / GiB
    disk = total_params(g) * s.weight_bytes / GiB
    notes.append(f"host RAM for the engine: about {sync:.1f} GiB on the writing rank at each sync (one 1 GiB "
                 "safetensors shard being filled + one weight, or a fused expert weight and its per-expert split; "
                 "weight_sync.write_hub_shards; the other ranks only join the gathers), the whole model in "
                 f"{_dtype_name(s.weight_bytes)} ({disk:.1f} GiB) written to the temp folder"
                 + (f", + {host:.1f} GiB per process, its weights while asleep" if s.engine_sleeps else "")
                 + (f"; {s.num_gpus} processes: {s.num_gpus * host + sync:.0f} GiB" if s.num_gpus > 1 else ""))
    if s.engine_sleeps:
        notes.append("vLLM sleep mode: modelled as the engine asleep (LLM.sleep(level=1): weights to host RAM, KV cache "
                     "freed) from the end of each rollout until the next rollout or validation wakes it")
    return notes


# ------------------------------------------------------------------------------------- verdict, fixes
def verdict(peak_gib: float, limit_gib: float, margin: float = MARGIN) -> str:
    """"fits" (at least ``margin`` below the limit), "tight" (fits, less headroom) or "does not fit"."""
    if peak_gib <= (1 - margin) * limit_gib:
        return "fits"
    return "tight" if peak_gib <= limit_gib else "does not fit"


@dataclass(frozen=True)
class Suggestion:
    change: str
    settings: PlanSettings
    peak_gib: float
    verdict: str
    combined: bool = False  # several changes together (none fitted alone)


Change = tuple[str, dict]  # (what to change, the PlanSettings fields it sets)


def _ladders(g: ModelGeometry, s: PlanSettings) -> list[list[Change]]:
    """Changes that lower memory, in the order worth trying; each a ladder of ever stronger rungs."""
    out: list[list[Change]] = []
    if not s.lora:
        if s.strategy == "fsdp2" and not s.reference_sharded:
            out.append([("reference sharded like the policy (what the code does under FSDP2)",
                         {"reference_sharded": True})])
        elif s.strategy == "fsdp2" and s.weight_bytes == 4 and s.reference_dtype is None:
            out.append([("FSDP2 param_dtype bf16: gathered weights and the sharded reference in bf16 "
                         "(trainer.strategy.init_args.param_dtype: bfloat16)", {"fsdp_param_dtype": "bfloat16"})])
        out.append([("LoRA r=64 on the LM projections (policy.init_args.lora: {r: 64, alpha: 128})",
                     {"lora_rank": 64, "lora_targets": LM_PROJECTIONS})])
    if not s.gradient_checkpointing:
        out.append([("gradient checkpointing (policy.init_args.gradient_checkpointing: true)",
                     {"gradient_checkpointing": True})])
    rungs, m = [], s.micro_rows
    while m > 1:
        m //= 2
        rungs.append((f"micro_batch_size {m}", {"micro_batch_size": m}))
    if rungs:
        out.append(rungs)
    if s.lora and s.param_bytes == 4:
        out.append([("frozen base weights in bf16 (policy.init_args.dtype: bfloat16; peft keeps adapters fp32)",
                     {"policy_dtype": "bfloat16"})])
    if s.rollout_gathered and s.shards > 1 and s.fused_decode != "off" and not s.vllm:
        out.append([("fused_decode: off (FSDP2 gathers one unit at a time for the rollout instead of the whole model; "
                     "a slower decode)", {"fused_decode": "off", "rollout_gathered": False})])
    if s.fused_decode == "merged" and not s.vllm:
        out.append([("fused_decode: adapters (no merged weight copy)", {"fused_decode": "adapters"})])
    if s.vllm:
        out += _engine_ladders(g, s)
    gpus = s.num_gpus if s.strategy == "fsdp2" else 1
    out.append([(f"FSDP2 over {k * gpus} GPUs (strategy emorl_pl.strategies.FSDP2Strategy)",
                 {"strategy": "fsdp2", "num_gpus": k * gpus, "shard_degree": None}) for k in (2, 4, 8)])
    return out


def _engine_ladders(g: ModelGeometry, s: PlanSettings) -> list[list[Change]]:
    """With the vLLM engine: sleep mode; a smaller ``gpu_memory_utilization`` (0.05 steps down to the smallest
    that vLLM starts with, ``engine_min_utilization``); the trainer's own decode instead of the engine."""
    out: list[list[Change]] = []
    if not s.engine_sleeps:
        out.append([("vLLM sleep mode: the engine off the GPU outside the rollout "
                     "(policy.init_args.vllm: {enable_sleep_mode: true})", {"vllm_sleep": True})])
    u = s.engine_settings["gpu_memory_utilization"]
    lowest = math.ceil(100 * engine_min_utilization(g, s) - 1e-9) / 100
    rungs = [round(0.05 * k, 2) for k in range(math.ceil(u / 0.05 - 1e-9) - 1, 0, -1)]
    fractions = [f for f in rungs if f >= lowest] + ([lowest] if lowest < u else [])
    fractions = sorted(set(fractions), reverse=True)
    if fractions:
        out.append([(f"vLLM gpu_memory_utilization {f:g} (policy.init_args.vllm: {{gpu_memory_utilization: {f:g}}})",
                     {"vllm_gpu_memory_utilization": f}) for f in fractions])
    out.append([("rollout_engine: fused (the trainer samples with its own weights; no engine copy)",
                 {"rollout_engine": "fused"})])
    return out


def _first_fitting(g: ModelGeometry, s: PlanSettings, ladder: list[Change], limit_gib: float,
                   margin: float) -> Change:
    """The first rung that fits with the margin, else the last (strongest) one."""
    for change in ladder:
        if verdict(plan(g, dataclasses.replace(s, **change[1])).peak_gib, limit_gib, margin) == "fits":
            return change
    return ladder[-1]


def suggestions(g: ModelGeometry, s: PlanSettings, limit_gib: float, margin: float = MARGIN) -> list[Suggestion]:
    """What to change when ``s`` does not fit with the margin. First each kind of change alone that lowers
    the peak by more than 1% (for a ladder such as the micro-batch size or the GPU count: its first rung
    that fits, else its strongest). If none fits alone, a combination, built greedily: from the current
    settings apply the change that lowers the peak most, until the plan fits or nothing helps; changes
    that a later one made useless are dropped. Empty when ``s`` already fits with the margin."""
    if verdict(plan(g, s).peak_gib, limit_gib, margin) == "fits":
        return []
    out = [x for x in _best_changes(g, s, limit_gib, margin) if x.peak_gib <= 0.99 * plan(g, s).peak_gib]
    if any(x.verdict == "fits" for x in out):
        return out
    steps: list[Change] = []
    current = s
    for _ in range(8):
        options = _best_changes(g, current, limit_gib, margin)
        if not options:
            break
        best = min(options, key=lambda x: x.peak_gib)
        if best.peak_gib > 0.99 * plan(g, current).peak_gib:
            break
        steps.append((best.change, _diff(current, best.settings)))
        current = best.settings
        if best.verdict == "fits":
            break
    steps = _prune(g, s, steps)
    if len(steps) > 1:
        peak = plan(g, current := _apply(s, steps)).peak_gib
        out.append(Suggestion(" + ".join(name for name, _ in steps), current, peak, verdict(peak, limit_gib, margin),
                              combined=True))
    return out


def _best_changes(g: ModelGeometry, s: PlanSettings, limit_gib: float, margin: float) -> list[Suggestion]:
    """Per ladder of ``_ladders(g, s)``: its first rung that fits, else its strongest, with the new peak."""
    out = []
    for ladder in _ladders(g, s):
        name, fields = _first_fitting(g, s, ladder, limit_gib, margin)
        new = dataclasses.replace(s, **fields)
        peak = plan(g, new).peak_gib
        out.append(Suggestion(name, new, peak, verdict(peak, limit_gib, margin)))
    return out


def _diff(old: PlanSettings, new: PlanSettings) -> dict:
    return {f.name: getattr(new, f.name) for f in dataclasses.fields(new) if getattr(new, f.name) != getattr(old, f.name)}


def _apply(s: PlanSettings, steps: Sequence[Change]) -> PlanSettings:
    for _, fields in steps:
        s = dataclasses.replace(s, **fields)
    return s


def _prune(g: ModelGeometry, s: PlanSettings, steps: list[Change]) -> list[Change]:
    """Drop each step whose removal leaves the combined peak within 0.5% (a later step made it moot)."""
    kept = list(steps)
    for step in list(steps):
        without = [x for x in kept if x is not step]
        if without and plan(g, _apply(s, without)).peak_bytes <= 1.005 * plan(g, _apply(s, kept)).peak_bytes:
            kept = without
    return kept
