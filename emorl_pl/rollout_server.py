"""``emorl-rollout-server``: one vLLM engine serving rollouts to any number of trainer ranks over HTTP.

    emorl-rollout-server --model-dir runs/x/model --port 8000 [--dtype bfloat16 --max-model-len 4096 ...]

It runs where vLLM is installed (its own environment, other GPUs or another node); the trainers need no
vLLM: they send the rendered prompts and the audio and get token ids and sampling log-probs back
(``ServerEngine``, selected by ``vllm: {mode: server, server_url: http://HOST:PORT}`` on the policy).
Weights: a trainer writes them in the hub key layout to a folder the server can read (a shared filesystem)
and asks the server to reload from it (``POST /load_weights``).

The protocol is JSON over HTTP (the standard library on both sides): ``POST /sample`` with
``{texts, audio: [base64 float32], sample_rate, n, max_new_tokens, temperature, top_p, top_k, greedy,
seeds}``, answered ``{samples: [[{token_ids, logprobs}, ...], ...]}``; ``POST /load_weights`` with
``{path}``; ``GET /health``. Requests are served one at a time (the engine batches each request's prompts).
"""

from __future__ import annotations

import argparse
import base64
import json
import signal
import threading
import urllib.error
import urllib.request
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from emorl_pl.modules.vllm_engine import EngineSample, VLLMSettings


def _encode_audio(wave: Any) -> str:
    return base64.b64encode(np.ascontiguousarray(wave, dtype=np.float32).tobytes()).decode("ascii")


def _decode_audio(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=np.float32).copy()


class ServerEngine:
    """The client: the same ``sample`` / ``load_weights`` as ``VLLMColocateEngine``, against a server."""

    def __init__(self, url: str, timeout: float = 600.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        try:
            self._call("GET", "/health")
        except OSError as e:
            raise ConnectionError(f"no emorl-rollout-server answers at {self.url} ({e}); start one with "
                                  "emorl-rollout-server --model-dir DIR --port PORT") from e

    def _call(self, method: str, route: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + route, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"emorl-rollout-server {self.url}{route}: {e.code} {e.read().decode()[:2000]}") from e

    def sample(self, texts: Sequence[str], audio: Sequence[Any], sample_rate: int, n: int, *, max_new_tokens: int,
               temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, greedy: bool = False,
               seeds: Sequence[int] | None = None) -> list[list[EngineSample]]:
        reply = self._call("POST", "/sample", {
            "texts": list(texts), "audio": [_encode_audio(w) for w in audio], "sample_rate": int(sample_rate),
            "n": int(n), "max_new_tokens": int(max_new_tokens), "temperature": float(temperature),
            "top_p": float(top_p), "top_k": int(top_k), "greedy": bool(greedy),
            "seeds": None if seeds is None else [int(s) for s in seeds],
        })
        return [[EngineSample(tuple(s["token_ids"]), tuple(s["logprobs"])) for s in group] for group in reply["samples"]]

    def load_weights(self, model_dir: str | Path) -> None:
        self._call("POST", "/load_weights", {"path": str(Path(model_dir).resolve())})

    def release(self) -> None:
        """Nothing to free on the trainer's side: the server's engine lives on its own devices."""


def make_server(engine: Any, host: str, port: int) -> ThreadingHTTPServer:
    """An HTTP server in front of ``engine`` (anything with ``sample`` / ``load_weights``)."""
    lock = threading.Lock()  # one engine call at a time: vLLM's LLM is not re-entrant

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            self._reply(200, {"ok": True}) if self.path == "/health" else self._reply(404, {"error": self.path})

        def do_POST(self) -> None:  # noqa: N802
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                with lock:
                    if self.path == "/sample":
                        samples = engine.sample(
                            body["texts"], [_decode_audio(a) for a in body["audio"]], body["sample_rate"], body["n"],
                            max_new_tokens=body["max_new_tokens"], temperature=body["temperature"],
                            top_p=body["top_p"], top_k=body["top_k"], greedy=body["greedy"], seeds=body["seeds"])
                        self._reply(200, {"samples": [[{"token_ids": list(s.token_ids), "logprobs": list(s.logprobs)}
                                                       for s in group] for group in samples]})
                    elif self.path == "/load_weights":
                        engine.load_weights(body["path"])
                        self._reply(200, {"ok": True})
                    else:
                        self._reply(404, {"error": f"no route {self.path}"})
            except Exception as e:  # the trainer gets the reason, the server goes on
                self._reply(500, {"error": f"{type(e).__name__}: {e}"})

        def log_message(self, format: str, *args: Any) -> None:  # quiet: one line per request is noise
            return

    return ThreadingHTTPServer((host, port), Handler)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="emorl-rollout-server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", required=True, help="model folder in the hub key layout")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    defaults = VLLMSettings()
    parser.add_argument("--dtype", default=defaults.dtype)
    parser.add_argument("--max-model-len", type=int, default=defaults.max_model_len)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--stop-token-ids", default="", help="comma-separated; default: the tokenizer's "
                                                             "<|im_end|> and eos")
    parser.add_argument("--suppress-token-ids", default="", help="comma-separated; default: the audio tokens")
    args = parser.parse_args(argv)
    if not Path(args.model_dir, "config.json").is_file():
        parser.error(f"--model-dir {args.model_dir}: no config.json (a saved model folder is expected)")
    if args.port < 0 or args.port > 65535:
        parser.error(f"--port must be in 0..65535, got {args.port}")
    stops, suppressed = _special_ids(args.model_dir)
    if args.stop_token_ids:
        stops = [int(t) for t in args.stop_token_ids.split(",")]
    if args.suppress_token_ids:
        suppressed = [int(t) for t in args.suppress_token_ids.split(",")]
    from emorl_pl.modules.vllm_engine import VLLMColocateEngine

    settings = VLLMSettings(max_model_len=args.max_model_len, dtype=args.dtype,
                            gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager)
    engine = VLLMColocateEngine(args.model_dir, settings, stop_token_ids=stops, suppressed_token_ids=suppressed)
    server = make_server(engine, args.host, args.port)

    def stop(signum: int, frame: Any) -> None:  # SIGTERM as Ctrl-C: leave serve_forever and clean up below
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    print(f"emorl-rollout-server: serving {args.model_dir} on http://{args.host}:{server.server_port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("emorl-rollout-server: stopping", flush=True)
    finally:
        server.server_close()
        engine.close()


def _special_ids(model_dir: str) -> tuple[list[int], list[int]]:
    """The policy's stop and suppressed ids, from the model's tokenizer (as ``AudioLMPolicy.load`` takes them)."""
    from transformers import AutoConfig, AutoTokenizer

    from emorl_pl.modules.families import family_for

    tok = AutoTokenizer.from_pretrained(model_dir)
    vocab = tok.get_vocab()
    family = family_for(AutoConfig.from_pretrained(model_dir).model_type, str(Path(model_dir) / "config.json"))
    stops = [vocab[t] for t in ("<|im_end|>",) if t in vocab] + ([tok.eos_token_id] if tok.eos_token_id is not None else [])
    return list(dict.fromkeys(stops)), sorted({vocab[t] for t in family.audio_token_names if t in vocab})


if __name__ == "__main__":
    main()
