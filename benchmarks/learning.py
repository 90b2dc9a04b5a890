"""Does EMO-RL learn? Held-out (test-speaker) WA/UA of the quickstart pipeline, stage by stage.

For each seed, through the real CLI (``emorl fit/test -c configs/quickstart.yaml``):
  untrained   the tiny random model, no training
  SFT (esr)   after the supervised cold start (``sft_steps`` steps)
  GRPO esr + ESWR          the quickstart: GRPO from the SFT checkpoint with ESWR + format rewards
  GRPO esr + accuracy      ablation: binary accuracy reward instead of ESWR (same SFT checkpoint)
  SFT (ir), GRPO ir + ESWR ablation: answer-only mode, its own cold start, then GRPO
  SFT control             supervised for as many steps as SFT + GRPO (is it the RL or more training?)
Every stage is tested on the final weights (no checkpoint selection), on the same test speakers,
with the same seeds. Prints a Markdown table (mean and, with several seeds, min-max) and the
GRPO - SFT gain in UA points, the number the README reports.

    python benchmarks/learning.py --seeds 0 1 --out runs/learning

``--family F`` (qwen2_audio, audioflamingo3, qwen2_5_omni, qwen3_omni) runs the same stages, data and schedule
on that family's toy (``emorl-toy-model``: 1024-token BPE trained in-process, 2 s window, thin random layers),
which the script builds first (``runs/tiny-audioflamingo3``, ``runs/tiny-qwen2-5-omni``, ``runs/tiny-qwen3-omni``,
the quickstart's ``runs/tiny-qwen2-audio``) unless ``--model-dir`` names a model. ``--quickstart-stages`` keeps
the quickstart's three stages (untrained, SFT (esr), GRPO esr + ESWR) and prints one Markdown row per run: family,
their test UA, wall and process CPU time. It shows that a family trains end to end, not that it ranks:

    python benchmarks/learning.py --family qwen3_omni --quickstart-stages --out runs/learning_qwen3_omni

``--eight-class``: the benchmark where ESWR can matter. On IEMOCAP-4 no pair of emotions earns ESWR's
partial credit (Plutchik S <= 0.5 < gamma 0.7), so ESWR is plain accuracy there. This runs the configs of
``configs/benchmarks/learning_8class`` on the generated RAVDESS-8 corpus whose Plutchik neighbours
(angry/disgust, fear/surprise, sad/disgust, sad/surprise: S = 0.854) share sounds
(``configs/data/synth_ravdess8_ambiguous.yaml``), per seed (the seed also sets the data order):
  cold start esr, then GRPO esr + ESWR and GRPO esr + binary accuracy (same cold start)
  cold start eur, then GRPO eur + ESWR;  cold start ir, then GRPO ir + ESWR
  control: esr supervised for as many steps as a cold start and its GRPO
It prints held-out (test-speaker) WA / UA / macro F1 / format rate of the final weights, mean and min-max
over seeds; the step at which validation UA first reaches ``--ua-threshold``; the training format rate
and accuracy over the first and last quarter of GRPO, with a line for every run whose format reward
rose while its accuracy stayed flat; and writes to ``--figures`` (default docs/figures/):
learning_8class_val_ua.png (validation UA vs step per variant: mean line, min-max band over seeds),
learning_8class_format.png (training format rate vs step) and learning_8class_confusion.png (the best
variant's test confusion matrix, summed over seeds, ESWR's neighbour cells boxed). "errors on
neighbours" is the share of wrong test answers that name a Plutchik neighbour of the gold label: where
ESWR's partial credit should move the errors.

    python benchmarks/learning.py --eight-class --seeds 0 1 2 --out runs/learning_8class
    python benchmarks/learning.py --eight-class --from-results runs/learning_8class/results_8class.json

Sizes (the configs'): 18 speakers (12 train, 3 valid, 3 test) x 8 emotions x 12 utterances, cold starts of
800 steps, 800 GRPO steps (B = 4, G = 6, 96 new tokens), the control 1600 supervised steps, validation on
all 288 valid utterances every 100 steps. About 20 minutes per seed on 2 CPU cores (1 hour for 3 seeds),
estimated from a 300 + 100-step run of every variant: per step, cold start 0.05-0.07 s, GRPO esr 0.34 s,
eur 0.21 s, ir 0.10 s; a validation pass 1-2.5 s. The two GRPO esr runs are nearly half of it.

``--smoke`` shrinks it to seconds (a 3-speaker corpus, 2 + 2 steps, G = 2, 16 new tokens): the test of
this script, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

from emorl_pl.cli import run_cli
from emorl_pl.toy_model import FAMILIES as TOY_FAMILIES

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
CONFIGS_8 = REPO / "configs" / "benchmarks" / "learning_8class"


def _run(subcommand: str, out: Path, seed: int, extra: list[str]) -> dict[str, float]:
    args = [
        subcommand, "-c", str(QUICKSTART),
        "--seed_everything", str(seed),
        "--model.init_args.sampling_seed", str(seed),
        "--trainer.default_root_dir", str(out),
        "--trainer.logger.init_args.save_dir", str(out),
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        *extra,
    ]
    if subcommand == "fit":
        args += ["--test_after_fit", "false"]
    cli = run_cli(args)
    if subcommand == "fit":
        return {}
    results = cli.model.last_eval["test"]
    (values,) = results.values()
    return {k: float(v) for k, v in values.items() if getattr(v, "ndim", 1) == 0}


def _last_ckpt(out: Path) -> str:
    found = sorted(out.glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no last.ckpt under {out}")
    return str(found[-1])


QUICKSTART_STAGES = ("untrained", "SFT (esr)", "GRPO esr + ESWR")


def run_seed(seed: int, root: Path, sft_steps: int, grpo_steps: int, control: bool = True,
             extra: list[str] | None = None, quickstart_only: bool = False) -> dict[str, dict[str, float]]:
    """The 4-class stages of one seed; ``extra`` CLI arguments go to every run (model, corpus, sizes).
    ``quickstart_only``: the quickstart's stages only (``QUICKSTART_STAGES``: no control, ablations or ir)."""
    total = sft_steps + grpo_steps
    res: dict[str, dict[str, float]] = {}
    base = root / f"seed{seed}"

    def stage(subcommand: str, out: Path, seed: int, args: list[str]) -> dict[str, float]:
        return _run(subcommand, out, seed, [*(extra or []), *args])

    res["untrained"] = stage("test", base / "untrained", seed, [])
    for mode in ("esr",) if quickstart_only else ("esr", "ir"):
        sft_dir = base / f"sft_{mode}"
        common = ["--model.init_args.mode", mode, "--model.init_args.sft_steps", str(sft_steps)]
        stage("fit", sft_dir, seed, [*common, "--trainer.max_steps", str(sft_steps)])
        sft_ckpt = _last_ckpt(sft_dir)
        res[f"SFT ({mode})"] = stage("test", sft_dir / "test", seed, [*common, "--ckpt_path", sft_ckpt])
        if mode == "esr" and control and not quickstart_only:
            # Control: is it the RL, or just more training? Supervised for the same total steps.
            ctl = base / "sft_esr_long"
            ctl_args = ["--model.init_args.sft_steps", str(total), "--trainer.max_steps", str(total)]
            stage("fit", ctl, seed, ctl_args)
            res[f"SFT (esr), {total} steps (control)"] = stage("test", ctl / "test", seed, [*ctl_args, "--ckpt_path", _last_ckpt(ctl)])
        variants = {"eswr": []} if mode == "ir" or quickstart_only else {
            "eswr": [],
            "accuracy": ["--model.init_args.rewards", "{accuracy: 1.0, format: 0.5}"],
        }
        for name, reward_args in variants.items():
            run_dir = base / f"grpo_{mode}_{name}"
            # Each variant branches off the shared cold start with its own rewards: an intended change of the
            # run's settings, so the resume is told to allow it.
            stage("fit", run_dir, seed, [*common, *reward_args, "--trainer.max_steps", str(total), "--ckpt_path", sft_ckpt,
                                         "--resume_changes", "allow"])
            label = f"GRPO {mode} + {'ESWR' if name == 'eswr' else 'accuracy'}"
            res[label] = stage("test", run_dir / "test", seed, [*common, *reward_args, "--ckpt_path", _last_ckpt(run_dir)])
    return res


