"""Shared helpers of the benchmarks: synthetic batches, phase timers, peak memory, the model-work floor.

Every number a benchmark prints is a ratio against a baseline measured in the same process and run
(the floor, or the other trainer), so results from different machines are never compared directly.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import psutil
import torch
from torch import Tensor, nn

LABELS = ("neutral", "happy", "angry", "sad")
SAMPLE_RATE = 16000


def synthetic_batch(batch_size: int, seconds: float = 1.5, seed: int = 0) -> dict[str, Any]:
    """A batch in the DataModule's format with random waveforms (no corpus needed)."""
    g = torch.Generator().manual_seed(seed)
    n = int(seconds * SAMPLE_RATE)
    return {
        "waveforms": [0.1 * torch.randn(n, generator=g) for _ in range(batch_size)],
        "sample_rate": SAMPLE_RATE,
        "labels": [LABELS[(seed + j) % len(LABELS)] for j in range(batch_size)],
        "keys": [f"synthetic_{seed}_{j}" for j in range(batch_size)],
        "texts": [None] * batch_size,
        "corpus": ["synthetic"] * batch_size,
    }


def sync(device: torch.device | str | None = None) -> None:
    """Wait for queued device work, so wall-clock spans cover it (no-op on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize(device)


def quantiles(values: Sequence[float]) -> dict[str, float]:
    """median, min, max, q1, q3 of a sample (q1/q3 by ``statistics.quantiles``, inclusive)."""
    vals = sorted(values)
    if len(vals) >= 2:
        q1, _, q3 = statistics.quantiles(vals, n=4, method="inclusive")
    else:
        q1 = q3 = vals[0]
    return {"median": statistics.median(vals), "min": vals[0], "max": vals[-1], "q1": q1, "q3": q3}


class PhaseTimer:
    """Wall-clock seconds per named phase, per step; nested spans of one phase count once."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self.current: dict[str, float] = defaultdict(float)
        self._depth: dict[str, int] = defaultdict(int)

    @contextlib.contextmanager
    def span(self, phase: str) -> Iterator[None]:
        self._depth[phase] += 1
        if self._depth[phase] > 1:  # re-entered (e.g. rollout -> encode_prompts): the outer span counts
            try:
                yield
            finally:
                self._depth[phase] -= 1
            return
        sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            sync()
            self.current[phase] += time.perf_counter() - start
            self._depth[phase] -= 1

    def end_step(self, **totals: float) -> None:
        self.steps.append({**self.current, **totals})
        self.current = defaultdict(float)

    def wrap(self, obj: Any, name: str, phase: str | Callable[..., str]) -> None:
        """Replace ``obj.name`` by a timed wrapper; ``phase`` may pick the phase from the call's args."""
        fn = getattr(obj, name)

        def timed(*args, **kwargs):
            with self.span(phase(*args, **kwargs) if callable(phase) else phase):
                return fn(*args, **kwargs)

        setattr(obj, name, timed)

    def time_module(self, module: nn.Module, phase: str) -> None:
        """Time every forward of ``module`` (hooks; spans nest inside whichever phase called it)."""
        starts: list[float] = []

        def pre(*_):
            sync()
            starts.append(time.perf_counter())

        def post(*_):
            sync()
            self.current[phase] += time.perf_counter() - starts.pop()

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)


class CallCounter:
    """Counts forward calls of a module and the rows (utterances) it was called on."""

    def __init__(self, module: nn.Module) -> None:
        self.calls = 0
        self.rows = 0
        module.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output) -> None:
        self.calls += 1
        x = args[0] if args else kwargs.get("input_features")
        self.rows += int(x.shape[0]) if isinstance(x, Tensor) else 0

    def snapshot(self) -> tuple[int, int]:
        return self.calls, self.rows


