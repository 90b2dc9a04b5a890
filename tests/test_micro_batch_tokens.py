"""``micro_batch_tokens``: GRPO passes packed up to a token budget (verl's ``use_dynamic_bsz``) instead of a
fixed number of rows. The same gradient as fixed micro-batches for every loss type, every pass within the
budget, and on 2 ranks (gloo, DDP) where one rank's rows are much longer, the same number of passes on
every rank and the same update as fixed micro-batches."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from test_window_scale_rewards import ddp_env, ddp_trainer, free_port
from torch.utils.data import DataLoader

from emorl_pl import grpo
from emorl_pl.modules.grpo_module import GRPOModule
from emorl_pl.modules.policy import AudioLMPolicy, LoraSettings
from emorl_pl.prompts import PromptTemplate
from emorl_pl.rewards import REWARDS, register_reward

G = 4
LABELS = ("neutral", "happy", "angry", "sad")
# A short text part, so that the audio (up to 50 tokens in the toy's 2 s window) sets the prompt's length.
PROMPT = PromptTemplate(instructions={"esr": "Emotion? {labels}"}, system="Be brief.")


# ---------------------------------------------------------------------------------------- packing
def test_completion_extents_by_hand():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 1, 0]])
    assert grpo.completion_extents(mask).tolist() == [2, 4, 0, 3]


def test_token_budget_passes_by_hand():
    p = torch.tensor([10, 10, 30, 30, 5, 5])
    c = torch.tensor([4, 8, 2, 6, 1, 3])
    # longest first: rows 3 (36), 2 (32 -> pass of 2 x 36 = 72 <= 80), 1 (3 x 36 > 80: new pass, 18),
    # 0 (2 x 18), 5 (3 x 18 = 54), 4 (4 x 18 = 72)
    passes = grpo.token_budget_micro_batches(p, c, torch.arange(6), 80)
    assert [s.tolist() for s in passes] == [[2, 3], [0, 1, 4, 5]]
    # only the kept rows; a budget of one longest row: one row per pass for the 30-token prompts
    passes = grpo.token_budget_micro_batches(p, c, torch.tensor([0, 2, 3, 5]), 36)
    assert [s.tolist() for s in passes] == [[3], [2], [0, 5]]
    assert grpo.token_budget_micro_batches(p, c, torch.tensor([], dtype=torch.long), 80) == []
    with pytest.raises(ValueError, match="micro_batch_tokens = 35 is below one row's tokens: prompt 30 "
                                         r"\+ completion 6 = 36 \(row 3\)"):
        grpo.token_budget_micro_batches(p, c, torch.arange(6), 35)
    with pytest.raises(ValueError, match="max_tokens must be an int >= 1"):
        grpo.token_budget_micro_batches(p, c, torch.arange(6), 0)


@pytest.mark.parametrize("seed", range(5))
def test_token_budget_passes_cover_every_row_once_within_budget(seed):
    g = torch.Generator().manual_seed(seed)
    n = 48
    p = torch.randint(20, 520, (n // G,), generator=g).repeat_interleave(G)  # G rows share a prompt
    c = torch.randint(0, 129, (n,), generator=g)
    rows = torch.nonzero(torch.rand(n, generator=g) > 0.2).flatten()
    budget = int(torch.randint(700, 3000, (1,), generator=g))
    passes = grpo.token_budget_micro_batches(p, c, rows, budget)
    assert sorted(r for s in passes for r in s.tolist()) == rows.tolist()
    for s in passes:
        assert s.tolist() == sorted(s.tolist())
        assert len(s) * int(p[s].max() + c[s].max()) <= budget
    # greedy cuts: no pass could have taken the next pass's longest row
    for s, nxt in zip(passes, passes[1:]):
        first = nxt[torch.argmax(p[nxt] * 1000 + c[nxt])]
        assert (len(s) + 1) * int(max(p[s].max(), p[first]) + max(c[s].max(), c[first])) > budget


def test_bad_budget_is_rejected_naming_the_key(toy_model_dir):
    policy = AudioLMPolicy(toy_model_dir)
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="model.init_args.micro_batch_tokens must be None or an int >= 1"):
            GRPOModule(policy, micro_batch_tokens=bad)


# ------------------------------------------------------------------------- the module: same gradient
def _hash_score(text: str) -> float:
    return (sum(map(ord, text)) % 7) / 6


if "test_mbt_hash" not in REWARDS:

    @register_reward("test_mbt_hash")
    class MBTHash:
        """Varies with the text, so that advantages are non-zero."""

        def __init__(self, labels, mode="esr"):
            pass

        def __call__(self, completions, labels, **columns):
            return [_hash_score(c) for c in completions]


def _batches(n: int, seconds: list[list[float]], seed: int = 0) -> list[dict]:
    """Batch i holds utterances of ``seconds[i]`` seconds (the toy's window is 2 s)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        lengths = seconds[i % len(seconds)]
        out.append({"waveforms": [0.1 * torch.randn(int(16000 * s), generator=g) for s in lengths],
                    "sample_rate": 16000, "labels": [LABELS[(i + j) % 4] for j in range(len(lengths))],
                    "keys": [f"b{i}u{j}" for j in range(len(lengths))], "texts": [None] * len(lengths),
                    "corpus": ["mem"] * len(lengths), "meta": [{} for _ in lengths]})
    return out


def _module(model_dir: str, **kw) -> GRPOModule:
    torch.manual_seed(0)  # the same LoRA initialisation for every module
    settings = dict(labels="iemocap4", rewards={"test_mbt_hash": 1.0}, group_size=G, max_new_tokens=10, prompt=PROMPT,
                    micro_batch_size=3, beta=0.04, accumulate_grad_batches=2, num_iterations=2,
                    gradient_clip_val=None, optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    settings.update(kw)
    module = GRPOModule(AudioLMPolicy(model_dir, lora=LoraSettings(r=4, alpha=8)), **settings)
    module.policy.load()
    return module


def _instrument(module: GRPOModule) -> dict:
    """Records each optimizer step's gradients and every scoring pass's (rows, prompt width, completion width)."""
    seen = {"grads": [], "passes": [], "backward": 0}
    real_step, real_logps, real_backward = module._optimizer_step, module.policy.completion_logps, module.manual_backward

    def step():
        seen["grads"].append({n: p.grad.detach().clone() for n, p in module.policy.named_parameters()
                              if p.requires_grad and p.grad is not None})
        return real_step()

    def logps(rollout, rows=None, **kw):
        seen["passes"].append((len(rows), rollout.prompt.attention_mask.shape[1], rollout.completion_ids.shape[1],
                               torch.is_grad_enabled() and not kw.get("reference", False)))
        return real_logps(rollout, rows, **kw)

    def backward(loss):
        seen["backward"] += 1
        return real_backward(loss)

    module._optimizer_step, module.policy.completion_logps, module.manual_backward = step, logps, backward
    return seen


def _fit(module: GRPOModule, batches: list[dict]) -> None:
    import lightning as L

    trainer = L.Trainer(max_steps=module.hparams.num_iterations, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0)
    trainer.fit(module, DataLoader(batches, batch_size=None))


def _assert_same_grads(fixed: list[dict], token: list[dict]) -> None:
    assert len(fixed) == len(token) == 2  # mu = 2 optimizer steps
    for a, b in zip(fixed, token):
        assert a.keys() == b.keys() and a
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=2e-5, atol=2e-7, msg=name)
    assert max(float(g.abs().max()) for g in fixed[1].values()) > 1e-4


SECONDS = [[0.15, 1.9, 0.3], [1.2, 0.2, 0.6]]  # mixed lengths inside each batch


@pytest.mark.parametrize(("loss_type", "extra"), [
    ("grpo", {}), ("bnpo", {}), ("dr_grpo", {}), ("dapo", {}),
    ("grpo", {"importance_sampling_level": "sequence", "dynamic_sampling": True, "epsilon_high": 0.28}),
], ids=["grpo", "bnpo", "dr_grpo", "dapo", "gspo-dynamic"])
def test_token_budget_gives_the_gradient_of_fixed_micro_batches(toy_model_dir, loss_type, extra):
    """One window of 2 batches (mixed audio lengths), mu = 2, KL to the reference: the gradients of both
    optimizer steps equal those of fixed 3-row micro-batches, while the passes differ (fewer, cut short)."""
    batches = _batches(2, SECONDS)
    fixed = _module(toy_model_dir, loss_type=loss_type, **extra)
    fixed_seen = _instrument(fixed)
    _fit(fixed, batches)
    budget = max(n * (p + c) for n, p, c, _ in fixed_seen["passes"])  # the fixed passes' largest: as much memory
    token = _module(toy_model_dir, loss_type=loss_type, micro_batch_tokens=budget, **extra)
    token_seen = _instrument(token)
    _fit(token, batches)
    _assert_same_grads(fixed_seen["grads"], token_seen["grads"])
    for n, p, c, _ in token_seen["passes"]:
        assert n * (p + c) <= budget
    fixed_tokens = sum(n * (p + c) for n, p, c, _ in fixed_seen["passes"])
    token_tokens = sum(n * (p + c) for n, p, c, _ in token_seen["passes"])
    assert token_tokens < 0.85 * fixed_tokens, (token_tokens, fixed_tokens)  # passes cut to their own rows
    assert token_seen["backward"] <= fixed_seen["backward"]


# ------------------------------------------------------------------- 2 ranks, one with longer rows
def _rank_batches(rank: int) -> list[dict]:
    # rank 0: long audio; rank 1: short audio, so its rows fit several to a pass
    seconds = [[1.9, 1.7]] if rank == 0 else [[0.1, 0.15]]
    return _batches(2, seconds, seed=rank)


def _weights(module: GRPOModule) -> dict[str, list]:
    """The trainable weights, whole (an FSDP2 shard is gathered)."""
    out = {}
    for name, p in module.policy.named_parameters():
        if p.requires_grad:
            t = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[name] = t.detach().tolist()
    return out


def _ranks_worker(rank: int, model_dir: str, out: str, port: int, budget: int, strategy: str) -> None:
    ddp_env(rank, port)
    record = {}
    for mode in ("fixed", "token"):
        module = _module(model_dir, num_iterations=1, micro_batch_tokens=budget if mode == "token" else None)
        seen = _instrument(module)
        record["initial"] = _weights(module)
        kw = {}
        if strategy == "fsdp2":  # every forward all-gathers the weights: unequal pass counts would hang
            from emorl_pl.strategies import FSDP2Strategy

            kw["strategy"] = FSDP2Strategy()
        trainer = ddp_trainer(max_steps=1, **kw)
        trainer.fit(module, DataLoader(_rank_batches(rank), batch_size=None))
        record[mode] = {"passes": [list(p) for p in seen["passes"]], "backward": seen["backward"],
                        "weights": _weights(module)}
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))