def table(per_seed: list[dict[str, dict[str, float]]]) -> str:
    rows = ["| stage | WA | UA | macro F1 | format | n seeds |", "|---|---|---|---|---|---|"]

    def cell(stage: str, key: str) -> str:
        vals = [100 * r[stage][key] for r in per_seed if key in r.get(stage, {})]
        if not vals:
            return "-"
        mean = statistics.fmean(vals)
        return f"{mean:.1f}" if len(vals) == 1 else f"{mean:.1f} ({min(vals):.1f}-{max(vals):.1f})"

    for stage in per_seed[0]:
        rows.append(f"| {stage} | {cell(stage, 'wa')} | {cell(stage, 'ua')} | {cell(stage, 'f1_macro')} | "
                    f"{cell(stage, 'format_rate')} | {len(per_seed)} |")
    gains = [100 * (r["GRPO esr + ESWR"]["ua"] - r["SFT (esr)"]["ua"]) for r in per_seed]
    rows.append(f"\nGRPO (esr + ESWR) - SFT (esr), UA points per seed: {', '.join(f'{g:+.1f}' for g in gains)}")
    return "\n".join(rows)


# ---------------------------------------------------------------------------------- the 8-class benchmark


@dataclass(frozen=True)
class Variant:
    name: str
    config: str  # a file of configs/benchmarks/learning_8class, on top of base.yaml
    after: str | None = None  # the cold start it continues (its last.ckpt is the --ckpt_path)
    control: bool = False  # supervised for as many steps as a cold start plus GRPO


