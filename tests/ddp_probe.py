"""A test callback for multi-process runs: counts DDP's gradient reductions (bucket 0 of each sync) and the
optimizer steps, and writes both per rank to ``<out>/ddp_probe_rank<r>.json`` at the end of fit."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook


class CountGradReductions(L.Callback):
    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.syncs = 0

    def on_train_start(self, trainer, pl_module) -> None:
        def hook(state, bucket):
            if bucket.index() == 0:
                self.syncs += 1
            return allreduce_hook(state, bucket)

        ddp = trainer.strategy.model
        assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel), type(ddp)
        ddp.register_comm_hook(None, hook)

    def on_train_end(self, trainer, pl_module) -> None:
        record = {"syncs": self.syncs, "optimizer_steps": trainer.global_step}
        (self.out / f"ddp_probe_rank{trainer.global_rank}.json").write_text(json.dumps(record))
