"""The rollout server's protocol without vLLM: a trainer-side ``ServerEngine`` against ``make_server`` in
front of a recording engine (the real engine behind it is tested in tests/with_vllm/test_vllm_server.py)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from emorl_pl.modules.vllm_engine import EngineSample, VLLMSettings
from emorl_pl.rollout_server import ServerEngine, make_server


class RecordingEngine:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def sample(self, texts, audio, sample_rate, n, **kw):
        self.calls.append(("sample", list(texts), [a.copy() for a in audio], sample_rate, n, kw))
        return [[EngineSample((i, j, 7), (-0.5, -1.25, -2.0)) for j in range(n)] for i in range(len(texts))]

    def load_weights(self, path):
        self.calls.append(("load_weights", path))
        if path.endswith("missing"):
            raise FileNotFoundError(path)


@pytest.fixture
def served():
    engine = RecordingEngine()
    server = make_server(engine, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield engine, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_sample_round_trip_keeps_prompts_audio_and_settings(served):
    engine, url = served
    client = ServerEngine(url)
    audio = [np.linspace(-1, 1, 5, dtype=np.float32), np.array([0.25, np.float32(1e-7)], dtype=np.float32)]
    out = client.sample(["a <|AUDIO|>", "b <|AUDIO|>"], audio, 16000, 3, max_new_tokens=9, temperature=0.7,
                        top_p=0.9, top_k=5, seeds=[1, 2])
    assert out == [[EngineSample((i, j, 7), (-0.5, -1.25, -2.0)) for j in range(3)] for i in range(2)]
    _, texts, got_audio, rate, n, kw = engine.calls[0]
    assert texts == ["a <|AUDIO|>", "b <|AUDIO|>"] and rate == 16000 and n == 3
    assert all(np.array_equal(a, b) for a, b in zip(got_audio, audio)), "audio must arrive bit-exact"
    assert kw == {"max_new_tokens": 9, "temperature": 0.7, "top_p": 0.9, "top_k": 5, "greedy": False, "seeds": [1, 2]}


def test_load_weights_sends_an_absolute_path_and_reports_server_errors(served, tmp_path):
    engine, url = served
    client = ServerEngine(url)
    client.load_weights(tmp_path / "w")
    assert engine.calls[-1] == ("load_weights", str((tmp_path / "w").resolve()))
    with pytest.raises(RuntimeError, match="500 .*FileNotFoundError"):
        client.load_weights(tmp_path / "missing")


def test_unreachable_server_is_a_clear_error():
    with pytest.raises(ConnectionError, match="no emorl-rollout-server answers at http://127.0.0.1:9"):
        ServerEngine("http://127.0.0.1:9", timeout=5)


def test_server_mode_needs_a_url():
    with pytest.raises(ValueError, match="server_url"):
        VLLMSettings(mode="server")
    with pytest.raises(ValueError, match="vllm.mode"):
        VLLMSettings(mode="remote")