VARIANTS_8 = (
    Variant("cold start esr", "cold_start_esr.yaml"),
    Variant("GRPO esr + ESWR", "grpo_esr_eswr.yaml", "cold start esr"),
    Variant("GRPO esr + accuracy", "grpo_esr_accuracy.yaml", "cold start esr"),
    Variant("cold start eur", "cold_start_eur.yaml"),
    Variant("GRPO eur + ESWR", "grpo_eur_eswr.yaml", "cold start eur"),
    Variant("cold start ir", "cold_start_ir.yaml"),
    Variant("GRPO ir + ESWR", "grpo_ir_eswr.yaml", "cold start ir"),
    Variant("control: SFT esr for all steps", "sft_control_esr.yaml", control=True),
)
SMOKE = [  # seconds, not a measurement: the whole path on a 3-speaker corpus
    "--data.init_args.num_speakers", "3", "--data.init_args.utterances_per_speaker_per_label", "1",
    "--data.init_args.batch_size", "2", "--data.init_args.eval_batch_size", "8",
    "--model.init_args.group_size", "2", "--model.init_args.max_new_tokens", "16",
    "--model.init_args.micro_batch_size", "4",
]
Curve = list[tuple[int, float]]


class CurveRecorder(Callback):
    """A run's curves by optimizer steps done (``trainer.global_step``): validation UA after each
    validation, and GRPO's training format rate and accuracy (over the step's B x G samples) after each
    GRPO step. Added to the trainer by ``fit_and_test`` as ``learning.CurveRecorder``."""

    def __init__(self) -> None:
        self.val_ua: Curve = []
        self.format: Curve = []
        self.train_accuracy: Curve = []

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        (values,) = pl_module.last_eval["val"].values()
        self.val_ua.append((trainer.global_step, float(values["ua"])))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        metrics = trainer.callback_metrics
        if trainer.global_step > pl_module.hparams.sft_steps and "format_rate" in metrics:
            self.format.append((trainer.global_step, float(metrics["format_rate"])))
            self.train_accuracy.append((trainer.global_step, float(metrics["train_accuracy"])))


def step_overrides(variant: Variant, sft_steps: int | None, grpo_steps: int | None, val_every: int | None) -> list[str]:
    """CLI overrides of the configs' step counts (none given: the configs' own)."""
    out = []
    if sft_steps is not None or grpo_steps is not None:
        if sft_steps is None or grpo_steps is None:
            raise ValueError("give --sft-steps and --grpo-steps together (GRPO and the control run to their sum)")
        total = sft_steps + grpo_steps
        out += ["--model.init_args.sft_steps", str(total if variant.control else sft_steps),
                "--trainer.max_steps", str(sft_steps if variant.after is None and not variant.control else total)]
    if val_every is not None:
        out += ["--trainer.val_check_interval", str(val_every)]
    return out


def first_step_reaching(points: Curve, threshold: float) -> int | None:
    return next((step for step, value in points if value >= threshold), None)


