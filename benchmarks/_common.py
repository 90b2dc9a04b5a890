"""Shared helpers of the benchmarks: synthetic batches, phase timers, peak memory, the model-work floor.

Every number a benchmark prints is a ratio against a baseline measured in the same process and run
(the floor, or the other trainer), so results from different machines are never compared directly.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil
import torch
from roofline import PHASES, Machine, StepShape, bound, step_work
from roofline import floor_seconds as roofline_floor
from torch import Tensor, nn

from emorl_pl.memory_plan import ModelGeometry, audio_tokens
from emorl_pl.plan_cli import geometry_from_config

LABELS = ("neutral", "happy", "angry", "sad")
SAMPLE_RATE = 16000
TMP = Path(tempfile.gettempdir())

# Benchmark shapes. "toy": the 1024-token BPE, 2 s window, d = 64 (measures Python overhead, the quick
# default). "realistic": Qwen2-Audio-7B-Instruct's tokenizer, 156,032-row vocabulary and 30 s encoder
# window with an encoder of d = 256 x 4 layers and a language model of d = 512 x 4 layers, 4 s of audio.
# ``hf_floor``: also time the Hugging Face ``generate`` floor (``floor_seconds``) after each step.
SHAPES: dict[str, dict[str, Any]] = {
    "toy": {"batch_size": 4, "group_size": 6, "max_new_tokens": 64, "seconds": 1.5, "warmup": 1, "reps": 5,
            "hf_floor": True},
    "realistic": {"batch_size": 4, "group_size": 6, "max_new_tokens": 64, "seconds": 4.0, "warmup": 1, "reps": 2,
                  "hf_floor": False},
}
REALISTIC_SIZES = {"hidden_size": 512, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 2048,
                   "audio_d_model": 256, "encoder_layers": 4, "audio_heads": 4, "audio_ffn": 1024}


def model_dir_for(shape: str, root: Path = TMP, family: str = "qwen2_audio") -> str:
    """The shape's model, built once under ``root`` (no downloads): ``family``'s toy (``emorl-toy-model``), or
    the real-shape Qwen2-Audio with ``REALISTIC_SIZES`` (``emorl_pl.modules.tiny.build_real_shape_qwen2_audio``)."""
    from emorl_pl.modules.tiny import build_real_shape_qwen2_audio, ensure_tiny_model
    from emorl_pl.toy_model import build_toy

    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {sorted(SHAPES)}, got {shape!r}")
    if shape == "toy":
        if family == "qwen2_audio":
            return str(ensure_tiny_model(root / "emorl_tiny_bench"))
        return str(build_toy(family, root / f"emorl_toy_bench_{family}"))
    if family != "qwen2_audio":
        raise ValueError(f"the realistic shape is built for qwen2_audio only, not {family!r}; use --shape toy")
    return str(build_real_shape_qwen2_audio(root / "emorl_realistic_bench_d512x4_a256x4", **REALISTIC_SIZES))


def hf_audio_tower(hf_model: nn.Module) -> nn.Module:
    """A Hugging Face audio-LM's audio encoder (for a model outside ``AudioLMPolicy``, e.g. TRL's)."""
    return getattr(hf_model, "audio_tower", None) or hf_model.model.audio_tower


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

        self._starts: dict[str, float] = {}
        self.entries: dict[str, int] = defaultdict(int)  # outermost spans opened per phase, ever

    def begin(self, phase: str) -> None:
        self._depth[phase] += 1
        if self._depth[phase] > 1:  # re-entered (e.g. rollout -> encode_prompts): the outer span counts
            return
        self.entries[phase] += 1
        sync()
        self._starts[phase] = time.perf_counter()

    def end(self, phase: str) -> None:
        self._depth[phase] -= 1
        if self._depth[phase] == 0:
            sync()
            self.current[phase] += time.perf_counter() - self._starts.pop(phase)

    def active(self, phase: str) -> bool:
        return self._depth[phase] > 0

    @contextlib.contextmanager
    def span(self, phase: str) -> Iterator[None]:
        self.begin(phase)
        try:
            yield
        finally:
            self.end(phase)

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

    def time_first_call(self, module: nn.Module, phase: str, within: str) -> None:
        """Time the first forward of ``module`` inside each span of ``within`` as ``phase`` (e.g. the
        decoder's first call in a rollout is the prompt's prefill; the fused decode step never calls it)."""
        seen = {"entry": 0}

        def pre(*_):
            if self.active(within) and seen["entry"] != self.entries[within]:
                seen["entry"] = self.entries[within]
                self.begin(phase)

        def post(*_):
            if self.active(phase):
                self.end(phase)

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    def time_optimizer(self, optimizer: torch.optim.Optimizer, phase: str) -> None:
        """Time every ``optimizer.step()`` (torch's step hooks)."""
        optimizer.register_step_pre_hook(lambda *_: self.begin(phase))
        optimizer.register_step_post_hook(lambda *_: self.end(phase))


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


# ------------------------------------------------------------------------------------------ roofline
def best_seconds(fn: Callable[[], Any], reps: int, device: torch.device) -> float:
    """The fastest of ``reps`` timed calls after one warm-up: a machine's attainable rate, not its average."""
    fn()
    best = float("inf")
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def matmul_flops_per_s(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """2 n^3 FLOPs of an (n x n) @ (n x n) matmul in ``dtype``, at the best of a few runs."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / best_seconds(lambda: a @ b, 5 if device.type == "cuda" else 3, device)


def memory_bytes_per_s(device: torch.device, size: int) -> float:
    """The better of a ``size``-byte copy (2 bytes moved per byte: read + write) and a sum (1 byte read)."""
    x = torch.ones(size // 4, device=device)
    y = torch.empty_like(x)
    copy = 2 * size / best_seconds(lambda: y.copy_(x), 5, device)
    return max(copy, size / best_seconds(lambda: x.sum(), 5, device))


def measure_machine(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                    quick: bool = False) -> Machine:
    """This machine's matmul FLOP/s (a large square matmul in ``dtype``) and memory bandwidth (a tensor far
    beyond any cache), each the best of a few runs, measured now: the roofline's rates."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    n = (8192 if cuda else 2048) // (2 if quick else 1)
    size = (2**31 if cuda else 2**28) // (8 if quick else 1)
    return Machine(flops_per_s=matmul_flops_per_s(device, dtype, n), bytes_per_s=memory_bytes_per_s(device, size))


def step_shape(args: Any, prompt_tokens: int, new_tokens: int, model_dir: str, bytes_per_value: int = 4,
               lora_rank: int | None = 8) -> tuple[ModelGeometry, StepShape]:
    """The roofline's model (from ``config.json``) and work (the run's B, G, beta; the prompt length and the
    completions' width as measured) of a benchmark run."""
    geometry = geometry_from_config(Path(model_dir) / "config.json")
    shape = StepShape(batch_size=args.batch_size, group_size=args.group_size, prompt_tokens=int(prompt_tokens),
                      new_tokens=int(new_tokens), audio_tokens=audio_tokens(args.seconds, geometry.window_seconds),
                      bytes_per_value=bytes_per_value, lora_rank=lora_rank, beta=args.beta)
    return geometry, shape


def measured_phases(step: Mapping[str, float]) -> dict[str, float]:
    """Our step's seconds per roofline phase, from ``PhaseTimer`` phases: the audio tower's own time,
    the rollout's first decoder call (prefill) and the rest of it (decode), the policy's log-prob forward +
    backward, the reference pass, the optimizer step; "other" is the rest of the step (processor, audio
    merge, rewards, advantages, clipping, logging, Lightning)."""
    prefill = step.get("prefill (share)", 0.0)
    out = {
        "audio encoder": step.get("audio tower (share)", 0.0),
        "prompt prefill": prefill,
        "decode": step.get("rollout (generate)", 0.0) - prefill,
        "policy forward+backward": step.get("logps policy (fwd)", 0.0) + step.get("backward", 0.0),
        "reference forward": step.get("logps ref (no grad)", 0.0),
        "optimizer": step.get("optimizer", 0.0),
    }
    out["other"] = step["step"] - sum(out.values())
    return out


def roofline_table(geometry: ModelGeometry, shape: StepShape, machines: Sequence[Machine],
                   steps: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Print each phase's floor against its measured time (medians over steps, each step against the rates
    measured right after it, so that a machine whose speed drifts is compared with itself); return the
    step's figures."""
    works = step_work(geometry, shape)
    floors = [roofline_floor(works, m) for m in machines]
    phases = [measured_phases(s) for s in steps]

    def med(values) -> float:
        return quantiles(list(values))["median"]

    rows = [[name, 1e3 * med(p[name] for p in phases), 1e3 * med(f[name] for f in floors),
             med(p[name] / max(f[name], 1e-12) for p, f in zip(phases, floors)), bound(works[name], machines[0]),
             works[name].flops / 1e9, works[name].bytes / 2**20] for name in PHASES]
    rows.append(["other (processor, merge, rewards, Lightning)", 1e3 * med(p["other"] for p in phases), 0.0,
                 float("inf"), "-", 0.0, 0.0])
    ratio = quantiles([s["step"] / f["step"] for s, f in zip(steps, floors)])
    rows.append(["step", 1e3 * med(s["step"] for s in steps), 1e3 * med(f["step"] for f in floors), ratio["median"],
                 "-", sum(w.flops for w in works.values()) / 1e9, sum(w.bytes for w in works.values()) / 2**20])
    flops = quantiles([m.flops_per_s / 1e9 for m in machines])
    bandwidth = quantiles([m.bytes_per_s / 1e9 for m in machines])
    print(f"\nmachine (measured after each step): matmul {flops['median']:.1f} GFLOP/s ({flops['min']:.1f}-"
          f"{flops['max']:.1f}), memory {bandwidth['median']:.1f} GB/s ({bandwidth['min']:.1f}-{bandwidth['max']:.1f}); "
          f"work: B={shape.batch_size} G={shape.group_size} P={shape.prompt_tokens} T={shape.new_tokens} "
          f"A={shape.audio_tokens} b={shape.bytes_per_value}")
    print_table("roofline floor per phase (ours, medians)",
                ["phase", "measured ms", "floor ms", "measured/floor", "bound", "GFLOP", "MiB moved"], rows)
    print(f"\nfloor / step = {1 / ratio['median']:.3f} (step = {ratio['median']:.2f} x floor, "
          f"min {ratio['min']:.2f}, max {ratio['max']:.2f})")
    if ratio["median"] < 1:  # a step cannot beat its floor: the machine's rates were measured low
        print("note: the step ran faster than its roofline floor, so the matmul / memory rates measured after it "
              "came out too low (a busy machine, or the small probe of --quick / --smoke); do not read the ratios")
    return {"floor_s": med(f["step"] for f in floors), "floor_over_step": 1 / ratio["median"],
            "step_over_roofline": ratio["median"]}
