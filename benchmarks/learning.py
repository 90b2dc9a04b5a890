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
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from emorl_pl.cli import run_cli

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def _cli(subcommand: str, out: Path, seed: int, extra: list[str]) -> dict[str, float]:
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


def run_seed(seed: int, root: Path, sft_steps: int, grpo_steps: int, control: bool = True) -> dict[str, dict[str, float]]:
    total = sft_steps + grpo_steps
    res: dict[str, dict[str, float]] = {}
    base = root / f"seed{seed}"
    res["untrained"] = _cli("test", base / "untrained", seed, [])
    for mode in ("esr", "ir"):
        sft_dir = base / f"sft_{mode}"
        common = ["--model.init_args.mode", mode, "--model.init_args.sft_steps", str(sft_steps)]
        _cli("fit", sft_dir, seed, [*common, "--trainer.max_steps", str(sft_steps)])
        sft_ckpt = _last_ckpt(sft_dir)
        res[f"SFT ({mode})"] = _cli("test", sft_dir / "test", seed, [*common, "--ckpt_path", sft_ckpt])
        if mode == "esr" and control:
            # Control: is it the RL, or just more training? Supervised for the same total steps.
            ctl = base / "sft_esr_long"
            ctl_args = ["--model.init_args.sft_steps", str(total), "--trainer.max_steps", str(total)]
            _cli("fit", ctl, seed, ctl_args)
            res[f"SFT (esr), {total} steps (control)"] = _cli("test", ctl / "test", seed, [*ctl_args, "--ckpt_path", _last_ckpt(ctl)])
        variants = {"eswr": []} if mode == "ir" else {
            "eswr": [],
            "accuracy": ["--model.init_args.rewards", "{accuracy: 1.0, format: 0.5}"],
        }
        for name, reward_args in variants.items():
            run_dir = base / f"grpo_{mode}_{name}"
            _cli("fit", run_dir, seed, [*common, *reward_args, "--trainer.max_steps", str(total), "--ckpt_path", sft_ckpt])
            label = f"GRPO {mode} + {'ESWR' if name == 'eswr' else 'accuracy'}"
            res[label] = _cli("test", run_dir / "test", seed, [*common, *reward_args, "--ckpt_path", _last_ckpt(run_dir)])
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


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--sft-steps", type=int, default=300)
    parser.add_argument("--grpo-steps", type=int, default=300)
    parser.add_argument("--out", default="runs/learning")
    parser.add_argument("--no-control", action="store_true", help="skip the SFT-for-as-long control run")
    args = parser.parse_args(argv)
    root = Path(args.out)
    per_seed = []
    for seed in args.seeds:
        start = time.time()
        per_seed.append(run_seed(seed, root, args.sft_steps, args.grpo_steps, control=not args.no_control))
        (root / "results.json").write_text(json.dumps(per_seed, indent=1))
        print(f"seed {seed} done in {time.time() - start:.0f} s", flush=True)
    print(table(per_seed))
    return per_seed


if __name__ == "__main__":
    main()
