"""Our GRPO step vs TRL 1.16's ``GRPOTrainer`` on the same audio-LM, batch and hyper-parameters.

    pip install -e ".[bench]"                        # trl==1.16.0
    python benchmarks/vs_trl.py                      # toy Qwen2-Audio, B=4, G=6, 64 tokens, 5 reps each
    python benchmarks/vs_trl.py --shape realistic    # real vocabulary + 30 s window, 4 s audio, 2 reps each
    python benchmarks/vs_trl.py --family audioflamingo3   # another family's toy (emorl-toy-model)

``--family``: qwen2_audio (default), audioflamingo3, qwen2_5_omni, qwen3_omni, on the family's toy (the realistic
shape is Qwen2-Audio's only). Where TRL's GRPOTrainer cannot run the model at all (``trl_blocker``: the Omni
thinkers, whose base model is the thinker itself, so TRL's fused LM head cannot reach their hidden states), the
script says why and exits with status 2.

Both sides load the same weights from one model dir, train the same LoRA (same target modules, r,
alpha), and see the same B utterances every step with the same G, max_new_tokens, temperature, loss
type, beta, learning rate and gradient clipping. TRL is extended only to carry the audio, the way
R1-AQA's fork of GRPOTrainer does for Qwen2-Audio: the processor builds prompt inputs with the audio,
``generate`` runs on input_ids + input_features, and each log-prob pass re-runs the full model forward
on input_ids + input_features of the rows it scores (``AudioGRPOTrainer`` below).

The two trainers run alternately, one step each, each in its own process: each runs its own real loop
(``Trainer.fit`` / ``GRPOTrainer.train``) in that process's main thread, and a baton (a cross-process
condition) passes at step boundaries, so drift in the machine's speed hits both alike. Not threads of one
process: on CPU, torch ops issued from a non-main thread run several times slower for small tensors (the
OpenMP pool's wake-up; measured 2x on this step, 8x on a 24x64 matmul), which would time the harness, not
the trainers. Memory, in each trainer's own process (CUDA: allocated; CPU: sampled RSS, see
``_common.PeakMemory``): "peak" is per step above that step's start (allocator caching makes it read low
on CPU once buffers are reused), "footprint" the highest level over all steps above the level before the
first step (what training adds to the loaded model: optimizer state, caches, activations). After both
loops end, in our process: the Hugging Face floor (``_common.floor_seconds``, with ``--hf-floor``: the
toy's default) alone as many times as there were steps, and this machine's matmul FLOP/s and memory
bandwidth for the roofline floor (``roofline.py``), printed per phase of our step. Printed: medians, ratios
ours/TRL with min-max and IQR over repetitions, step/floor, and the size of the (rows, T, V) logits and
their gradient that a log-prob pass materialising them would hold, against our footprint.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import queue
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    CallCounter,
    PeakMemory,
    PhaseTimer,
    floor_seconds,
    measure_machine,
    model_dir_for,
    print_table,
    quantiles,
    roofline_table,
    step_shape,
    sync,
    synthetic_batch,
)
from grpo_step import (  # noqa: E402
    OptimizerTiming,
    build_module,
    count_rollouts,
    instrument,
    parse_step_args,
    prompt_tokens,
    set_threads,
    step_arguments,
)
from roofline import Machine, logits_bytes  # noqa: E402

from emorl_pl.modules.families import AudioLMFamily, family_for, import_class  # noqa: E402
from emorl_pl.modules.policy import AudioLMPolicy  # noqa: E402
from emorl_pl.toy_model import FAMILIES as TOY_FAMILIES  # noqa: E402

# The keyword under which a family's forward / generate take the mel frames' mask (the processors we load
# return it as ``feature_attention_mask``: AF3's as renamed by ``families._af3_processor_class``).
FEATURE_MASK_KWARG = {"audioflamingo3": "input_features_mask"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = step_arguments(__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=TOY_FAMILIES, default="qwen2_audio",
                        help="model family of the toy both trainers train (default qwen2_audio)")
    args = parse_step_args(parser, argv)
    args.dtype, args.num_iterations, args.micro_batch_size = "float32", 1, None  # what TRL's side runs
    return args


class Baton:
    """Two loops in two processes take turns, one step each; a finished loop stops blocking the other."""

    NAMES = ("ours", "trl")

    def __init__(self, ctx) -> None:
        self.cond = ctx.Condition()
        self.turn = ctx.Value("i", 0, lock=False)  # index into NAMES; guarded by cond
        self.done = ctx.Array("b", [0, 0], lock=False)

    def _me(self, me: str) -> tuple[int, int]:
        i = self.NAMES.index(me)
        return i, 1 - i

    def acquire(self, me: str) -> None:
        i, other = self._me(me)
        with self.cond:
            self.cond.wait_for(lambda: self.turn.value == i or self.done[other])

    def release(self, me: str, finished: bool = False) -> None:
        i, other = self._me(me)
        with self.cond:
            self.turn.value = other
            if finished:
                self.done[i] = 1
            self.cond.notify_all()

    def wait_all_done(self) -> None:
        """After the last step: nothing of this process may overlap the other's timed steps."""
        with self.cond:
            self.cond.wait_for(lambda: all(self.done))