def quarter_means(points: Curve) -> tuple[float, float]:
    """Mean over the first and the last quarter of the points (at least one point each)."""
    k = max(1, len(points) // 4)
    return statistics.fmean(v for _, v in points[:k]), statistics.fmean(v for _, v in points[-k:])


def format_up_accuracy_flat(fmt: Curve, acc: Curve, min_rise: float = 0.05, flat: float = 0.01) -> str | None:
    """The failure to watch for in GRPO: the format reward climbs while accuracy does not (the policy
    learns the tags, not the emotions). Returns a description when seen, else None."""
    if len(fmt) < 2 or len(acc) < 2:
        return None
    (f0, f1), (a0, a1) = quarter_means(fmt), quarter_means(acc)
    if f1 - f0 >= min_rise and a1 - a0 <= flat:
        return f"format rate {100 * f0:.1f} -> {100 * f1:.1f}, training accuracy {100 * a0:.1f} -> {100 * a1:.1f}"
    return None


def _scalars(values: dict[str, Any]) -> dict[str, Any]:
    """Test metrics as JSON: scalars as floats, the confusion matrix as nested lists."""
    out = {}
    for k, v in values.items():
        out[k] = v.tolist() if getattr(v, "ndim", 0) else float(v)
    return out


def fit_and_test(variant: Variant, run_dir: Path, seed: int, extra: list[str], ckpt: str | None) -> dict[str, Any]:
    """Fit one variant (from ``ckpt`` when it continues a cold start) and test its final weights on the
    test speakers; returns the test metrics, the run's curves (CurveRecorder) and its times."""
    args = [
        "fit", "-c", str(CONFIGS_8 / "base.yaml"), "-c", str(CONFIGS_8 / variant.config),
        "--seed_everything", str(seed), "--model.init_args.sampling_seed", str(seed),
        "--data.init_args.seed", str(seed),
        "--trainer.default_root_dir", str(run_dir), "--trainer.logger.init_args.save_dir", str(run_dir),
        "--trainer.callbacks+=learning.CurveRecorder", *extra,
        # a variant that continues a cold start changes its settings (rewards, mode) on purpose
        *(["--ckpt_path", ckpt, "--resume_changes", "allow"] if ckpt else []),
    ]
    start, cpu = time.time(), time.process_time()
    cli = run_cli(args)
    fit_s = time.time() - start
    cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)  # the final weights, no selection
    (values,) = cli.model.last_eval["test"].values()
    # by class name: run as a script, this file is __main__ and the trainer's copy is module ``learning``
    (rec,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "CurveRecorder"]
    return {
        "test": _scalars(values),
        "val_ua": rec.val_ua,
        "format": rec.format,
        "train_accuracy": rec.train_accuracy,
        "sft_steps": int(cli.model.hparams.sft_steps),
        "max_steps": int(cli.trainer.max_steps),
        "fit_s": fit_s,
        "total_s": time.time() - start,
        "cpu_s": time.process_time() - cpu,  # all threads: a loaded machine's wall time overstates the work
    }


def select_variants(names: Sequence[str] | None) -> list[Variant]:
    """The variants named (by name or config stem), with the cold starts they continue, in run order."""
    if not names:
        return list(VARIANTS_8)
    by_key = {k: v for v in VARIANTS_8 for k in (v.name, v.config.removesuffix(".yaml"))}
    unknown = [n for n in names if n not in by_key]
    if unknown:
        known = [v.config.removesuffix(".yaml") for v in VARIANTS_8]
        raise ValueError(f"unknown variant(s) {unknown}; known: {known}")
    wanted = {by_key[n].name for n in names} | {by_key[n].after for n in names if by_key[n].after}
    return [v for v in VARIANTS_8 if v.name in wanted]


def run_8class_seed(seed: int, root: Path, extra: Sequence[str], sft_steps: int | None, grpo_steps: int | None,
                    val_every: int | None, variants: Sequence[Variant] = VARIANTS_8) -> dict[str, dict[str, Any]]:
    res: dict[str, dict[str, Any]] = {}
    ckpts: dict[str, str] = {}
    for v in variants:
        run_dir = root / f"seed{seed}" / v.config.removesuffix(".yaml")
        res[v.name] = fit_and_test(v, run_dir, seed, [*extra, *step_overrides(v, sft_steps, grpo_steps, val_every)],
                                   ckpts[v.after] if v.after else None)
        if v.after is not None:  # a GRPO run's curve starts with its cold start's
            res[v.name]["val_ua"] = sorted(dict(res[v.after]["val_ua"] + res[v.name]["val_ua"]).items())
        else:
            ckpts[v.name] = _last_ckpt(run_dir)
        print(f"  seed {seed} {v.name}: test UA {100 * res[v.name]['test']['ua']:.1f} "
              f"({res[v.name]['total_s']:.0f} s)", flush=True)
    return res