def _both_strategies_worker(rank: int, model_dir: str, out: str, port: int, budget: int) -> None:
    """``_ranks_worker`` under DDP, then under FSDP2, in the same 2 processes (their start-up paid once)."""
    for strategy in STRATEGIES:
        Path(out, strategy).mkdir(exist_ok=True)
        _ranks_worker(rank, model_dir, str(Path(out, strategy)), port, budget, strategy)


def _spawn(fn, args: tuple, timeout: float = 240.0) -> None:
    """Start 2 ranks; fail (instead of hanging) if a collective never completes."""
    ctx = mp.start_processes(fn, args=args, nprocs=2, start_method="spawn", join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the ranks did not finish in {timeout:.0f} s (unequal collectives?)")


STRATEGIES = ("ddp", "fsdp2")
BUDGET = 320


@pytest.fixture(scope="module")
def two_rank_runs(toy_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two_ranks")
    _spawn(_both_strategies_worker, (toy_model_dir, str(out), free_port(), BUDGET), timeout=480.0)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_ranks_with_unequal_lengths_issue_equal_passes_and_match_fixed(two_rank_runs, strategy):
    """Rank 0's rows (~1.8 s of audio: ~90 prompt + 10 completion tokens) fit 3 to a pass, rank 1's (~0.1 s:
    ~55 tokens) 5: rank 1 pads its passes with zero-weight ones, so that every rank runs as many forward and
    backward passes (FSDP2 all-gathers in each forward; DDP all-reduces at the last backward); the update
    equals fixed micro-batches'."""
    budget = BUDGET
    runs = [json.loads((two_rank_runs / strategy / f"rank{r}.json").read_text()) for r in (0, 1)]
    token = [r["token"] for r in runs]
    assert len(token[0]["passes"]) == len(token[1]["passes"]) and token[0]["backward"] == token[1]["backward"]
    grad_passes = [[n for n, _, _, grad in t["passes"] if grad] for t in token]
    assert len(grad_passes[0]) == len(grad_passes[1]) == token[0]["backward"]
    assert sum(grad_passes[0]) == 2 * 2 * G and 1 not in grad_passes[0]  # rank 0: only its own rows
    own = [n for n in grad_passes[1] if n > 1]
    assert sum(own) == 2 * 2 * G and len(own) < len(grad_passes[1])  # rank 1: fewer passes, padded with 1-row ones
    for t in token:
        assert all(n * (p + c) <= budget for n, p, c, _ in t["passes"])
    # DDP averaged the same gradient as with fixed micro-batches: the same weights after the step, on both ranks
    for run in runs:
        for name, w in run["fixed"]["weights"].items():
            torch.testing.assert_close(torch.tensor(run["token"]["weights"][name]), torch.tensor(w),
                                       rtol=2e-5, atol=2e-7, msg=name)
            assert run["token"]["weights"][name] == runs[0]["token"]["weights"][name], "ranks hold the same weights"
    moved = max(float((torch.tensor(w) - torch.tensor(runs[0]["initial"][n])).abs().max())
                for n, w in runs[0]["token"]["weights"].items())
    assert moved > 1e-4, "the step moved the weights"
