"""``emorl-export``: a trained checkpoint -> a plain Hugging Face model folder; or consolidate a sharded one.

    # merge LoRA into the base model; save model + processor (loads with from_pretrained; weights in the
    # published key layout, which vLLM also reads)
    emorl-export --config runs/csv/version_0/config.yaml --ckpt runs/csv/version_0/checkpoints/last.ckpt \\
        --out exported/ [--model_dir BASE_MODEL_DIR] [--overwrite]

    # a sharded (FSDP2, .distcp) checkpoint folder -> one torch.load-able file
    emorl-export --consolidate runs/csv/version_0/checkpoints/last.ckpt --out last-full.ckpt

``--config`` is the run's config (LightningCLI saves it as ``config.yaml`` in the log folder); only its
``model.init_args.policy`` block is used. The checkpoint holds trainable weights only (LoRA), so the base
weights come from ``model_dir``: the model is built empty, the checkpoint's weights are copied into it and
only the others are read from ``model_dir`` (one copy of the model in memory).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from emorl_pl.checkpointing import (
    consolidate_sharded_checkpoint,
    is_sharded_checkpoint,
    policy_state_dict,
)
from emorl_pl.modules.hub_layout import save_in_hub_layout
from emorl_pl.modules.policy import AudioLMPolicy, LoraSettings


def policy_from_config(config_path: str | Path, model_dir: str | None = None) -> AudioLMPolicy:
    """The ``AudioLMPolicy`` described by ``model.init_args.policy`` of a run config (not loaded yet)."""
    import yaml

    config_path = Path(config_path)
    if not config_path.is_file():
        raise FileNotFoundError(f"config {config_path} does not exist")
    config = yaml.safe_load(config_path.read_text()) or {}
    node: Any = config
    for key in ("model", "init_args", "policy"):
        if not isinstance(node, dict) or key not in node:
            raise KeyError(f"{config_path}: no model.init_args.policy block (missing {key!r})")
        node = node[key]
    args = dict(node.get("init_args", node) if isinstance(node, dict) else {})
    if model_dir is not None:
        args["model_dir"] = model_dir
    if "model_dir" not in args:
        raise KeyError(f"{config_path}: model.init_args.policy has no model_dir (or pass --model_dir)")
    lora = args.get("lora")
    if isinstance(lora, dict):
        args["lora"] = LoraSettings(**lora.get("init_args", lora))
    return AudioLMPolicy(**args)


def trained_policy_weights(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """The policy's tensors of a checkpoint (keys relative to the policy), and nothing else of it: a ``.ckpt``
    file is memory-mapped (its optimizer state is never read); of a sharded folder only the
    ``state_dict.policy.*`` tensors are read (no consolidation of the whole folder)."""
    path = Path(ckpt)
    if not is_sharded_checkpoint(path):
        if path.is_dir():
            raise FileNotFoundError(f"{path} is a folder but not a sharded checkpoint (no .metadata inside)")
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except RuntimeError:  # a file in torch's legacy (non-zip) format cannot be mapped
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        return policy_state_dict(checkpoint)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    prefix = "state_dict.policy."
    wanted = {key[len("state_dict."):]: item for key, item in metadata.items()
              if key.startswith(prefix) and isinstance(item, TensorStorageMetadata)}
    if not wanted:
        raise KeyError(f"{path}: no tensor under {prefix!r} in this sharded checkpoint")
    state = {"state_dict": {key: torch.empty(item.size, dtype=item.properties.dtype) for key, item in wanted.items()}}
    dcp.load(state, checkpoint_id=path, no_dist=True)
    return policy_state_dict(state)


def load_trained_policy(config: str | Path, ckpt: str | Path, model_dir: str | None = None) -> AudioLMPolicy:
    """Base model from ``model_dir`` + the checkpoint's trainable weights, on CPU, in eval mode.

    The model is built empty and filled once (``AudioLMPolicy.load(weights=...)``): the checkpoint's weights
    go straight into it and only the others are read from ``model_dir``, so no base copy of the trained
    weights and no frozen reference copy is ever made (one model in memory, plus the checkpoint's tensors
    until each is copied)."""
    policy = policy_from_config(config, model_dir)
    state = trained_policy_weights(ckpt)
    names = set(state)
    try:
        policy.load(reference=False, weights=state)
    except KeyError as err:
        raise KeyError(f"{ckpt}: checkpoint keys do not belong to the policy of {config}: {err.args[0]} (different "
                       "LoRA settings or model?)") from err
    missing_trainable = sorted(set(policy.trainable_parameter_names()) - names)
    if missing_trainable:
        raise KeyError(f"{ckpt}: trainable weights missing from the checkpoint, e.g. {missing_trainable[:3]}")
    return policy.eval()


def export_policy(policy: AudioLMPolicy, out: str | Path, overwrite: bool = False) -> Path:
    """Merge LoRA into the base weights (``merge_and_unload``) and save model + processor, the weights in the
    family's published key layout (``save_in_hub_layout``: what vLLM and the hub's readers expect)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace its contents")
    out.mkdir(parents=True, exist_ok=True)
    model = policy.model.merge_and_unload() if policy.lora is not None else policy.model
    save_in_hub_layout(model, out)
    policy.processor.tokenizer.padding_side = "right"  # save the HF default, not the rollout setting
    policy.processor.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="emorl-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="the run's config.yaml (for the policy block)")
    parser.add_argument("--ckpt", help="checkpoint file or sharded checkpoint folder")
    parser.add_argument("--model_dir", help="base model folder (default: the config's)")
    parser.add_argument("--consolidate", metavar="CKPT_DIR", help="consolidate a sharded checkpoint folder")
    parser.add_argument("--out", required=True, help="output folder (export) or file (--consolidate)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)
    try:
        if args.consolidate:
            out = Path(args.out)
            if out.exists() and not args.overwrite:
                raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
            full = consolidate_sharded_checkpoint(args.consolidate, out)
            print(f"consolidated {args.consolidate} -> {out} ({len(full.get('state_dict', {}))} tensors)")
            return 0
        if not args.config or not args.ckpt:
            parser.error("export needs --config and --ckpt (or use --consolidate CKPT_DIR)")
        policy = load_trained_policy(args.config, args.ckpt, args.model_dir)
        print(f"exported {args.ckpt} -> {export_policy(policy, args.out, args.overwrite)}")
        return 0
    except (FileNotFoundError, FileExistsError, KeyError, ValueError) as err:
        print(f"emorl-export: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