class Side:
    """Per-step records of one trainer: wall time, peak memory, completion tokens, audio-tower calls."""

    def __init__(self, name: str, baton: Baton, steps: int, tower: torch.nn.Module, memory: PeakMemory,
                 timer: PhaseTimer | None = None, rates: Callable[[], Machine] | None = None) -> None:
        self.name, self.baton, self.steps, self.memory, self.timer = name, baton, steps, memory, timer
        self.rates = rates  # the machine's rates, measured after each step while this side holds the baton
        self.machines: list[Machine] = []
        self.counter = CallCounter(tower)
        self.times: list[float] = []
        self.peaks: list[float] = []
        self.tokens: list[float] = []
        self.widths: list[int] = []
        self.calls: list[int] = []
        self.rows: list[int] = []
        self.last_tokens, self.last_width = float("nan"), 0
        self.holding = False
        self.base: int | None = None  # memory level before the first step

    def begin(self) -> None:
        if self.base is None:
            self.base = self.memory.level()  # after loading, before the first step: what training adds
        # A turn runs from one step's begin to the next: what a loop does between steps (TRL's data
        # loader turns the audio arrays into Python lists there) must not overlap the other's timed step.
        if self.holding:
            self.baton.release(self.name)
        self.baton.acquire(self.name)
        self.holding = True
        self._counts = self.counter.snapshot()
        self._mem = self.memory.measure(self.peaks)
        self._mem.__enter__()
        sync()
        self._start = time.perf_counter()

    def end(self) -> None:
        sync()
        self.times.append(time.perf_counter() - self._start)
        self._mem.__exit__(None, None, None)
        calls, rows = self.counter.snapshot()
        self.calls.append(calls - self._counts[0])
        self.rows.append(rows - self._counts[1])
        self.tokens.append(self.last_tokens)
        self.widths.append(self.last_width)
        if self.timer is not None:  # our phases: the step's total is this span's
            self.timer.end_step(step=self.times[-1])
        if self.rates is not None:
            self.machines.append(self.rates())
        if len(self.times) >= self.steps:
            self.baton.release(self.name, finished=True)
            self.holding = False
            self.baton.wait_all_done()

    def record(self) -> dict:
        return {"times": self.times, "peaks": self.peaks, "tokens": self.tokens, "widths": self.widths,
                "calls": self.calls, "rows": self.rows, "footprint": (self.memory.high - self.base) / 2**20,
                "phases": self.timer.steps if self.timer is not None else [], "machines": self.machines}


