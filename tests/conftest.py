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
