"""A roofline floor for one GRPO step: the FLOPs and bytes each phase must move, and the time that takes.

Pure arithmetic (no tensors are built). The model's shapes come from ``emorl_pl.memory_plan.ModelGeometry`` (read from
a ``config.json`` by ``emorl_pl.plan_cli.geometry_from_config``); the machine's rates are measured by the
benchmark in the same run (``_common.measure_machine``). A phase cannot take less than

    floor = max(FLOPs / matmul FLOP/s, bytes / memory bandwidth)

and the step's floor is the sum over its phases (no overlap between phases). Notation:

    V vocabulary, D LM hidden, L LM layers, I LM intermediate, kv = kv_heads * head_dim
    W = 2 D^2 + 2 D kv + 3 D I   matmul weights of one LM layer (q, o: D x D; k, v: D x kv; gate, up, down)
    d, f, La, S, M: audio encoder width, ffn, layers, positions (S = 1500 for 30 s), mel bins (2S frames)
    Wa = 4 d^2 + 2 d f           matmul weights of one encoder layer
    B utterances, G samples each, n = B G rows, P prompt tokens, T new tokens, A audio tokens per utterance
    b bytes per value of weights and activations (4 fp32, 2 bf16)

What is counted, and what is not:

- FLOPs: 2 per multiply-add of every matmul (linear layers, attention scores and values, causal where the
  model is causal), the base model only: LoRA's own matmuls (r (in + out) per projection and token, ~3% at
  r = 8, D = 512) are left out, as are norms, activations functions, softmax and sampling.
- Bytes: every weight a phase uses, read once per pass over it (decode: once per token); activations as
  each layer's input read and output written; the KV cache written once and read by every later query;
  the decode's fp32 logits written and read by the sampler. The (n, T, V) logits of a log-prob pass are
  never counted: a fused lm_head + log-softmax need not write them.
- The audio encoder runs on its padded window (2S mel frames): the model is defined on it.
- The G samples of an utterance share their prompt: it is prefilled once per utterance, and the log-prob
  passes run it once per utterance (as ``AudioLMPolicy`` does); prefill covers P - 1 tokens and each decode
  step one token per row, from the prompt's last token on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from emorl_pl.memory_plan import ModelGeometry, audio_params, lm_layer_params, lora_params

PHASES = ("audio encoder", "prompt prefill", "decode", "policy forward+backward", "reference forward",
          "optimizer")
ADAMW_BYTES_PER_PARAM = 28  # fp32: read parameter, gradient, exp_avg, exp_avg_sq; write all but the gradient


@dataclass(frozen=True)
class StepShape:
    """The work of one GRPO step. ``lora_rank`` None: full fine-tuning of the language model.
    ``beta`` 0 skips the reference forward (as ``GRPOModule``)."""

    batch_size: int
    group_size: int
    prompt_tokens: int
    new_tokens: int
    audio_tokens: int
    bytes_per_value: int = 4
    lora_rank: int | None = 8
    beta: float = 0.04

    @property
    def rows(self) -> int:
        return self.batch_size * self.group_size


@dataclass(frozen=True)
class Work:
    flops: float
    bytes: float

    def __add__(self, other: Work) -> Work:
        return Work(self.flops + other.flops, self.bytes + other.bytes)


@dataclass(frozen=True)
class Machine:
    """Measured rates: matmul FLOP/s and memory bytes/s."""

    flops_per_s: float
    bytes_per_s: float


# ------------------------------------------------------------------------------------------ pieces
def lm_layer_matmul_weights(g: ModelGeometry) -> int:
    """W = 2 D^2 + 2 D kv + 3 D I: q and o (D x D), k and v (D x kv), gate and up (D x I), down (I x D)."""
    d = g.hidden_size
    return 2 * d * d + 2 * d * g.kv_dim + 3 * d * g.intermediate_size


def encoder_layer_matmul_weights(g: ModelGeometry) -> int:
    """Wa = 4 d^2 + 2 d f: q, k, v, o (d x d), fc1 (d x f), fc2 (f x d)."""
    d = g.audio_d_model
    return 4 * d * d + 2 * d * g.audio_ffn


def lm_weights_read(g: ModelGeometry) -> int:
    """Parameters one pass over the language model reads: L layers (``lm_layer_params``), the final norm
    (D) and the lm_head (V x D); of the embedding only the used rows (counted with the activations)."""
    return g.num_layers * lm_layer_params(g) + g.hidden_size + g.vocab_size * g.hidden_size


def decode_key_positions(s: StepShape) -> int:
    """Keys all decode queries attend to: step t (0..T-1) sees P + t of them, sum = T P + T (T - 1) / 2."""
    t = s.new_tokens
    return t * s.prompt_tokens + t * (t - 1) // 2


def prefill_key_positions(s: StepShape) -> int:
    """Keys the causal prefill of P - 1 tokens attends to: 1 + 2 + ... + (P - 1) = (P - 1) P / 2."""
    return (s.prompt_tokens - 1) * s.prompt_tokens // 2


def attention_flops(g: ModelGeometry, query_key_pairs: int) -> int:
    """4 D per (query, key) pair and layer: scores q.k (2 D) and the weighted values (2 D), over all heads."""
    return 4 * g.hidden_size * g.num_layers * query_key_pairs


def logits_bytes(rows: int, tokens: int, vocab: int, nbytes: int) -> int:
    """One (rows, tokens, V) logits tensor: what a log-prob pass that materialises them holds (and its
    gradient as much again in a backward)."""
    return rows * tokens * vocab * nbytes


# ------------------------------------------------------------------------------------------ phases
def audio_encoder(g: ModelGeometry, s: StepShape) -> Work:
    """Once per utterance, on the padded window (2S frames -> S positions), then the projector on A tokens:

        FLOPs = B [2 (2S)(3M) d  (conv1, k = 3)  +  2 S (3d) d  (conv2, k = 3, stride 2)
                   + La (2 S Wa + 4 S^2 d)  (layers: matmuls, bidirectional attention)]  +  2 B A d D
        bytes = b audio_params  +  B [4 M 2S  (fp32 features)  +  La 2 S d b  (layers' in/out)]
    """
    d, positions, m = g.audio_d_model, g.max_source_positions, g.num_mel_bins
    convs = 2 * (2 * positions) * (3 * m) * d + 2 * positions * (3 * d) * d
    layers = g.audio_layers * (2 * positions * encoder_layer_matmul_weights(g) + 4 * positions * positions * d)
    projector = 2 * s.audio_tokens * d * g.hidden_size if g.projector else 0
    flops = s.batch_size * (convs + layers + projector)
    per_utterance = 4 * m * 2 * positions + g.audio_layers * 2 * positions * d * s.bytes_per_value
    return Work(flops, s.bytes_per_value * audio_params(g) + s.batch_size * per_utterance)


def prompt_prefill(g: ModelGeometry, s: StepShape) -> Work:
    """Once per utterance, P - 1 tokens (the last one starts the decode), no lm_head:

        FLOPs = 2 B (P-1) L W  +  4 D L B (P-1) P / 2
        bytes = b [L lm_layer_params  +  B (P-1) L 2 kv  (KV written)  +  2 L B (P-1) D  (layers' in/out)]
    """
    b, tokens = s.bytes_per_value, s.batch_size * (s.prompt_tokens - 1)
    flops = 2 * tokens * g.num_layers * lm_layer_matmul_weights(g)
    flops += attention_flops(g, s.batch_size * prefill_key_positions(s))
    moved = g.num_layers * (lm_layer_params(g) + tokens * 2 * g.kv_dim + 2 * tokens * g.hidden_size)
    return Work(flops, b * moved)


def decode(g: ModelGeometry, s: StepShape) -> Work:
    """T steps of one token per row (n rows), each through every layer and the lm_head:

        FLOPs = 2 n T (L W + V D)  +  4 D L n (T P + T (T-1) / 2)
        bytes = b T lm_weights_read  (weights, every step: bandwidth-bound at small n)
              + b L 2 kv [T B (P-1) + n T (T+1) / 2]  (KV read: the shared prompt once per utterance per
                step, each row's own keys)  +  b T n L 2 kv  (KV written)
              + 8 T n V  (fp32 logits written and read by the sampler)  +  b T 2 L n D  (layers' in/out)
    """
    b, n, t = s.bytes_per_value, s.rows, s.new_tokens
    flops = 2 * n * t * (g.num_layers * lm_layer_matmul_weights(g) + g.vocab_size * g.hidden_size)
    flops += attention_flops(g, n * decode_key_positions(s))
    kv = g.num_layers * 2 * g.kv_dim
    keys_read = t * s.batch_size * (s.prompt_tokens - 1) + n * t * (t + 1) // 2
    moved = b * (t * lm_weights_read(g) + kv * keys_read + t * n * kv + t * 2 * g.num_layers * n * g.hidden_size)
    return Work(flops, moved + 8 * t * n * g.vocab_size)


def _scoring_split(g: ModelGeometry, s: StepShape) -> tuple[int, int, int]:
    """(linear FLOPs, attention FLOPs, query tokens) of one log-prob forward: the prompt once per utterance
    (prefill's work) and every row's T completion positions with the lm_head (decode's work)."""
    n, t = s.rows, s.new_tokens
    tokens = s.batch_size * (s.prompt_tokens - 1) + n * t
    linear = 2 * tokens * g.num_layers * lm_layer_matmul_weights(g) + 2 * n * t * g.vocab_size * g.hidden_size
    attention = attention_flops(g, s.batch_size * prefill_key_positions(s) + n * decode_key_positions(s))
    return linear, attention, tokens


def policy_forward_backward(g: ModelGeometry, s: StepShape) -> Work:
    """Forward = prefill + decode FLOPs (same tokens, same keys); backward = k x linear + 2 x attention,
    k = 1 with LoRA (frozen weights need only input gradients), 2 with full fine-tuning (weights too):

        FLOPs = (1 + k) linear + 3 attention
        bytes = b [2 lm_weights_read  (forward and backward)  (+ lm_weights_read: weight gradients, full FT)
                   + 4 L tokens D]  (layers' in/out, forward and backward),  tokens = B (P-1) + n T
    """
    linear, attention, tokens = _scoring_split(g, s)
    k = 1 if s.lora_rank else 2
    weights = (2 if s.lora_rank else 3) * lm_weights_read(g)
    return Work((1 + k) * linear + 3 * attention,
                s.bytes_per_value * (weights + 4 * g.num_layers * tokens * g.hidden_size))


def reference_forward(g: ModelGeometry, s: StepShape) -> Work:
    """The forward alone (beta > 0; else no work): FLOPs = linear + attention, bytes = b [lm_weights_read
    + 2 L tokens D]."""
    if s.beta <= 0:
        return Work(0, 0)
    linear, attention, tokens = _scoring_split(g, s)
    return Work(linear + attention, s.bytes_per_value * (lm_weights_read(g) + 2 * g.num_layers * tokens * g.hidden_size))


def optimizer(g: ModelGeometry, s: StepShape) -> Work:
    """AdamW over the trainable parameters (LoRA adapters, or the LM without its embedding): memory-bound,
    28 bytes per fp32 parameter (``ADAMW_BYTES_PER_PARAM``); its arithmetic is left out."""
    trainable = lora_params(g, s.lora_rank) if s.lora_rank else lm_weights_read(g)
    return Work(0, ADAMW_BYTES_PER_PARAM * trainable)


def step_work(g: ModelGeometry, s: StepShape) -> dict[str, Work]:
    """Each phase's work, in ``PHASES`` order."""
    parts = (audio_encoder, prompt_prefill, decode, policy_forward_backward, reference_forward, optimizer)
    return {name: part(g, s) for name, part in zip(PHASES, parts)}


# ------------------------------------------------------------------------------------------ time
def seconds(work: Work, machine: Machine) -> float:
    """The roofline: a phase is bound by its arithmetic or its memory traffic, whichever takes longer."""
    return max(work.flops / machine.flops_per_s, work.bytes / machine.bytes_per_s)


def bound(work: Work, machine: Machine) -> str:
    return "compute" if work.flops / machine.flops_per_s >= work.bytes / machine.bytes_per_s else "memory"


def floor_seconds(works: Mapping[str, Work], machine: Machine) -> dict[str, float]:
    """Per phase floor, plus ``"step"``: their sum."""
    out = {name: seconds(w, machine) for name, w in works.items()}
    out["step"] = sum(out.values())
    return out
