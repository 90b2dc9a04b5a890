"""The router's load-balancing (auxiliary) loss of the Qwen3-Omni MoE thinker in the GRPO and cold-start losses,
with TRL 1.16's semantics (``GRPOConfig.router_aux_loss_coef``).

Oracles: the thinker's own ``forward`` on the rows' full [prompt ; completion] sequences with
``output_router_logits=True`` (its ``aux_loss``; with ``labels`` its ``loss``, which adds
``router_aux_loss_coef x aux_loss``), and TRL 1.16.0's own lines copied verbatim from
``trl/trainer/grpo_trainer.py`` (coefficient resolution, per-pass aux averaging, the loss term). The model is the
toy Qwen3-Omni thinker (``tiny.build_tiny_qwen3_omni``): the release's MoE layers, router (linear to every
expert, top-k, renormalised) and layout over 8 experts, top-2, with a 1024-token vocabulary and a 2 s window
(the real-shape model's 152k-row embedding and lm_head would cost most of this file's time and change nothing
the router sees).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

from emorl_pl.cold_start import cold_start_target
from emorl_pl.modules import scoring
from emorl_pl.modules.grpo_module import GRPOModule
from emorl_pl.modules.policy import AudioLMPolicy, PromptEmbeds, Rollout
from emorl_pl.rewards import REWARDS, register_reward

SR = 16000
G = 2
INSTRUCTION = "What is the emotion of the speaker?"


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory) -> str:
    from emorl_pl.modules.tiny import build_tiny_qwen3_omni

    return str(build_tiny_qwen3_omni(tmp_path_factory.mktemp("router_aux") / "model"))


def _waves(lengths=(8000, 24000), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [0.1 * torch.randn(n, generator=g) for n in lengths]


def _batch(lengths=(12000, 16000), seed=0, labels=("happy", "sad")) -> dict:
    waves = _waves(lengths, seed)
    n = len(waves)
    return {"waveforms": waves, "sample_rate": SR, "labels": list(labels[:n]), "keys": [f"u{i}" for i in range(n)],
            "texts": [None] * n, "corpus": ["mem"] * n, "meta": [{} for _ in range(n)]}


def _full_sequences(prompts, rollout: Rollout, rows):
    """The thinker forward's inputs for ``rows``: [prompt ; completion], attention [prompt mask ; completion
    mask] (TRL's ``_compute_loss``), the rows' audio features."""
    rows = torch.as_tensor(rows)
    utt = rows // rollout.group_size
    completion, mask = rollout.completion_ids[rows], rollout.completion_mask[rows]
    return dict(input_ids=torch.cat([prompts.input_ids[utt], completion], 1),
                attention_mask=torch.cat([prompts.attention_mask[utt], mask], 1),
                input_features=prompts.input_features[utt], feature_attention_mask=prompts.feature_attention_mask[utt])


def _thinker_aux(thinker, prompts, rollout, rows) -> torch.Tensor:
    return thinker(**_full_sequences(prompts, rollout, rows), output_router_logits=True).aux_loss


# ------------------------------------------------------------------------------------------ (a) the scoring pass
@pytest.mark.parametrize("path", ["shared_prompt", "full_sequence"])
def test_scoring_pass_aux_loss_equals_the_thinkers_forward(moe_dir, monkeypatch, path):
    """Rows of two utterances (1 and 3 rows: a shared prompt counts 3 times), uneven prompt padding, completions
    cut short by their masks: the pass's aux loss is the thinker's on the rows' full sequences."""
    policy = AudioLMPolicy(moe_dir).load()
    prompts = policy.build_prompts(_waves(), SR, INSTRUCTION, texts=[None, "let me go"])
    assert prompts.attention_mask[0, 0] == 0  # left padding in the shorter prompt
    torch.manual_seed(1)
    rollout = policy.rollout(prompts, 3, max_new_tokens=6, temperature=1.3)
    mask = rollout.completion_mask.clone()
    mask[3, 2:] = 0  # as if EOS came early: these tokens must not count
    mask[5, 4:] = 0
    rollout = dataclasses.replace(rollout, completion_mask=mask)
    used = []
    for name in ("shared_prompt_hidden", "full_sequence_hidden"):
        real = getattr(scoring, name)
        monkeypatch.setattr(scoring, name, lambda *a, _real=real, _name=name, **k: used.append(_name) or _real(*a, **k))
    if path == "full_sequence":  # as under FSDP2 with gradients
        monkeypatch.setattr(scoring, "can_share_prompt", lambda *args: False)
    rows = [0, 3, 4, 5]
    logps, aux = policy.completion_logps(rollout, rows, router_aux_loss=True)
    assert used == [f"{path}_hidden"]
    assert aux.requires_grad
    with torch.no_grad():
        expected = _thinker_aux(policy.hf_model, prompts, rollout, rows)
        torch.testing.assert_close(aux.detach(), expected, rtol=2e-5, atol=1e-6)
        # the masked completion tokens are left out: counting them gives another value
        unmasked = dataclasses.replace(rollout, completion_mask=torch.ones_like(mask))
        assert abs(float(_thinker_aux(policy.hf_model, prompts, unmasked, rows)) - float(expected)) > 1e-4
        # recording the router logits leaves the log-probs as they are
        torch.testing.assert_close(logps.detach(), policy.completion_logps(rollout, rows), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="reference policy's passes compute no load-balancing loss"):
        policy.completion_logps(rollout, rows, reference=True, router_aux_loss=True)


def test_gradient_checkpointing_keeps_the_aux_loss_and_its_gradient(moe_dir):
    """The recipe's setting (LoRA, non-reentrant checkpointing, shared prompt): the router logits recorded inside
    checkpointed layers carry the same aux loss and gradient as without checkpointing."""
    from emorl_pl.modules.policy import LoraSettings

    def policy(checkpointing: bool) -> AudioLMPolicy:
        torch.manual_seed(0)  # LoRA's A init
        p = AudioLMPolicy(moe_dir, gradient_checkpointing=checkpointing, lora=LoraSettings(r=4, alpha=8)).load()
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, q in p.named_parameters():
                if "lora_B" in name:  # B = 0 at init would leave the adapters without effect
                    q.copy_(0.1 * torch.randn(q.shape, generator=g))
        return p

    plain, checkpointed = policy(False), policy(True)
    prompts = plain.build_prompts(_waves(), SR, INSTRUCTION)
    torch.manual_seed(1)
    rollout = plain.rollout(prompts, 3, max_new_tokens=6, temperature=1.3)
    results = []
    for p in (plain, checkpointed):
        _, aux = p.completion_logps(rollout, [0, 3, 4, 5], router_aux_loss=True)
        params = [q for _, q in sorted(p.named_parameters()) if q.requires_grad]
        results.append((aux.detach(), torch.autograd.grad(aux, params)))
    assert scoring.checkpointed_layers(checkpointed.family.decoder(checkpointed.hf_model))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-7)
    for got, want in zip(results[1][1], results[0][1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert max(float(g.abs().max()) for g in results[0][1]) > 1e-3


# ------------------------------------------------------------------------------------------ TRL 1.16.0, verbatim
def trl_resolve(model, args):
    # trl 1.16.0 trl/trainer/grpo_trainer.py, GRPOTrainer.__init__, lines 822-832 (self: a namespace)
    self = SimpleNamespace()
    # MoE load-balancing auxiliary loss. `output_router_logits` in the config means the model returns its router
    # logits; `router_aux_loss_coef` is the architecture's own coefficient, 0.0 when the config declares none.
    text_config = model.config.get_text_config()
    coef = args.router_aux_loss_coef
    self.router_aux_loss_coef = getattr(text_config, "router_aux_loss_coef", 0.0) if coef is None else coef
    if coef and not hasattr(text_config, "output_router_logits"):
        raise ValueError(
            f"`router_aux_loss_coef` is set to {coef} but {type(model).__name__} is not a Mixture-of-Experts model "
            f"that returns its router logits, so there is no auxiliary loss to weight."
        )
    self.aux_loss_enabled = hasattr(text_config, "output_router_logits") and self.router_aux_loss_coef != 0.0
    return self


def trl_aux_term(self, all_aux_losses, loss, mode="train"):
    # trl 1.16.0 trl/trainer/grpo_trainer.py: _get_per_token_logps_and_entropies line 1507 (the forward chunks'
    # aux losses averaged; compute_aux_loss = self.aux_loss_enabled), then _compute_loss lines 3248-3250
    compute_aux_loss = self.aux_loss_enabled
    aux_loss = torch.stack(all_aux_losses).mean() if compute_aux_loss else None
    # The policy loss above is scaled for gradient accumulation (HF auto-scaling is off here), so scale aux too
    if self.aux_loss_enabled:
        normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        loss = loss + self.router_aux_loss_coef * aux_loss / normalizer
    return loss


# ------------------------------------------------------------------------------------------ (c) the coefficient
@pytest.mark.parametrize("coef", [None, 0.0, 0.25])
def test_coefficient_follows_trl_on_moe_and_dense_models(moe_dir, toy_model_dir, coef):
    for model_dir in (moe_dir, toy_model_dir):
        module = GRPOModule(AudioLMPolicy(model_dir), router_aux_loss_coef=coef)
        module.policy.load(reference=False)  # the config is all either side reads
        args = SimpleNamespace(router_aux_loss_coef=coef)
        if coef and model_dir == toy_model_dir:  # a dense model: both refuse
            with pytest.raises(ValueError, match="not a Mixture-of-Experts model"):
                trl_resolve(module.policy.hf_model, args)
            with pytest.raises(ValueError, match="not a mixture-of-experts model"):
                module.configure_model()
            continue
        module.configure_model()
        trl = trl_resolve(module.policy.hf_model, args)
        ours = module.router_aux_coef()
        assert ours == trl.router_aux_loss_coef and (ours != 0) == trl.aux_loss_enabled
    assert GRPOModule(AudioLMPolicy(moe_dir), router_aux_loss_coef=coef).router_aux_coef() == (
        0.001 if coef is None else coef)  # None: the release's text_config.router_aux_loss_coef


def test_nonzero_coefficient_on_a_dense_model_and_bad_values_are_refused(toy_model_dir):
    module = GRPOModule(AudioLMPolicy(toy_model_dir), router_aux_loss_coef=0.1)
    with pytest.raises(ValueError, match=r"router_aux_loss_coef is 0.1 but Qwen2AudioForConditionalGeneration .*"
                                         r"not a mixture-of-experts model"):
        module.configure_model()
    policy = AudioLMPolicy(toy_model_dir).load()
    with pytest.raises(ValueError, match="not a Mixture-of-Experts model"):  # TRL refuses it too
        trl_resolve(policy.hf_model, SimpleNamespace(router_aux_loss_coef=0.1))
    with pytest.raises(ValueError, match="Qwen2Audio .* is a dense model"):
        policy.completion_logps(policy.teacher_forcing(policy.build_prompts(_waves((8000,)), SR, INSTRUCTION), ["hi"]),
                                router_aux_loss=True)
    for bad in (True, "0.1", float("nan")):
        with pytest.raises(ValueError, match="model.init_args.router_aux_loss_coef must be null"):
            GRPOModule(AudioLMPolicy(toy_model_dir), router_aux_loss_coef=bad)


def test_zero_coefficient_computes_no_router_logits_even_when_the_config_asks(moe_dir, monkeypatch):
    """0.0 (TRL: disabled) with ``output_router_logits: true`` in the config: the scoring passes' decoder calls
    return no router logits, nothing is added or logged."""
    module = _module(moe_dir, 0.0)
    module.policy.load()
    module.policy.hf_model.config.text_config.output_router_logits = True
    decoder = module.policy.family.decoder(module.policy.hf_model)
    scoring_calls, recorded = [], []
    real = scoring.completion_hidden

    def spy(*args, **kwargs):
        handle = decoder.register_forward_hook(lambda m, a, out: recorded.append(getattr(out, "router_logits", None)))
        try:
            scoring_calls.append(kwargs.get("router_mask"))
            return real(*args, **kwargs)
        finally:
            handle.remove()

    monkeypatch.setattr(scoring, "completion_hidden", spy)
    trainer = _trainer()
    trainer.fit(module, DataLoader([_batch()], batch_size=None))
    assert scoring_calls and all(m is None for m in scoring_calls)
    assert recorded and all(r is None for r in recorded)
    assert "aux_loss" not in trainer.callback_metrics and math.isfinite(float(trainer.callback_metrics["loss"]))


# ------------------------------------------------------------------------------------------ (b) the GRPO loss
if "test_router_hash" not in REWARDS:

    @register_reward("test_router_hash")
    class RouterHashReward:
        """Varies with the completion's text, so that advantages are non-zero."""

        def __init__(self, labels, mode="esr"):
            pass

        def __call__(self, completions, labels, **columns):
            return [(sum(map(ord, c)) % 7) / 6 for c in completions]


def _module(model_dir: str, coef: float | None, lr: float = 0.5, **kwargs) -> GRPOModule:
    settings = dict(labels="iemocap4", rewards={"test_router_hash": 1.0}, group_size=G, max_new_tokens=5,
                    micro_batch_size=G, beta=0.0, gradient_clip_val=None, router_aux_loss_coef=coef,
                    optimizer=lambda p: torch.optim.SGD(p, lr=lr))
    return GRPOModule(AudioLMPolicy(model_dir), **(settings | kwargs))


def _trainer(**kwargs) -> L.Trainer:
    return L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, **kwargs)


def _fit_capturing_rollout(module: GRPOModule, batch: dict, monkeypatch) -> tuple[dict, Rollout]:
    real, rollouts = module.policy.rollout, []
    monkeypatch.setattr(module.policy, "rollout", lambda *a, **k: rollouts.append(real(*a, **k)) or rollouts[-1])
    trainer = _trainer()
    trainer.fit(module, DataLoader([batch], batch_size=None))
    (rollout,) = rollouts
    return {k: float(v) for k, v in trainer.callback_metrics.items()}, rollout


def test_grpo_loss_adds_trls_aux_term_and_its_gradient_reaches_the_router(moe_dir, monkeypatch):
    """Full fine-tuning, two passes (one utterance's G rows each: a prompt shared by G rows): the step with aux on
    equals the step with aux off plus TRL's term on the thinker's own aux losses, in the logged loss and, SGD
    being linear in the gradient, in the weights: w_off - w_on = lr x d(term)/dw, router weights included."""
    coef, lr = 0.5, 0.5
    batch = _batch()
    on = _module(moe_dir, coef, lr)
    off = _module(moe_dir, 0.0, lr)
    logged_on, rollout = _fit_capturing_rollout(on, batch, monkeypatch)
    logged_off, rollout_off = _fit_capturing_rollout(off, batch, monkeypatch)
    assert torch.equal(rollout.completion_ids, rollout_off.completion_ids)  # seeded: the same samples

    twin = AudioLMPolicy(moe_dir).load()  # the weights both runs started from
    prompts = on._prompts(batch)
    assert torch.equal(prompts.input_ids, rollout.prompt.input_ids)
    self = trl_resolve(twin.hf_model, SimpleNamespace(router_aux_loss_coef=coef))
    self.current_gradient_accumulation_steps = 2  # TRL's micro-batches per step: our two passes
    passes = [[0, 1], [2, 3]]
    auxes = [_thinker_aux(twin.hf_model, prompts, rollout, rows) for rows in passes]
    term = sum(trl_aux_term(self, [aux], torch.zeros(())) for aux in auxes)
    assert logged_on["loss"] == pytest.approx(logged_off["loss"] + float(term), abs=2e-6)
    assert logged_on["aux_loss"] == pytest.approx(float(torch.stack(auxes).mean()), rel=1e-5)
    assert "aux_loss" not in logged_off

    names = [n for n, p in twin.named_parameters() if p.requires_grad]
    grads = dict(zip(names, torch.autograd.grad(term, [p for n, p in twin.named_parameters() if n in names],
                                                allow_unused=True)))
    w_on, w_off = dict(on.policy.named_parameters()), dict(off.policy.named_parameters())
    routers = [n for n in names if n.endswith("mlp.gate.weight")]
    assert len(routers) == 2 and all(grads[n] is not None and float(grads[n].abs().max()) > 1e-5 for n in routers)
    for name in names:
        expected = torch.zeros_like(w_on[name]) if grads[name] is None else lr * grads[name]
        torch.testing.assert_close((w_off[name] - w_on[name]).detach(), expected, atol=2e-7, rtol=1e-4, msg=name)


# ------------------------------------------------------------------------------------------ (e) the cold start
def test_cold_start_with_aux_equals_the_thinkers_forward_loss_with_labels(moe_dir):
    """One cold-start pass over the batch (coefficient from the config, 0.001): the logged SFT loss is
    transformers' ``loss`` with labels and ``output_router_logits`` (mean cross-entropy + 0.001 x aux_loss)."""
    module = _module(moe_dir, None, micro_batch_size=8, sft_steps=1, mode="esr")
    module.policy.load()
    batch = _batch()
    with torch.no_grad():
        pe = module.policy.encode_prompts(module._prompts(batch))
        targets = [cold_start_target("esr", label, {}) for label in batch["labels"]]
        rollout = module.policy.teacher_forcing(pe, targets)
        inputs = _full_sequences(module._prompts(batch), rollout, [0, 1])
        labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
        labels[:, : pe.input_ids.shape[1]] = -100  # the targets only
        out = module.policy.hf_model(**inputs, labels=labels, output_router_logits=True)
    trainer = _trainer()
    trainer.fit(module, DataLoader([batch], batch_size=None))
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert logged["sft/loss"] == pytest.approx(float(out.loss), rel=1e-6, abs=1e-6)
    assert logged["sft/aux_loss"] == pytest.approx(float(out.aux_loss), rel=1e-5)
    assert float(0.001 * out.aux_loss) > 1e-3  # the aux term is there to see


# ------------------------------------------------------------------------------------------ (d) FSDP2, 2 processes
TEXTS = ("happy", "I think this is sad", "<think>calm</think> neutral", "angry!", "no idea at all, sorry")


def _fixed_rollouts(policy: AudioLMPolicy) -> None:
    """Replace sampling with fixed completions chosen by each prompt's own tokens (so a rank's utterance gets the
    same completions as in one process over the whole batch); the rest of the step is the module's."""

    def rollout(prompts, group_size, **kwargs):
        pe = prompts if isinstance(prompts, PromptEmbeds) else policy.encode_prompts(prompts)
        tok = policy.processor.tokenizer
        texts = [TEXTS[(int(m.sum()) + j) % len(TEXTS)] for m in pe.attention_mask for j in range(group_size)]
        rows = [tok(t, add_special_tokens=False)["input_ids"] + [policy.eos_token_ids[0]] for t in texts]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), policy.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
        return Rollout(pe, ids, mask, torch.zeros(len(rows), dtype=torch.bool), texts, group_size)

    policy.rollout = rollout