class PeakMemory:
    """Peak memory of a span above its start: ``torch.cuda.max_memory_allocated`` on GPU, else the
    process RSS sampled every ``interval`` s by a thread (psutil).

    RSS is per process: the delta over a span is separable between two trainers that alternate in one
    process, but allocator caching (glibc arenas, torch's CPU allocator) can hide re-used memory, so a
    span that runs after a larger one may read low. Treat CPU numbers as indicative.
    """

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.proc = psutil.Process()
        self._peak = 0
        self.high = 0  # the highest level any span reached (bytes), for a footprint over many spans
        self._running = False
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while self._running:
            self._peak = max(self._peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def level(self) -> int:
        """Bytes in use now: CUDA allocated, else the process RSS."""
        return torch.cuda.memory_allocated() if torch.cuda.is_available() else self.proc.memory_info().rss

    @contextlib.contextmanager
    def measure(self, out: list[float]) -> Iterator[None]:
        """Append the span's peak above its start, in MiB, to ``out``."""
        if torch.cuda.is_available():
            sync()
            start = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            try:
                yield
            finally:
                sync()
                self.high = max(self.high, torch.cuda.max_memory_allocated())
                out.append((torch.cuda.max_memory_allocated() - start) / 2**20)
            return
        start = self.proc.memory_info().rss
        self._peak = start
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        try:
            yield
        finally:
            self._running = False
            self._thread.join()
            self._peak = max(self._peak, self.proc.memory_info().rss)
            self.high = max(self.high, self._peak)
            out.append((self._peak - start) / 2**20)


def floor_seconds(policy: Any, batch: dict[str, Any], instruction: str, group_size: int, max_new_tokens: int,
                  beta: float, temperature: float = 1.0) -> dict[str, float]:
    """Time of the model work one GRPO step cannot avoid, each piece alone, in seconds.

    floor = generate(B*G completions of exactly ``max_new_tokens`` tokens, from prompt embeddings)
          + policy forward+backward over the B*G (prompt ; completion) sequences
          + reference forward over them (only when beta > 0)

    The prompt embeddings (processor + audio tower) are computed beforehand and not counted; completions
    are forced to full length (EOS suppressed), an upper bound on the work of a step with the same limit.
    """
    hf = policy.hf_model
    prompts = policy.build_prompts(batch["waveforms"], batch["sample_rate"], instruction)
    with torch.no_grad():
        pe = policy.encode_prompts(prompts)
    embeds = pe.inputs_embeds.repeat_interleave(group_size, 0)
    attention = pe.attention_mask.repeat_interleave(group_size, 0)
    times: dict[str, float] = {}
    was_training = hf.training
    hf.eval()
    sync()
    start = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(inputs_embeds=embeds, attention_mask=attention, max_new_tokens=max_new_tokens,
                          min_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_p=1.0,
                          top_k=0, pad_token_id=policy.pad_token_id, suppress_tokens=policy.audio_token_ids,
                          use_cache=True)
    sync()
    times["generate"] = time.perf_counter() - start
    hf.train(was_training)
    completion = out if isinstance(out, Tensor) else out.sequences
    full_attention = torch.cat([attention, torch.ones_like(completion)], 1)
    t = completion.shape[1]

    def forward(model: nn.Module) -> Tensor:
        full = torch.cat([embeds, model.get_input_embeddings()(completion)], 1)
        logits = model(inputs_embeds=full, attention_mask=full_attention, logits_to_keep=t + 1).logits[:, :-1]
        return torch.log_softmax(logits.float() / temperature, -1).gather(-1, completion.unsqueeze(-1)).sum()

    sync()
    start = time.perf_counter()
    forward(policy.model).backward()
    sync()
    times["policy fwd+bwd"] = time.perf_counter() - start
    policy.model.zero_grad(set_to_none=True)
    if beta > 0:
        sync()
        start = time.perf_counter()
        with torch.no_grad(), policy.reference() as ref:
            forward(ref)
        sync()
        times["reference fwd"] = time.perf_counter() - start
    times["floor"] = sum(times.values())
    return times


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain fixed-width table."""
    cells = [[str(c) for c in header]] + [[c if isinstance(c, str) else f"{c:.3g}" for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for i, r in enumerate(cells):
        print("  " + "  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            print("  " + "  ".join("-" * w for w in widths))
