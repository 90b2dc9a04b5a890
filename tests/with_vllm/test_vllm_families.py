"""vLLM 0.32 serves the Omni thinkers from their real-shape test models (whole-Omni layout, emorl_pl.modules.tiny),
widened to what vLLM's CPU attention takes (head_dim 64), one engine per family: its greedy tokens are our
thinker's own argmax (up to near-ties), its sampling log-probs are ours, and it reloads in place the weights
``save_in_hub_layout`` writes (the engine sync's format). CPU vLLM environment only (``bash scripts/vllm_cpu_env.sh``; ``VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/pytest
tests/with_vllm``).

That environment has no torchvision (its wheels link CUDA torch), which the Omni processors' image and video
processors and one transformers module vLLM's Qwen-VL code imports need. A ``sitecustomize`` shim, on the
PYTHONPATH of this process and of the processes vLLM starts (it inspects models in a subprocess and spawns its
engine core), gives that module's ``smart_resize`` from transformers' PIL twin and makes the Omni processors
load as ``families.load_processor`` loads them (audio and text only, ``limit_mm_per_prompt`` keeps images and
video out). On a machine with torchvision the shim does nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from emorl_pl.modules.hub_layout import save_in_hub_layout
from emorl_pl.modules.policy import AudioLMPolicy
from emorl_pl.modules.vllm_engine import VLLMColocateEngine

SR = 16000
INSTRUCTION = "Which emotion does the speaker express? Answer with one word."
MAX_NEW = 16

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


@pytest.fixture(scope="module", autouse=True)
def torchvision_free(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shim")
    (folder / "sitecustomize.py").write_text(SHIM)
    repo = str(Path(__file__).resolve().parents[2])
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(folder), repo, old) if p)
    exec(compile(SHIM, "sitecustomize", "exec"), {})
    yield
    if old is None:
        os.environ.pop("PYTHONPATH")
    else:
        os.environ["PYTHONPATH"] = old


def _waves(n: int = 3, seed: int = 0) -> list[torch.Tensor]:
    """Utterances of 1.0-2.0 s: a voiced-like tone with noise, different per utterance."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        t = np.arange(int(SR * (1.0 + 0.5 * i))) / SR
        wave = 0.3 * np.sin(2 * np.pi * (120 + 40 * i) * t) + 0.05 * rng.standard_normal(t.size)
        out.append(torch.tensor(wave, dtype=torch.float32))
    return out


def _engine(model_dir: Path, policy: AudioLMPolicy) -> VLLMColocateEngine:
    """The project's engine wrapper around an ``LLM`` for audio-only prompts (no image/video profiling)."""
    from vllm import LLM

    engine = object.__new__(VLLMColocateEngine)
    engine.llm = LLM(model=str(model_dir), dtype="float32", max_model_len=1024, enforce_eager=True, seed=0,
                     logprobs_mode="processed_logprobs", limit_mm_per_prompt={"audio": 1, "image": 0, "video": 0})
    engine.sleeps = engine._asleep = False
    engine.stop_token_ids = list(policy.eos_token_ids)
    engine.logit_bias = {int(t): -100.0 for t in policy.audio_token_ids}
    return engine


def _engine_greedy(engine: VLLMColocateEngine, prompts) -> list[list[int]]:
    return [list(group[0].token_ids) for group in
            engine.sample(prompts.texts, prompts.audio, SR, 1, max_new_tokens=MAX_NEW, greedy=True)]


def _assert_greedy_under(policy: AudioLMPolicy, prompts, tokens: list[list[int]], tol: float = 1e-3) -> None:
    """Each token the engine chose greedily is the argmax of our thinker's own forward on [prompt ; the engine's
    tokens so far] (teacher-forced), the audio tokens suppressed as both decodes do, up to ``tol`` in the logits:
    kernels that sum in other orders may break a near-tie otherwise (random weights make those common, and a
    greedy path never rejoins after one)."""
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


def _build_qwen2_5_omni(folder: Path) -> Path:
    from emorl_pl.modules.tiny import build_real_shape_qwen2_5_omni

    return build_real_shape_qwen2_5_omni(folder, hidden_size=128, num_heads=2, num_kv_heads=1, audio_heads=1)


def _build_qwen3_omni(folder: Path) -> Path:
    from emorl_pl.modules.tiny import build_real_shape_qwen3_omni

    return build_real_shape_qwen3_omni(folder, hidden_size=128, num_heads=2, num_kv_heads=1, head_dim=64,
                                       audio_heads=1)


@pytest.mark.parametrize("build", [_build_qwen2_5_omni, _build_qwen3_omni], ids=["qwen2_5_omni", "qwen3_omni_moe"])
def test_vllm_serves_the_thinker_and_reloads_its_weights(build, tmp_path):
    model_dir = build(tmp_path / "model")
    policy = AudioLMPolicy(str(model_dir), lora=None, dropout=False).load()
    engine = _engine(model_dir, policy)
    prompts = policy.build_prompts(_waves(), SR, INSTRUCTION)
    assert all(text.count(policy.processor.audio_token) == 1 for text in prompts.texts)  # vLLM expands it
    before = _engine_greedy(engine, prompts)
    assert min(map(len, before)) > 4
    _assert_greedy_under(policy, prompts, before)
    # sampled: the engine's log-probs of its tokens are ours (temperature 0.8)
    from emorl_pl.grpo import completion_mask, is_truncated
    from emorl_pl.modules.sampling import Rollout
    from emorl_pl.modules.vllm_engine import pack_completions

    samples = engine.sample(prompts.texts, prompts.audio, SR, 2, max_new_tokens=MAX_NEW, temperature=0.8,
                            seeds=[11, 12, 13])
    ids, logps = pack_completions(samples, MAX_NEW, policy.pad_token_id)
    mask = completion_mask(ids, policy.eos_token_ids)
    rollout = Rollout(policy.encode_prompts(prompts), ids, mask, is_truncated(ids, policy.eos_token_ids),
                      [""] * len(ids), 2, sampling_logps=logps)
    with torch.no_grad():
        ours = policy.completion_logps(rollout, temperature=0.8)
    diff = (ours - logps).abs()[mask.bool()]
    assert diff.numel() > 20 and diff.max().item() < 1e-3, diff.max().item()
    # an update to the language model, saved as the engine sync saves it, reloaded in place
    with torch.no_grad():
        torch.manual_seed(0)
        for p in policy.family.decoder(policy.hf_model).parameters():
            if p.dim() == 2:
                p.add_(0.05 * torch.randn_like(p))
    save_in_hub_layout(policy.hf_model, tmp_path / "step1")
    engine.load_weights(tmp_path / "step1")
    after = _engine_greedy(engine, prompts)
    assert after != before, "the update must change the greedy decode"
    _assert_greedy_under(policy, prompts, after)
