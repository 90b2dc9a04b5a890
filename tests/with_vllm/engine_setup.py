"""What the vLLM tests share: test audio, the engine settings the CPU build takes, a colocated engine over a
test model, greedy decodes on either side, the teacher-forced greedy check, and the torchvision shim the Omni
processors need (fixture ``torchvision_free`` in this folder's conftest.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from emorl_pl.modules.policy import AudioLMPolicy
from emorl_pl.modules.vllm_engine import VLLMColocateEngine, VLLMSettings

SR = 16000
INSTRUCTION = "Which emotion does the speaker express? Answer with one word."
# fp32 to compare with our decode; eager (no graph capture on CPU); room for the 30 s audio windows' tokens
ENGINE = VLLMSettings(dtype="float32", max_model_len=1024, enforce_eager=True)


def waves(n: int = 3, seed: int = 0) -> list[torch.Tensor]:
    """Utterances of 1.0, 1.5, 2.0, ... s: a voiced-like tone with noise, different per utterance."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        t = np.arange(int(SR * (1.0 + 0.5 * i))) / SR
        wave = 0.3 * np.sin(2 * np.pi * (120 + 40 * i) * t) + 0.05 * rng.standard_normal(t.size)
        out.append(torch.tensor(wave, dtype=torch.float32))
    return out


def colocated_engine(model_dir: str | Path, policy: AudioLMPolicy) -> VLLMColocateEngine:
    """The engine the policy builds for ``rollout_engine: vllm`` (its stop and suppressed tokens), over
    ``model_dir``, in the test settings."""
    return VLLMColocateEngine(model_dir, ENGINE, stop_token_ids=policy.eos_token_ids,
                              suppressed_token_ids=policy.audio_token_ids)


def engine_greedy(engine: VLLMColocateEngine, prompts, max_new_tokens: int) -> list[list[int]]:
    return [list(group[0].token_ids) for group in
            engine.sample(prompts.texts, prompts.audio, SR, 1, max_new_tokens=max_new_tokens, greedy=True)]


def ours_greedy(policy: AudioLMPolicy, prompts, max_new_tokens: int) -> list[list[int]]:
    """The policy's greedy tokens (with ``rollout_engine: vllm``: the engine's, after the policy's sync)."""
    rollout = policy.rollout(prompts, 1, do_sample=False, max_new_tokens=max_new_tokens)
    return [ids[mask.bool()].tolist() for ids, mask in zip(rollout.completion_ids, rollout.completion_mask)]


def assert_greedy_under(policy: AudioLMPolicy, prompts, tokens: list[list[int]], tol: float = 1e-3) -> None:
    """Each token chosen greedily is the argmax of our model's own forward on [prompt ; the tokens so far]
    (teacher-forced), the audio tokens suppressed as both decodes do, up to ``tol`` in the logits: kernels that
    sum in other orders may break a near-tie otherwise (random weights make those common, and a greedy path never
    rejoins after one)."""
    width = max(map(len, tokens))
    ids = torch.full((len(tokens), width), policy.pad_token_id, dtype=torch.long)
    for b, row in enumerate(tokens):
        ids[b, : len(row)] = torch.tensor(row)
    full = torch.cat([prompts.input_ids, ids], 1)
    mask = torch.cat([prompts.attention_mask, torch.ones_like(ids)], 1)
    with torch.no_grad():
        logits = policy.hf_model(input_ids=full, attention_mask=mask, input_features=prompts.input_features,
                                 feature_attention_mask=prompts.feature_attention_mask).logits
    p = prompts.input_ids.shape[1]
    logits = logits[:, p - 1 : p - 1 + width].double()
    logits[..., policy.audio_token_ids] = -float("inf")
    for b, row in enumerate(tokens):
        for t, token in enumerate(row):
            gap = float(logits[b, t].max() - logits[b, t, token])
            assert gap <= tol, f"prompt {b}, token {t}: the engine's {token} is {gap:.2e} below our argmax"


# vLLM's CPU environment has no torchvision (its wheels link CUDA torch), which the Omni processors' image and
# video processors and one transformers module vLLM's Qwen-VL code imports need. As a ``sitecustomize`` on the
# PYTHONPATH of the test process and of the processes vLLM starts (it inspects models in a subprocess and spawns
# its engine core), this gives that module's ``smart_resize`` from transformers' PIL twin and makes the Omni
# processors load as ``families.load_processor`` loads them (audio and text only; the engine's
# ``limit_mm_per_prompt`` keeps images and video out). On a machine with torchvision it does nothing.
SHIM = '''
try:
    import torchvision  # noqa: F401
except ImportError:
    import sys
    import types

    import transformers
    from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as _pil

    _module = types.ModuleType("transformers.models.qwen2_vl.image_processing_qwen2_vl")
    _module.smart_resize = _pil.smart_resize
    sys.modules[_module.__name__] = _module

    from emorl_pl.modules.families import FAMILIES

    for _cls, _type in ((transformers.Qwen2_5OmniProcessor, "qwen2_5_omni"),
                        (transformers.Qwen3OmniMoeProcessor, "qwen3_omni_moe")):
        _cls.from_pretrained = classmethod(lambda cls, path, *args, _f=FAMILIES[_type], **kwargs: _f.load_processor(path))
'''
