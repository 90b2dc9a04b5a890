"""Log sampled completions (key, gold, each of the G answers and its rewards) to TensorBoard as text."""

from __future__ import annotations

from typing import Any

import lightning as L


class CompletionSamples(L.Callback):
    """Every ``every_n_steps`` training steps, write the last rollout of ``max_prompts`` utterances."""

    def __init__(self, every_n_steps: int = 50, max_prompts: int = 2) -> None:
        self.every_n_steps = every_n_steps
        self.max_prompts = max_prompts

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        last = getattr(pl_module, "_last_rollout", None)
        if last is None or not trainer.is_global_zero or trainer.global_step % self.every_n_steps != 0:
            return
        experiment = getattr(trainer.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_text"):
            return
        experiment.add_text("completions", render_samples(*last, group_size=pl_module.hparams.group_size,
                                                          max_prompts=self.max_prompts), trainer.global_step)
        pl_module._last_rollout = None


def render_samples(keys, golds, texts, scored, *, group_size: int, max_prompts: int) -> str:
    """Markdown: per utterance, a table of the G answers with total and per-reward scores."""
    names = list(scored.per_reward)
    out = []
    for b in range(min(max_prompts, len(texts) // group_size)):
        key = keys[b] if keys else str(b)
        out.append(f"**{key}** (gold: {golds[b * group_size]})\n")
        out.append("| # | total | " + " | ".join(names) + " | answer |\n|" + "---|" * (len(names) + 3))
        for g in range(group_size):
            i = b * group_size + g
            per = " | ".join("-" if scored.per_reward[n][i] is None else f"{scored.per_reward[n][i]:.2f}" for n in names)
            text = texts[i].replace("|", "\\|").replace("\n", " ")
            out.append(f"| {g} | {scored.total[i]:.2f} | {per} | `{text}` |")
        out.append("")
    return "\n".join(out)