LENGTHS = (12000, 17000)


def _step_module(model_dir: str) -> GRPOModule:
    module = _module(model_dir, 0.5, lr=0.2)
    _fixed_rollouts(module.policy)
    return module


def _compared(module: GRPOModule) -> dict[str, torch.Tensor]:
    """The weights the step moves that are cheap to compare: every decoder layer's (router, experts, attention)."""
    out = {}
    for name, p in module.policy.named_parameters():
        if ".layers." in name and "audio_tower" not in name and "visual" not in name:
            out[name] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()  # a collective
    return out


def _fsdp2_worker(rank: int, model_dir: str, out: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), GROUP_RANK="0", LOCAL_WORLD_SIZE="2", TORCHELASTIC_RUN_ID="router")
    torch.set_num_threads(1)
    from emorl_pl.strategies import FSDP2Strategy

    module = _step_module(model_dir)
    trainer = _trainer(devices=2, strategy=FSDP2Strategy(), use_distributed_sampler=False)
    batch = _batch((LENGTHS[rank],), seed=rank, labels=(("happy", "sad")[rank],))
    trainer.fit(module, DataLoader([batch], batch_size=None))
    weights = _compared(module)
    record = {k: float(trainer.callback_metrics[k]) for k in ("loss", "aux_loss")}
    record["sharded"] = all(type(p).__name__ == "DTensor" for p in module.policy.parameters())
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))
    if rank == 0:
        torch.save(weights, Path(out, "weights.pt"))


