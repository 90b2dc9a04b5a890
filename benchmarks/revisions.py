"""Did a refactor slow the GRPO step? ``grpo_step.py`` on two revisions of the code, interleaved, as ratios.

    python benchmarks/revisions.py                          # base 889a53f (before issue 20's policy refactor)
    python benchmarks/revisions.py --base <commit> --rounds 5 -- --shape toy --reps 3

The base revision (and ``--head`` if given) is checked out into a temporary git worktree; the head is otherwise
this working tree. Each round runs
the base's and the head's own ``benchmarks/grpo_step.py`` once each, in a fresh process of the same Python
(order alternating between rounds, so drift in the machine's speed hits both alike), on one model folder built
once, with the same arguments (after ``--``; default: the toy, no HF floor). Printed: each round's median step
time per revision and the ratio head / base, with the median, min and max over rounds. A ratio near 1 (within
the rounds' spread) is no slowdown.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Before AudioLMPolicy's LoadedModels / kernels.py / RolloutRecord refactor and the lean loading (the two commits
# after it, 093ca4c and 69da2c1, do not run: their policy.py calls a families.py method committed later).
DEFAULT_BASE = "889a53f"
STEP_ARGS = ["--shape", "toy", "--no-hf-floor", "--warmup", "2", "--reps", "4"]
_RUN = """
import json, sys
tree = sys.argv[1]
sys.path[:0] = [tree, tree + "/benchmarks"]
import emorl_pl, grpo_step
assert emorl_pl.__file__.startswith(tree), (emorl_pl.__file__, tree)
summary = grpo_step.main(sys.argv[2:])
print("REVISION-RESULT " + json.dumps(summary))
"""


def run_step(tree: Path, step_args: list[str]) -> float:
    """One ``grpo_step.py`` run of the code in ``tree``, in its own process: the median step time (s)."""
    proc = subprocess.run([sys.executable, "-c", _RUN, str(tree), *step_args], cwd=tree, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"grpo_step.py in {tree} failed:\n{proc.stderr[-3000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("REVISION-RESULT "))
    return float(json.loads(line.split(" ", 1)[1])["step_s"])


def main(argv: list[str] | None = None) -> dict[str, float]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default=DEFAULT_BASE, help="git revision to compare against")
    p.add_argument("--head", default=None, help="git revision to measure (default: this working tree)")
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    step_args = extra or STEP_ARGS
    sys.path.insert(0, str(REPO))
    from emorl_pl.modules.tiny import ensure_tiny_model

    with tempfile.TemporaryDirectory(prefix="emorl-revisions-") as tmp:
        base_tree = Path(tmp) / "base"
        head_tree = Path(tmp) / "head" if args.head else REPO
        for tree, rev in ((base_tree, args.base), (head_tree, args.head)):
            if rev:
                subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), rev],
                               check=True, capture_output=True)
        try:
            if "--model" not in step_args:
                step_args = [*step_args, "--model", str(ensure_tiny_model(Path(tmp) / "toy"))]
            times: dict[str, list[float]] = {"base": [], "head": []}
            for r in range(args.rounds):
                order = ("base", "head") if r % 2 == 0 else ("head", "base")
                for name in order:
                    times[name].append(run_step(base_tree if name == "base" else head_tree, step_args))
                print(f"round {r}: base {times['base'][-1] * 1e3:.1f} ms, head {times['head'][-1] * 1e3:.1f} ms, "
                      f"head/base {times['head'][-1] / times['base'][-1]:.3f}", flush=True)
        finally:
            for tree in (base_tree, head_tree):
                if tree != REPO:
                    subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],
                                   capture_output=True)
    ratios = [h / b for h, b in zip(times["head"], times["base"])]
    summary = {"base_step_s": statistics.median(times["base"]), "head_step_s": statistics.median(times["head"]),
               "head_over_base": statistics.median(ratios), "head_over_base_min": min(ratios),
               "head_over_base_max": max(ratios)}
    print(f"\nbase {args.base} vs head {args.head or '(working tree)'}, grpo_step.py {' '.join(step_args)}")
    print(f"head / base step time: median {summary['head_over_base']:.3f} "
          f"(min {summary['head_over_base_min']:.3f}, max {summary['head_over_base_max']:.3f}) over {args.rounds} rounds")
    return summary


if __name__ == "__main__":
    main()
