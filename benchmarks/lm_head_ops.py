"""The lm_head-sized operations of a GRPO step, each against the way it was done before, in one run.

    python benchmarks/lm_head_ops.py                  # the realistic shape: V = 156,032, D = 512, 24 rows
    python benchmarks/lm_head_ops.py --threads 1 --quick

Each line times our operation and its baseline alternately (best of ``--reps``) and prints the ratio:

- sampling one token per row of the (rows, V) decode logits: softmax + a float64 cumsum over V (the previous
  ``sample_categorical``) vs ``kernels.exp_shifted_`` + the two-level ``sampling.sample_categorical``;
- the decode's (rows x D) @ (D x V) lm_head GEMM: ``F.linear`` vs oneDNN's prepacked linear
  (``FusedDecodeStep(pack_lm_head=True)``'s);
- log-probs of a (chunk, V) logits block: ``torch.logsumexp`` vs ``kernels.exp_shifted_`` in place;
- a chunk's logits GEMM into a fresh tensor vs into the reused buffer (``kernels._project_chunk``);
- the policy's log-prob forward + backward with a frozen lm_head, (rows, T) tokens: the recompute-in-backward
  path (three lm_head GEMMs per chunk) vs the gradient formed in the forward (two).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import best_seconds, print_table  # noqa: E402

from emorl_pl import kernels  # noqa: E402
from emorl_pl.modules.sampling import sample_categorical  # noqa: E402


def previous_sample(logits: torch.Tensor) -> torch.Tensor:
    """The previous release's draw: softmax, then the inverse CDF over a float64 cumsum of all V."""
    cdf = torch.softmax(logits, -1).double().cumsum(-1)  # (no copy needed: softmax is out of place)
    u = torch.rand(logits.shape[0], 1, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=logits.shape[-1] - 1)


def our_sample(logits: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
    z = work.copy_(logits)  # the decode works on its own logits in place; the copy (counted) keeps reps equal
    kernels.exp_shifted_(z)
    return sample_categorical(z)


def logprob_pass(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, chunk: int,
                 grad_in_forward: bool) -> None:
    h = hidden.detach().requires_grad_()
    out = kernels._LinearLogSoftmax.apply(h, weight, None, tokens, 1.0, chunk, grad_in_forward)
    out.sum().backward()


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=156_032)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--rows", type=int, default=24, help="decode rows (B x G)")
    p.add_argument("--tokens", type=int, default=64, help="completion tokens per row (log-prob pass)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="small sizes, 2 reps (smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.vocab, args.hidden, args.rows, args.tokens, args.reps = 5000, 64, 4, 8, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    v, d, n, t = args.vocab, args.hidden, args.rows, args.tokens
    weight = torch.randn(v, d) / d**0.5
    decode_h = torch.randn(n, d)
    logits = F.linear(decode_h, weight)
    chunk_rows = max(1, kernels.LOGITS_CHUNK_TOKENS // t)
    block = torch.randn(chunk_rows * t, v)
    # In-place work goes to preallocated copies, so that neither side pays a fresh tensor's page faults
    work_logits, work_block = torch.empty_like(logits), torch.empty_like(block)
    chunk_h = torch.randn(chunk_rows * t, d)
    buffer = torch.empty(chunk_rows * t, v)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, n)
    hidden, tokens = torch.randn(n, t, d), torch.randint(0, v, (n, t))

    def pair(ours, baseline):
        o, b = best_seconds(ours, args.reps, "cpu"), best_seconds(baseline, args.reps, "cpu")
        return o, b

    cases = {
        f"sample a token ({n} x {v})": pair(lambda: our_sample(logits, work_logits),
                                                     lambda: previous_sample(logits)),
        f"decode lm_head GEMM ({n} x {d} x {v})": pair(
            lambda: torch.ops.mkldnn._linear_pointwise(decode_h, packed, None, "none", [], ""),
            lambda: F.linear(decode_h, weight)),
        f"logsumexp of a chunk ({chunk_rows * t} x {v})": pair(
            lambda: kernels.exp_shifted_(work_block.copy_(block)), lambda: torch.logsumexp(work_block.copy_(block), -1)),
        f"chunk logits GEMM ({chunk_rows * t} x {d} x {v})": pair(
            lambda: kernels._project_chunk(chunk_h, weight, None, buffer), lambda: F.linear(chunk_h, weight)),
        f"log-prob fwd+bwd, frozen lm_head ({n} x {t} tokens)": pair(
            lambda: logprob_pass(hidden, weight, tokens, chunk_rows, True),
            lambda: logprob_pass(hidden, weight, tokens, chunk_rows, False)),
    }
    rows = [[name, 1e3 * o, 1e3 * b, o / b] for name, (o, b) in cases.items()]
    print(f"threads={torch.get_num_threads()} V={v} D={d} rows={n} T={t} chunk={chunk_rows} rows x {t} tokens "
          f"best of {args.reps}")
    print_table("ours vs the previous way, same run", ["operation", "ours ms", "before ms", "ours / before"], rows)
    return {name: o / b for name, (o, b) in cases.items()}


if __name__ == "__main__":
    main()