def test_fsdp2_grpo_step_with_aux_equals_one_process_on_the_global_batch(moe_dir, tmp_path):
    """2 ranks (gloo), one utterance each, full fine-tuning, aux on (0.5): loss, aux loss and updated weights
    equal one process over both utterances in two passes (FSDP2 averages the ranks' gradients as TRL's
    accumulation averages its micro-batches)."""
    port = 29500 + (os.getpid() + 311) % 1000
    mp.start_processes(_fsdp2_worker, args=(moe_dir, str(tmp_path), port), nprocs=2, start_method="spawn")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["sharded"] for r in ranks)
    sharded_weights = torch.load(tmp_path / "weights.pt")

    single = _step_module(moe_dir)
    single.policy.load()
    before = _compared(single)
    trainer = _trainer()
    both = [_batch((n,), seed=r) for r, n in enumerate(LENGTHS)]
    batch = {k: (both[0][k] + both[1][k] if isinstance(both[0][k], list) else both[0][k]) for k in both[0]}
    batch["labels"] = ["happy", "sad"]
    trainer.fit(single, DataLoader([batch], batch_size=None))
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert logged["loss"] == pytest.approx((ranks[0]["loss"] + ranks[1]["loss"]) / 2, abs=2e-6)
    assert logged["aux_loss"] == pytest.approx((ranks[0]["aux_loss"] + ranks[1]["aux_loss"]) / 2, rel=1e-5)
    after = _compared(single)
    assert sorted(after) == sorted(sharded_weights)
    moved = [n for n in after if not torch.equal(after[n], before[n])]
    assert any(n.endswith("mlp.gate.weight") for n in moved)
    for name, weight in after.items():
        torch.testing.assert_close(sharded_weights[name], weight, atol=2e-6, rtol=1e-5, msg=name)