def ravdess8_neighbours() -> tuple[tuple[str, ...], set[tuple[str, str]]]:
    """RAVDESS-8's labels, and its ordered (gold, predicted) pairs that earn ESWR's partial credit
    (Plutchik S > gamma 0.7, as in the configs)."""
    from emorl_pl.datamodules.synth import neighbour_pairs
    from emorl_pl.emotions import get_label_set

    labels = get_label_set("ravdess8")
    pairs = neighbour_pairs(labels)
    return labels, {*pairs, *((b, a) for a, b in pairs)}


def neighbour_error_share(confusion: Sequence[Sequence[float]], labels: Sequence[str],
                          neighbours: set[tuple[str, str]]) -> float | None:
    """Share of the wrong answers (unparseable ones included) that name a neighbour of the gold label:
    what ESWR rewards partially, so where it should move the errors. None without errors."""
    errors = near = 0.0
    for i, gold in enumerate(labels):
        for j, count in enumerate(confusion[i]):
            if j == i:
                continue
            errors += count
            near += count if j < len(labels) and (gold, labels[j]) in neighbours else 0.0
    return near / errors if errors else None


def _mean_range(vals: Sequence[float], digits: int = 1) -> str:
    if not vals:
        return "-"
    mean = statistics.fmean(vals)
    if len(vals) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ({min(vals):.{digits}f}-{max(vals):.{digits}f})"


def _steps_cell(runs: Sequence[dict[str, Any]], threshold: float) -> str:
    steps = [first_step_reaching(r["val_ua"], threshold) for r in runs]
    reached = [s for s in steps if s is not None]
    if not reached:
        return f"not reached (0/{len(steps)})"
    cell = _mean_range(reached, 0)
    return cell if len(reached) == len(steps) else f"{cell}, {len(reached)}/{len(steps)} seeds"


def _format_cell(runs: Sequence[dict[str, Any]]) -> str:
    pairs = [quarter_means(r["format"]) for r in runs if len(r["format"]) >= 2]
    if not pairs:
        return "-"
    return f"{100 * statistics.fmean(a for a, _ in pairs):.1f} -> {100 * statistics.fmean(b for _, b in pairs):.1f}"


def table_8class(per_seed: Sequence[dict[str, dict[str, Any]]], threshold: float) -> str:
    """Markdown: test metrics (mean, min-max over seeds), steps to the UA threshold, training format rate."""
    labels, neighbours = ravdess8_neighbours()
    rows = [f"| variant | WA | UA | macro F1 | format | errors on neighbours | "
            f"steps to val UA >= {100 * threshold:.0f} | train format, first -> last quarter of GRPO |",
            "|---|---|---|---|---|---|---|---|"]
    for name in per_seed[0]:
        runs = [r[name] for r in per_seed]
        cells = [_mean_range([100 * r["test"][k] for r in runs]) for k in ("wa", "ua", "f1_macro", "format_rate")]
        shares = [neighbour_error_share(r["test"]["confusion"], labels, neighbours) for r in runs]
        cells.append(_mean_range([100 * x for x in shares if x is not None]))
        rows.append(f"| {name} | {' | '.join(cells)} | {_steps_cell(runs, threshold)} | {_format_cell(runs)} |")
    return "\n".join(rows)


def comparisons_8class(per_seed: Sequence[dict[str, dict[str, Any]]]) -> list[str]:
    """Per-seed UA differences, in points, that the benchmark is about."""
    lines = []
    for a, b in (("GRPO esr + ESWR", "GRPO esr + accuracy"), ("GRPO esr + ESWR", "cold start esr"),
                 ("GRPO esr + ESWR", "control: SFT esr for all steps"),
                 ("GRPO esr + ESWR", "GRPO eur + ESWR"), ("GRPO esr + ESWR", "GRPO ir + ESWR")):
        if a not in per_seed[0] or b not in per_seed[0]:  # a run of some variants only
            continue
        diffs = [100 * (r[a]["test"]["ua"] - r[b]["test"]["ua"]) for r in per_seed]
        lines.append(f"{a} - {b}, test UA points: mean {statistics.fmean(diffs):+.1f} "
                     f"(per seed {', '.join(f'{d:+.1f}' for d in diffs)})")
    return lines


