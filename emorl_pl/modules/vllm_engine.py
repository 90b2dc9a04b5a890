"""Rollouts on vLLM, colocated: an in-process ``vllm.LLM`` on the trainer's devices samples the GRPO groups.

What the engine gets is exactly our prompt: the chat template applied once, by our code
(``Prompts.texts``, one ``<|AUDIO|>`` per audio, which vLLM expands itself: given the pre-expanded id run
that transformers takes, vLLM misplaces the audio without an error), plus the cropped audio arrays at the
feature extractor's rate (``Prompts.audio``). Sampling is ours: n = G, temperature, top-p, top-k,
``max_new_tokens``, the audio special tokens suppressed, stop at ``<|im_end|>`` / eos, one seed per request.
It returns the sampled token ids and each token's log-prob under the sampling distribution
(``logprobs_mode="processed_logprobs"``: after temperature and the token bias, as TRL asks vLLM for them),
which the trainer uses for the train/inference importance-sampling correction (``emorl_pl.grpo``).

Weights reach the engine through vLLM's own in-place reload (``Worker.reload_weights`` by
``LLM.collective_rpc``, through ``EngineWorkerExtension``) from a folder in the hub's key layout, written by
``emorl_pl.modules.weight_sync``.

Needs vLLM (on CPU: ``bash scripts/vllm_cpu_env.sh``, see README); imported only when an engine is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

ROLLOUT_ENGINES = ("fused", "vllm")


VLLM_MODES = ("colocate", "server")

# What one of the policy's prompts carries, for every family: one audio clip, no image or video. vLLM sizes its
# profiling and encoder cache by these and reads only the modalities the model has (Qwen2-Audio / AF3: audio),
# so one setting serves all; for the Omni thinkers it keeps the image and video towers out of the profile run
# (whose processors need torchvision).
LIMIT_MM_PER_PROMPT = {"audio": 1, "image": 0, "video": 0}


@dataclass(frozen=True)
class VLLMSettings:
    """Engine options. ``mode``: "colocate" (an engine in this process; ``gpu_memory_utilization`` and
    ``enable_sleep_mode`` act on GPU only) or "server" (``emorl-rollout-server`` at ``server_url``, which
    reloads weights from ``weights_dir``: a folder both sides can read; None: a scratch folder, for a server on
    this machine)."""

    mode: str = "colocate"
    server_url: str | None = None
    weights_dir: str | None = None
    max_model_len: int = 4096
    dtype: str = "auto"
    gpu_memory_utilization: float = 0.3
    enable_sleep_mode: bool = False
    enforce_eager: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in VLLM_MODES:
            raise ValueError(f"vllm.mode must be one of {list(VLLM_MODES)}, got {self.mode!r}")
        if self.mode == "server" and not self.server_url:
            raise ValueError("vllm.mode 'server' needs vllm.server_url (http://HOST:PORT of emorl-rollout-server)")
        if not 0 < self.gpu_memory_utilization <= 1 or self.max_model_len < 1:
            raise ValueError(f"vllm.gpu_memory_utilization must be in (0, 1] and max_model_len >= 1, got "
                             f"{self.gpu_memory_utilization}, {self.max_model_len}")


class EngineWorkerExtension:
    """Mixed into vLLM's worker class (``LLM(worker_extension_cls=...)``): the reload the engine calls."""

    def emorl_reload_weights(self, weights_path: str) -> int:
        """vLLM's in-place reload from ``weights_path`` (checkpoint format), then on CPU vLLM 0.32 the expert
        weights re-packed; returns how many mixture-of-experts layers were."""
        self.reload_weights(weights_path=weights_path, is_checkpoint_format=True)
        return repack_cpu_moe_after_reload(self.model_runner.get_model())


def repack_cpu_moe_after_reload(model: torch.nn.Module) -> int:
    """Work around vLLM 0.32 on CPU: its first load packs each MoE layer's ``w13_weight`` / ``w2_weight`` into
    the CPU grouped-GEMM layout (``CPUUnquantizedExperts.process_weights_after_loading``), but a reload
    (``UnquantizedFusedMoEMethod._setup_kernel`` with ``is_weight_update``) copies the new weights into those
    parameters in checkpoint layout without packing them, so every expert computes with scrambled weights
    (Qwen3-Omni's log-probs off by ~1e-2 on the thin test model; vLLM's RL reload tracker: issue #48312). Packs
    them in place as the first load does. Other versions, GPU experts and zentorch are left alone:
    tests/with_vllm/test_vllm_qwen3_omni_policy.py says whether a new version needs it."""
    import vllm

    if not vllm.__version__.startswith("0.32."):
        return 0
    from vllm._custom_ops import cpu_prepack_moe_weight
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    repacked = 0
    with torch.no_grad():
        for module in model.modules():
            experts = getattr(getattr(getattr(module, "quant_method", None), "moe_kernel", None), "fused_experts", None)
            if isinstance(experts, CPUUnquantizedExperts) and not experts._use_zentorch:
                for name in ("w13_weight", "w2_weight"):
                    weight = getattr(module, name)
                    weight.data.copy_(cpu_prepack_moe_weight(weight.data, experts.isa))
                repacked += 1
    return repacked