# ------------------------------------------------------------------------------------------------ TRL
def model_family(model_dir: str) -> AudioLMFamily:
    from transformers import AutoConfig

    return family_for(AutoConfig.from_pretrained(model_dir).model_type, f"{model_dir}/config.json")


def trl_blocker(model_dir: str) -> str | None:
    """Why TRL 1.16's GRPOTrainer cannot train this model at all, or None. Its log-probs come only from the
    fused LM head (``trl.trainer.utils.add_fused_lm_head``, patched onto every model in ``GRPOTrainer.__init__``),
    which runs ``model.base_model`` and reads that output's ``last_hidden_state``. A model whose
    ``base_model_prefix`` names no submodule has ``base_model`` = itself (the Omni thinkers: prefix "thinker",
    text model at ``.model``), so the head calls the whole model back, which returns logits, not hidden states."""
    from transformers import AutoConfig

    family = model_family(model_dir)
    model_class = import_class(family.model_class)
    with torch.device("meta"):  # the module tree only, no weights
        model = model_class(family.model_config(AutoConfig.from_pretrained(model_dir)))
    prefix = model_class.base_model_prefix
    if model.base_model is model:
        return (f"TRL {_trl_version()} cannot run {model_class.__name__} ({family.model_type}): GRPOTrainer computes "
                f"every log-prob through its fused LM head (trl.trainer.utils.add_fused_lm_head), which calls "
                f"model.base_model and reads last_hidden_state; this class's base_model_prefix is {prefix!r}, a "
                f"submodule it does not have, so base_model is the model itself and returns logits (AttributeError: "
                f"no last_hidden_state). Nothing to compare against on this family.")
    return None


def _trl_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("trl")
    except PackageNotFoundError:
        return "(not installed)"


