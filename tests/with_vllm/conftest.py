"""Fixtures of the vLLM tests (helpers: engine_setup.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from engine_setup import SHIM


@pytest.fixture(scope="module")
def torchvision_free(tmp_path_factory):
    """The Omni processors without torchvision, in this process and the ones vLLM starts (``engine_setup.SHIM``);
    for a module, by ``pytestmark = pytest.mark.usefixtures("torchvision_free")``."""
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