@dataclass(frozen=True)
class EngineSample:
    """One sampled completion: its token ids (the stop token included when it stopped on one) and each
    token's log-prob under the sampling distribution."""

    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]


class VLLMColocateEngine:
    """A ``vllm.LLM`` in this process over ``model_dir`` (hub key layout)."""

    def __init__(self, model_dir: str | Path, settings: VLLMSettings = VLLMSettings(),
                 stop_token_ids: Sequence[int] = (), suppressed_token_ids: Sequence[int] = ()) -> None:
        from vllm import LLM

        kwargs: dict[str, Any] = dict(model=str(model_dir), dtype=settings.dtype, max_model_len=settings.max_model_len,
                                      enforce_eager=settings.enforce_eager, seed=settings.seed,
                                      logprobs_mode="processed_logprobs", limit_mm_per_prompt=LIMIT_MM_PER_PROMPT,
                                      worker_extension_cls=f"{__name__}.EngineWorkerExtension")
        if torch.cuda.is_available():
            kwargs.update(gpu_memory_utilization=settings.gpu_memory_utilization,
                          enable_sleep_mode=settings.enable_sleep_mode)
        self.llm = LLM(**kwargs)
        # Sleep mode (GPU only): asleep between rollouts (weights offloaded, KV cache freed) so the update has
        # the memory; woken for the next rollout or weight reload.
        self.sleeps = settings.enable_sleep_mode and torch.cuda.is_available()
        self._asleep = False
        self.stop_token_ids = list(stop_token_ids)
        # Our decode suppresses the audio tokens outright; a -100 bias gives them a probability of ~e^-100, the
        # same to float precision (and keeps the processed log-probs finite).
        self.logit_bias = {int(t): -100.0 for t in suppressed_token_ids}

    def sample(self, texts: Sequence[str], audio: Sequence[Any], sample_rate: int, n: int, *, max_new_tokens: int,
               temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, greedy: bool = False,
               seeds: Sequence[int] | None = None) -> list[list[EngineSample]]:
        """``n`` completions for each (prompt text, audio); per request ``seeds[i]`` (reproducible draws)."""
        from vllm import SamplingParams

        self._wake()
        if len(texts) != len(audio):
            raise ValueError(f"got {len(texts)} prompt texts for {len(audio)} audio arrays")
        requests, params = [], []
        for i, (text, wave) in enumerate(zip(texts, audio)):
            requests.append({"prompt": text, "multi_modal_data": {"audio": (wave, sample_rate)}})
            params.append(SamplingParams(
                n=n, max_tokens=max_new_tokens, temperature=0.0 if greedy else temperature,
                top_p=1.0 if greedy else top_p, top_k=0 if greedy else top_k,
                seed=None if seeds is None else int(seeds[i]), stop_token_ids=self.stop_token_ids,
                logit_bias=self.logit_bias or None, logprobs=0, skip_special_tokens=True,
            ))
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return [[EngineSample(tuple(c.token_ids), tuple(_sampled_logprobs(c))) for c in out.outputs]
                for out in outputs]

    def load_weights(self, model_dir: str | Path) -> None:
        """Reload every weight in place from ``model_dir`` (hub key layout), vLLM's own RL reload path."""
        self._wake()
        self.llm.collective_rpc("emorl_reload_weights", kwargs={"weights_path": str(model_dir)})
        # The worker drops its encoder outputs on reload but the scheduler would still count on them ("Encoder
        # cache miss"), and cached prefixes / audio features were computed with the old weights.
        engine = self.llm.llm_engine
        engine.reset_encoder_cache()
        engine.reset_mm_cache()
        engine.reset_prefix_cache()

    def release(self) -> None:
        """After a rollout: with sleep mode, put the engine to sleep (level 1) until it is needed again."""
        if self.sleeps and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    def close(self) -> None:
        """Stop the engine's processes now (vLLM's engine core runs in a child process that outlives a parent
        killed by a signal, holding its memory)."""
        self.llm.llm_engine.engine_core.shutdown()

    def _wake(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False


def _sampled_logprobs(completion: Any) -> list[float]:
    """The sampled token's log-prob at each position (vLLM returns it first, with ``logprobs=0``)."""
    return [lp[tok].logprob for tok, lp in zip(completion.token_ids, completion.logprobs)]


def pack_completions(samples: Sequence[Sequence[EngineSample]], max_new_tokens: int,
                     pad_id: int) -> tuple[Tensor, Tensor]:
    """Rows b*G + g as the trainer's decode lays them out: ``(ids (N, T) right-padded with pad_id, log-probs
    (N, T) zero-padded)``, T the longest completion (<= max_new_tokens)."""
    rows = [s for group in samples for s in group]
    longest = max((len(s.token_ids) for s in rows), default=0)
    if longest > max_new_tokens:
        raise ValueError(f"the engine returned {longest} tokens, more than max_new_tokens={max_new_tokens}")
    T = max(longest, 1)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    logps = torch.zeros((len(rows), T), dtype=torch.float32)
    for r, s in enumerate(rows):
        k = len(s.token_ids)
        ids[r, :k] = torch.tensor(s.token_ids, dtype=torch.long)
        logps[r, :k] = torch.tensor(s.logprobs, dtype=torch.float32)
    return ids, logps