def build_trl(args: argparse.Namespace, model_dir: str, batch: dict, instruction: str, lora_targets: str,
              reward_set, audio_token_ids: list[int], side_factory):
    """TRL's GRPOTrainer with the audio carried R1-AQA style; returns (trainer, the Side that times it)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    family = model_family(model_dir)
    processor = family.load_processor(model_dir)  # the processor our policy uses (AF3's, Omni's audio-only)
    processor.tokenizer.padding_side = "left"
    fe = processor.feature_extractor
    mask_kwarg = FEATURE_MASK_KWARG.get(family.model_type, "feature_attention_mask")

    class AudioGRPOTrainer(GRPOTrainer):
        """GRPOTrainer + audio-LM inputs: the smallest set of overrides that carries the audio."""

        def _generate_and_score_completions(self, inputs):
            self._batch_audio = [np.asarray(x["audio"], dtype=np.float32) for x in inputs]
            out = super()._generate_and_score_completions(inputs)
            out["input_features"], out[mask_kwarg] = self._audio_fields
            side.last_tokens = float(out["completion_mask"].sum())
            return out

        def _tokenize_prompts(self, prompts):
            # R1-AQA: the processor builds the prompt inputs with the audio (features for every row).
            enc = self.processing_class(text=prompts, audio=self._batch_audio, sampling_rate=fe.sampling_rate,
                                        padding=True, return_tensors="pt")
            ids = [row[m.bool()].tolist() for row, m in zip(enc["input_ids"], enc["attention_mask"])]
            device = self.accelerator.device
            fields = {"input_features": enc["input_features"].to(device),
                      mask_kwarg: enc["feature_attention_mask"].to(device)}
            self._audio_fields = (fields["input_features"], fields[mask_kwarg])
            return ids, None, fields

        def _compute_loss(self, model, inputs):
            self._audio_fields = (inputs["input_features"], inputs[mask_kwarg])
            return super()._compute_loss(model, inputs)

        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                               batch_size=None, compute_entropy=False, compute_aux_loss=False,
                                               **_):
            # TRL's loop, plus the audio of the scored rows (R1-AQA: forward on input_ids + input_features).
            features, feature_mask = self._audio_fields
            batch_size = batch_size or input_ids.size(0)
            logps, entropies = [], []
            for start in range(0, input_ids.size(0), batch_size):
                end = min(start + batch_size, input_ids.size(0))
                ids, mask = input_ids[start:end], attention_mask[start:end]
                labels = ids.masked_fill(mask == 0, -100)
                labels[:, :-logits_to_keep] = -100
                with self.accelerator.autocast():
                    out = model(input_ids=ids, attention_mask=mask, input_features=features[start:end],
                                **{mask_kwarg: feature_mask[start:end]}, labels=labels, fused_lm_head=True)
                logps.append(out.log_probs[:, -logits_to_keep:])
                if compute_entropy:
                    entropies.append(out.entropy[:, -logits_to_keep:])
            return torch.cat(logps), (torch.cat(entropies) if compute_entropy else None), None

    texts = []
    for _ in batch["waveforms"]:
        conversation = [{"role": "user", "content": [{"type": "audio", "audio": "<waveform>"}, {"type": "text", "text": instruction}]}]
        texts.append(processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False))
    dataset = Dataset.from_list([
        {"prompt": t, "audio": w[: fe.n_samples].numpy(), "label": label}
        for t, w, label in zip(texts, batch["waveforms"], batch["labels"])
    ])

    def reward(prompts, completions, label, **kwargs):  # the same RewardSet as ours
        return reward_set(completions, list(label), progress=0.0).total

    B, G = args.batch_size, args.group_size
    steps = args.warmup + args.reps
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_bench_"),
        per_device_train_batch_size=B * G,
        gradient_accumulation_steps=1,
        num_generations=G,
        max_completion_length=args.max_new_tokens,
        temperature=args.temperature,
        top_p=1.0,
        top_k=0,
        beta=args.beta,
        loss_type=args.loss_type,
        epsilon=0.2,
        scale_rewards="group",
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_steps=steps,
        num_train_epochs=steps,
        logging_steps=10**6,
        save_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        generation_kwargs={"suppress_tokens": audio_token_ids},
        disable_tqdm=True,
        seed=0,
    )
    model = import_class(family.model_class).from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    family.audio_tower(model).requires_grad_(False)
    # TRL suppresses ``config.image_token_id`` for any processor; our generation_kwargs override it anyway.
    model.config.image_token_id = family.audio_token_id(model)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=lora_targets, bias="none")
    trainer = AudioGRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                               processing_class=processor, peft_config=lora)
    side = side_factory(family.audio_tower(model))

    class Timing(TrainerCallback):
        def on_step_begin(self, *a, **k):
            side.begin()

        def on_step_end(self, *a, **k):
            side.end()

    trainer.add_callback(Timing())
    return trainer, side


# ------------------------------------------------------------------------------------------------ ours
class OursTiming(L.Callback):
    def __init__(self, side: Side) -> None:
        self.side = side

    def on_train_batch_start(self, *a) -> None:
        self.side.begin()

    def on_train_batch_end(self, *a) -> None:
        self.side.end()


def _run_ours(args, model_dir: str, baton: Baton, batch: dict) -> dict:
    module = build_module(args, model_dir)
    policy: AudioLMPolicy = module.policy.load()
    timer = PhaseTimer()
    instrument(module, timer)
    ours = Side("ours", baton, args.warmup + args.reps, policy.direct_call_modules()["audio_tower"], PeakMemory(),
                timer, rates=lambda: measure_machine(module.device, quick=args.quick))
    count_rollouts(policy, ours)
    trainer = L.Trainer(max_steps=ours.steps, accelerator="auto", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[OursTiming(ours), OptimizerTiming(timer)])
    trainer.fit(module, torch.utils.data.DataLoader([batch] * ours.steps, batch_size=None))
    # After both loops have finished their steps (so that these allocations do not count in our footprint,
    # and nothing else runs): the HF floor once per step, the prompt's length.
    floors = [floor_seconds(policy, batch, module.instruction, args.group_size, args.max_new_tokens, args.beta,
                            args.temperature) for _ in range(ours.steps if args.hf_floor else 0)]
    return {**ours.record(), "floors": floors, "device": str(trainer.strategy.root_device),
            "prompt_tokens": prompt_tokens(policy, batch, module.instruction)}


def _run_trl(args, model_dir: str, baton: Baton, batch: dict, shared: dict) -> dict:
    reward_set = build_module(args, model_dir).reward_set  # the policy is not loaded by this
    trainer, theirs = build_trl(
        args, model_dir, batch, shared["instruction"], shared["lora_targets"], reward_set,
        shared["audio_token_ids"], lambda tower: Side("trl", baton, args.warmup + args.reps, tower, PeakMemory()),
    )
    trainer.train()
    return theirs.record()


def _side_process(name: str, args, model_dir: str, baton: Baton, shared: dict, results) -> None:
    """One trainer in its own process; its records (or its error) go back through ``results``."""
    try:
        set_threads(args)
        torch.manual_seed(0)
        batch = synthetic_batch(args.batch_size, args.seconds, seed=0)  # the same B utterances on both sides
        if name == "ours":
            record = _run_ours(args, model_dir, baton, batch)
        else:
            record = _run_trl(args, model_dir, baton, batch, shared)
        results.put((name, record, None))
    except BaseException as e:  # noqa: BLE001 - reported by the parent
        import traceback

        results.put((name, None, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        baton.release(name, finished=True)  # never leave the other side waiting


def run_sides(args, model_dir: str, shared: dict) -> dict[str, dict]:
    """Both trainers, each in its own process, alternating; their records (or the first error)."""
    ctx = mp.get_context("spawn")  # fresh interpreters: no forked torch state, each loop in a main thread
    baton, results = Baton(ctx), ctx.Queue()
    procs = {name: ctx.Process(target=_side_process, args=(name, args, model_dir, baton, shared, results))
             for name in Baton.NAMES}
    for proc in procs.values():
        proc.start()
    records: dict[str, dict] = {}
    try:
        while len(records) < len(procs):
            try:
                name, record, error = results.get(timeout=5)
            except queue.Empty:
                dead = [n for n, p in procs.items() if n not in records and not p.is_alive()]
                if dead:
                    raise RuntimeError(
                        f"vs_trl: the {dead[0]} process died (exit code {procs[dead[0]].exitcode})") from None
                continue
            if error is not None:
                raise RuntimeError(f"vs_trl: the {name} side failed:\n{error}")
            records[name] = record
    except BaseException:
        for proc in procs.values():  # a failed or interrupted run leaves no trainer behind
            proc.terminate()
        raise
    for proc in procs.values():
        proc.join()
    return records


# The targets at the realistic shape (printed as met or not; nothing fails on them).
TARGETS = {"trl_over_ours": (">=", 8.0), "footprint_ours_over_trl": ("<=", 0.35), "ours_over_roofline": ("<=", 1.7)}


def target_rows(summary: dict[str, float]) -> list[list]:
    rows = []
    for key, (op, goal) in TARGETS.items():
        value = summary[key]
        met = value >= goal if op == ">=" else value <= goal
        rows.append([key, value, f"{op} {goal:g}", "met" if met else "not met"])
    return rows


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    try:
        model_dir = args.model or model_dir_for(args.shape, family=args.family)
    except ValueError as err:
        print(f"vs_trl: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    blocker = trl_blocker(model_dir)
    if blocker:
        print(f"vs_trl: {blocker}", file=sys.stderr)
        raise SystemExit(2)
    # What both sides must agree on, read once here (the policy is loaded on the CPU and dropped).
    module = build_module(args, model_dir)
    policy = module.policy.load()
    shared = {"instruction": module.instruction,
              "lora_targets": policy.model.peft_config["default"].target_modules,  # the regex ours trains
              "audio_token_ids": list(policy.audio_token_ids)}
    micro_rows = module.hparams.micro_batch_size
    del module, policy
    records = run_sides(args, model_dir, shared)

    ours, theirs = records["ours"], records["trl"]
    w = args.warmup
    o, t = ours["times"][w:], theirs["times"][w:]
    floors = ours["floors"][w:]
    f = quantiles([x["floor"] for x in floors])["median"] if floors else float("nan")
    ratio = quantiles([a / b for a, b in zip(o, t)])
    print(f"device={ours['device']} shape={args.shape} family={model_family(model_dir).model_type} model={model_dir} B={args.batch_size} G={args.group_size} "
          f"max_new_tokens={args.max_new_tokens} seconds={args.seconds} beta={args.beta} loss={args.loss_type} "
          f"reps={args.reps} (after {w} warm-up, alternating, one process each)")

    def row(name: str, side: dict, times):
        q = quantiles(times)
        tokens = quantiles(side["tokens"][w:])["median"]
        return [name, 1e3 * q["median"], 1e3 * q["min"], 1e3 * q["max"], tokens / q["median"],
                quantiles(side["peaks"][w:])["median"], side["footprint"], quantiles(side["calls"][w:])["median"],
                quantiles(side["rows"][w:])["median"], q["median"] / f]

    print_table("per step (medians over reps)",
                ["trainer", "ms", "min ms", "max ms", "tokens/s", "peak MiB", "footprint MiB", "audio calls",
                 "audio rows", "step/floor"], [row("ours", ours, o), row("trl", theirs, t)])
    if floors:
        print_table("HF floor (each piece alone, same run)", ["piece", "ms"],
                    [[k, 1e3 * quantiles([x[k] for x in floors])["median"]] for k in floors[0]])
    width = quantiles(ours["widths"][w:])["median"]
    geometry, shape = step_shape(args, ours["prompt_tokens"], width, model_dir)
    roof = roofline_table(geometry, shape, ours["machines"][w:], ours["phases"][w:])
    # What a log-prob pass that materialises its (rows, T, V) fp32 logits holds with their gradient: most of
    # our footprint before completion_logps projected through lm_head in row chunks (commit ba62a6f).
    logits_mib = 2 * logits_bytes(micro_rows, int(width), geometry.vocab_size, 4) / 2**20
    summary = {
        "ours_over_trl": ratio["median"],
        "ours_over_trl_min": ratio["min"],
        "ours_over_trl_max": ratio["max"],
        "ours_over_trl_q1": ratio["q1"],
        "ours_over_trl_q3": ratio["q3"],
        "trl_over_ours": 1 / ratio["median"],
        "ours_over_roofline": roof["step_over_roofline"],
        "trl_over_roofline": quantiles(t)["median"] / roof["floor_s"],
        "peak_mem_ours_over_trl": (quantiles(ours["peaks"][w:])["median"]
                                   / max(quantiles(theirs["peaks"][w:])["median"], 1e-9)),
        "footprint_ours_over_trl": ours["footprint"] / max(theirs["footprint"], 1e-9),
        "materialised_logits_and_grad_mib": logits_mib,
        "materialised_logits_over_our_footprint": logits_mib / max(ours["footprint"], 1e-9),
    }
    if floors:
        summary["ours_over_floor"] = quantiles([a / x["floor"] for a, x in zip(o, floors)])["median"]
        summary["trl_over_floor"] = quantiles([a / x["floor"] for a, x in zip(t, floors)])["median"]
    print_table("ratios (same run)", ["metric", "value"], [[k, v] for k, v in summary.items()])
    if args.shape == "realistic":
        print_table("issue targets at this shape", ["metric", "value", "target", ""], target_rows(summary))
    return summary


if __name__ == "__main__":
    main()
