"""Test callbacks for the FSDP2 / HSDP runs of tests/test_hsdp.py (loaded into ``emorl`` runs by class path;
tests/ is on the runs' PYTHONPATH).

``CountCollectives`` records, per rank, what FSDP2 sends where: for each optimizer step's window of
backward passes, the backward during which each gradient reduce-scatter and all-reduce ran and the ranks
of its process group, and the groups of all parameter all-gathers. ``SaveLoadedState`` writes the
trainable weights and optimizer state as they are after a resume, before the first step, consolidated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist


def _group_ranks(group: Any) -> list[int]:
    return dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)


class CountCollectives(L.Callback):
    """Writes ``<out>/collectives_rank<r>.json``: ``windows`` (one per optimizer step: ``backwards``, and
    ``reduce_scatter`` / ``all_reduce`` as ``[backward index (1-based), group ranks]``), ``gather_groups``,
    ``grad_units`` (FSDP2 units holding a trainable parameter) and ``optimizer_steps``."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from torch.distributed.fsdp import FSDPModule

        self.windows: list[dict[str, Any]] = [{"backwards": 0, "reduce_scatter": [], "all_reduce": []}]
        self.gather_groups: set[tuple[int, ...]] = set()
        self.grad_units = sum(
            1 for m in pl_module.modules() if isinstance(m, FSDPModule)
            and (g := m._get_fsdp_state()._fsdp_param_group) is not None
            and any(p.sharded_param.requires_grad for p in g.fsdp_params)
        )
        real = {name: getattr(dist, name) for name in ("reduce_scatter_tensor", "all_reduce", "all_gather_into_tensor")}

        def record(kind: str, group: Any) -> None:
            window = self.windows[-1]
            window[kind].append([window["backwards"], _group_ranks(group)])

        def reduce_scatter_tensor(output, input, op=dist.ReduceOp.SUM, group=None, async_op=False):
            record("reduce_scatter", group)
            return real["reduce_scatter_tensor"](output, input, op=op, group=group, async_op=async_op)

        def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
            if group is not None and dist.get_process_group_ranks(group) != _group_ranks(None):
                record("all_reduce", group)  # the run's own all-reduces are over every rank
            return real["all_reduce"](tensor, op=op, group=group, async_op=async_op)

        def all_gather_into_tensor(output_tensor, input_tensor, group=None, async_op=False):
            self.gather_groups.add(tuple(_group_ranks(group)))
            return real["all_gather_into_tensor"](output_tensor, input_tensor, group=group, async_op=async_op)

        dist.reduce_scatter_tensor, dist.all_reduce = reduce_scatter_tensor, all_reduce
        dist.all_gather_into_tensor = all_gather_into_tensor

        backward = pl_module.manual_backward

        def manual_backward(*args: Any, **kwargs: Any) -> None:
            self.windows[-1]["backwards"] += 1
            return backward(*args, **kwargs)

        pl_module.manual_backward = manual_backward
        optimizer = trainer.optimizers[0]
        step = optimizer.step

        def counted_step(*args: Any, **kwargs: Any) -> Any:
            result = step(*args, **kwargs)
            self.windows.append({"backwards": 0, "reduce_scatter": [], "all_reduce": []})
            return result

        optimizer.step = counted_step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        record = {"windows": self.windows[:-1], "gather_groups": sorted(self.gather_groups),
                  "grad_units": self.grad_units, "optimizer_steps": trainer.global_step}
        (self.out / f"collectives_rank{trainer.global_rank}.json").write_text(json.dumps(record))


class SaveLoadedState(L.Callback):
    """At the start of training (after a resume has loaded its checkpoint), rank 0 writes ``<out>/loaded.pt``:
    the full trainable weights and optimizer state, gathered from every rank's shards, and the step."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        trainable = {n for n, p in pl_module.named_parameters() if p.requires_grad}
        weights = {k: v for k, v in get_model_state_dict(pl_module, options=full).items() if k in trainable}
        optimizer = get_optimizer_state_dict(pl_module, trainer.optimizers[0], options=full)
        if trainer.global_rank == 0:
            torch.save({"global_step": trainer.global_step, "state_dict": weights, "optimizer": optimizer},
                       self.out / "loaded.pt")