def format_warnings(per_seed: Sequence[dict[str, dict[str, Any]]], seeds: Sequence[int]) -> list[str]:
    lines = []
    for seed, res in zip(seeds, per_seed):
        for name, r in res.items():
            seen = format_up_accuracy_flat(r["format"], r["train_accuracy"])
            if seen:
                lines.append(f"WARNING format reward rising while accuracy stays flat: {name}, seed {seed}: {seen}")
    return lines or ["format reward rising while accuracy stays flat: not seen in any GRPO run"]


def band(curves: Sequence[Curve]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Steps present in every curve, and the mean, min and max over curves there."""
    common = sorted(set.intersection(*(set(dict(c)) for c in curves))) if curves else []
    values = [[dict(c)[s] for c in curves] for s in common]
    return common, [statistics.fmean(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on a benchmark machine
    import matplotlib.pyplot as plt

    return plt


def plot_curves(per_seed: Sequence[dict[str, dict[str, Any]]], key: str, names: Sequence[str], ylabel: str,
                title: str, path: Path, marks: Sequence[int] = (), smooth: int = 1,
                chance: float | None = None) -> Path:
    """One mean line and min-max band over seeds per variant; dotted lines at ``marks`` (where cold starts
    end), a dashed one at ``chance``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name in names:
        curves = [_smoothed(r[name][key], smooth) for r in per_seed]
        steps, mean, lo, hi = band(curves)
        if not steps:
            continue
        (line,) = ax.plot(steps, [100 * v for v in mean], label=name, lw=1.8)
        ax.fill_between(steps, [100 * v for v in lo], [100 * v for v in hi], color=line.get_color(), alpha=0.18)
    for step in marks:
        ax.axvline(step, color="0.4", ls=":", lw=1)
    if chance is not None:
        ax.axhline(100 * chance, color="0.4", ls="--", lw=1, label="chance")
    ax.set(xlabel="training step", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _smoothed(points: Curve, window: int) -> Curve:
    """Trailing mean over ``window`` points (per-step training rates are noisy: B x G samples each)."""
    if window <= 1:
        return list(points)
    vals = [v for _, v in points]
    return [(s, statistics.fmean(vals[max(0, i - window + 1): i + 1])) for i, (s, _) in enumerate(points)]


def best_variant(per_seed: Sequence[dict[str, dict[str, Any]]]) -> str:
    return max(per_seed[0], key=lambda n: statistics.fmean(r[n]["test"]["ua"] for r in per_seed))


def plot_confusion(per_seed: Sequence[dict[str, dict[str, Any]]], name: str, labels: Sequence[str], path: Path,
                   neighbours: set[tuple[str, str]] = frozenset()) -> Path:
    """Test confusion of ``name`` summed over seeds: rows gold, columns predicted (+ unparseable answers),
    cells the share of the gold row in percent; the ``neighbours`` cells (ESWR's partial credit) boxed."""
    plt = _pyplot()
    import numpy as np

    counts = np.sum([np.array(r[name]["test"]["confusion"], dtype=float) for r in per_seed], axis=0)
    share = 100 * counts / np.maximum(counts.sum(1, keepdims=True), 1)
    columns = [*labels, "invalid"][: share.shape[1]]
    fig, ax = plt.subplots(figsize=(7.5, 6.2))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=100)
    for i in range(share.shape[0]):
        for j in range(share.shape[1]):
            ax.text(j, i, f"{share[i, j]:.0f}", ha="center", va="center", fontsize=8,
                    color="white" if share[i, j] > 60 else "black")
    for i, gold in enumerate(labels):
        for j, pred in enumerate(labels):
            if (gold, pred) in neighbours:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="tab:red", lw=1.5))
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set(xlabel="predicted", ylabel="gold",
           title=f"{name}: test confusion (% of gold), {len(per_seed)} seed(s) summed\n"
                 "boxed: Plutchik neighbours, S > 0.7 (ESWR's partial credit)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def figures_8class(per_seed: Sequence[dict[str, dict[str, Any]]], out: Path) -> list[Path]:
    labels, neighbours = ravdess8_neighbours()
    curves = [v.name for v in VARIANTS_8 if (v.after is not None or v.control) and v.name in per_seed[0]]
    grpo = [v.name for v in VARIANTS_8 if v.after is not None and v.name in per_seed[0]]
    best = best_variant(per_seed)
    marks = sorted({r[n]["sft_steps"] for r in per_seed for n in grpo})
    return [
        plot_curves(per_seed, "val_ua", curves, "validation UA (%)",
                    "8-class ambiguous synth: validation UA (mean, min-max over seeds)",
                    out / "learning_8class_val_ua.png", marks, chance=1 / len(labels)),
        plot_curves(per_seed, "format", grpo, "training format rate (%)",
                    "training format rate (mean, min-max over seeds; 10-step mean)",
                    out / "learning_8class_format.png", marks, smooth=10),
        plot_confusion(per_seed, best, labels, out / "learning_8class_confusion.png", neighbours),
    ]


def report_8class(per_seed: list[dict[str, dict[str, Any]]], seeds: Sequence[int], threshold: float,
                  figures: Path | None) -> None:
    print(table_8class(per_seed, threshold))
    labels, neighbours = ravdess8_neighbours()
    print(f"\nerrors on neighbours: share of wrong answers naming a Plutchik neighbour of the gold label "
          f"(wrong answers spread evenly would give {100 * len(neighbours) / (len(labels) * (len(labels) - 1)):.1f})")
    for line in [*comparisons_8class(per_seed), *format_warnings(per_seed, seeds)]:
        print(line)
    wall = [sum(r["total_s"] for r in res.values()) / 60 for res in per_seed]
    cpu = [sum(r.get("cpu_s", 0.0) for r in res.values()) / 60 for res in per_seed]
    print(f"time per seed: {', '.join(f'{w:.1f} min' for w in wall)} "
          f"(process CPU time {', '.join(f'{c:.1f}' for c in cpu)} min)")
    if figures is not None:
        for path in figures_8class(per_seed, figures):
            print(f"figure: {path}")


def toy_dir(family: str) -> Path:
    """Where the script builds ``family``'s toy: the quickstart config's folder for Qwen2-Audio."""
    return Path("runs/tiny-qwen2-audio" if family == "qwen2_audio" else f"runs/tiny-{family.replace('_', '-')}")


def model_dir(args: argparse.Namespace) -> str:
    """``--model-dir`` as given, else the family's toy, built first when its folder holds none."""
    if args.model_dir:
        return args.model_dir
    from emorl_pl.toy_model import build_toy

    # a smoke run keeps its toy under its own folder, as its corpus
    return str(build_toy(args.family, Path(args.out) / f"tiny-{args.family}" if args.smoke else toy_dir(args.family)))


def run_arguments(args: argparse.Namespace, root: Path) -> list[str]:
    """CLI arguments every run of either benchmark gets: the smoke sizes, the model and the corpus folder."""
    extra = list(SMOKE) if args.smoke else []
    extra += ["--model.init_args.policy.init_args.model_dir", model_dir(args)]
    # a smoke corpus of its own: the real one's folder would then hold a corpus of the wrong size
    data_root = args.data_root or (str(root / "data") if args.smoke else None)
    if data_root:
        extra += ["--data.init_args.root", data_root]
    return extra


def main_8class(args: argparse.Namespace) -> list[dict]:
    # run_cli gets its arguments from here, not sys.argv, for each of the 24 runs: the warning says nothing
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    root = Path(args.out)
    results = root / "results_8class.json"
    figures = Path(args.figures) if args.figures else None
    if args.from_results:  # the table and figures again, from a finished run
        saved = json.loads(Path(args.from_results).read_text())
        report_8class(saved["per_seed"], saved["seeds"], args.ua_threshold, figures)
        return saved["per_seed"]
    extra = run_arguments(args, root)
    sft_steps, grpo_steps, val_every = args.sft_steps, args.grpo_steps, args.val_every
    if args.smoke:  # 2 + 2 steps, a validation at each end, unless given
        sft_steps, grpo_steps, val_every = sft_steps or 2, grpo_steps or 2, val_every or 2
    per_seed = []
    for seed in args.seeds:
        start = time.time()
        per_seed.append(run_8class_seed(seed, root, extra, sft_steps, grpo_steps, val_every,
                                        select_variants(args.variants)))
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(json.dumps({"seeds": args.seeds[: len(per_seed)], "per_seed": per_seed}))
        print(f"seed {seed} done in {(time.time() - start) / 60:.1f} min", flush=True)
    report_8class(per_seed, args.seeds, args.ua_threshold, figures)
    return per_seed


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--sft-steps", type=int, default=None,
                        help="cold-start steps (default: 300; with --eight-class, the configs')")
    parser.add_argument("--grpo-steps", type=int, default=None,
                        help="GRPO steps after the cold start (default: 300; with --eight-class, the configs')")
    parser.add_argument("--out", default=None, help="run folder (default runs/learning, runs/learning_8class)")
    parser.add_argument("--no-control", action="store_true", help="skip the SFT-for-as-long control run")
    eight = parser.add_argument_group("the 8-class benchmark")
    eight.add_argument("--eight-class", action="store_true", help="run the 8-class ambiguous benchmark instead")
    eight.add_argument("--figures", default="docs/figures", help="folder for the PNG figures ('' for none)")
    eight.add_argument("--ua-threshold", type=float, default=0.4,
                       help="report the first step validation UA reaches this")
    eight.add_argument("--val-every", type=int, default=None,
                       help="validation interval in steps (default: the configs')")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the path in seconds, measures nothing")
    parser.add_argument("--family", default="qwen2_audio", choices=TOY_FAMILIES,
                        help="the toy model to build and train (default qwen2_audio, the quickstart's)")
    parser.add_argument("--quickstart-stages", action="store_true",
                        help="the quickstart's stages only: untrained, SFT (esr), GRPO esr + ESWR")
    parser.add_argument("--model-dir", default=None,
                        help="a model folder to use as it is, instead of building --family's toy")
    parser.add_argument("--data-root", default=None, help="corpus folder instead of the data config's root")
    eight.add_argument("--variants", nargs="+", default=None,
                       help="run these only (config stems, e.g. grpo_esr_eswr; their cold starts come along)")
    eight.add_argument("--from-results", default=None, help="print the table and draw the figures of a finished run")
    args = parser.parse_args(argv)
    if args.eight_class:
        args.out = args.out or ("runs/learning_8class_smoke" if args.smoke else "runs/learning_8class")
        return main_8class(args)
    args.out = args.out or ("runs/learning_smoke" if args.smoke else "runs/learning")
    root = Path(args.out)
    sft_steps = args.sft_steps if args.sft_steps is not None else (2 if args.smoke else 300)
    grpo_steps = args.grpo_steps if args.grpo_steps is not None else (2 if args.smoke else 300)
    extra = run_arguments(args, root)
    per_seed, wall, cpu = [], [], []
    for seed in args.seeds:
        start, cpu_start = time.time(), time.process_time()
        per_seed.append(run_seed(seed, root, sft_steps, grpo_steps, control=not args.no_control, extra=extra,
                                 quickstart_only=args.quickstart_stages))
        wall.append(time.time() - start)
        cpu.append(time.process_time() - cpu_start)  # all threads: a loaded machine's wall time overstates the work
        root.mkdir(parents=True, exist_ok=True)
        (root / "results.json").write_text(json.dumps(per_seed, indent=1))
        (root / "run.json").write_text(json.dumps({"family": args.family, "model_dir": model_dir(args),
                                                   "seeds": args.seeds[: len(per_seed)], "wall_s": wall, "cpu_s": cpu,
                                                   "sft_steps": sft_steps, "grpo_steps": grpo_steps}, indent=1))
        print(f"seed {seed} done in {wall[-1]:.0f} s", flush=True)
    print(table(per_seed))
    print()
    print(family_row(args.family, per_seed, wall, cpu, sft_steps, grpo_steps))
    return per_seed


FAMILY_HEADER = ("| family (toy) | untrained UA | cold-start UA | GRPO esr + ESWR UA | wall time per seed | "
                 "process CPU time per seed |\n|---|---|---|---|---|---|")


def family_row(family: str, per_seed: Sequence[dict[str, dict[str, float]]], wall_s: Sequence[float],
               cpu_s: Sequence[float], sft_steps: int, grpo_steps: int) -> str:
    """The family table's header and this run's row: test UA of the quickstart's stages (mean, min-max over
    seeds) and the wall time of a seed's stages (all its runs, tests included)."""
    def ua(stage: str) -> str:
        return _mean_range([100 * r[stage]["ua"] for r in per_seed])

    minutes, cpu_minutes = _mean_range([w / 60 for w in wall_s]), _mean_range([c / 60 for c in cpu_s])
    return (f"{FAMILY_HEADER}\n| {family} | {ua('untrained')} | {ua('SFT (esr)')} | {ua('GRPO esr + ESWR')} | "
            f"{minutes} min | {cpu_minutes} min |\n\n{len(per_seed)} seed(s), {sft_steps} cold-start + {grpo_steps} GRPO steps")


if __name__ == "__main__":
    main()
