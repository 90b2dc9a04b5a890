"""Save models in their published ("hub") checkpoint key layout, and check a saved folder against it.

Why this exists: transformers 5.17 loads a published Qwen2-Audio checkpoint (``audio_tower.*``,
``multi_modal_projector.*``, ``language_model.model.*``, ``language_model.lm_head.weight``) into its in-memory
layout (``model.audio_tower``, ``model.language_model``, ``lm_head``) with the renamings registered for the
class in ``transformers.conversion_mapping``. ``save_pretrained`` undoes them, but for a model that
``from_pretrained`` did not load it rebuilds the list from every nested ``PreTrainedModel``
(``get_model_conversion_mapping``), so the nested ``Qwen2AudioModel``'s own renaming
(``^language_model.model`` -> ``language_model``, meant for loading a bare ``Qwen2AudioModel``) is undone too
and the file gets ``language_model.model.model.*``. Only transformers reads that back; vLLM refuses it, and a
model loaded from such a file saves it doubled again.

The published layout is the undoing of the class's own (root) entry in that mapping alone: the renamings a
published checkpoint of the class is loaded with. It is derived here from transformers, not hard-coded, and
checked against the load direction key by key (every published name must load onto the parameter it came
from). A class without an entry (the Qwen2.5-Omni thinker in 5.17) is saved under its in-memory names, which
is what transformers then expects. (Published Qwen2.5-Omni checkpoints are whole Omni models whose thinker
weights carry a ``thinker.`` prefix; vLLM reads the thinker only from such a folder, with the whole Omni config,
so a thinker-only folder is for transformers.)
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

INDEX_NAME = "model.safetensors.index.json"


def _hub_renamings(model: nn.Module) -> list:
    """The class's root renamings (published name -> in-memory name), as transformers looks them up on load:
    by class name, else by ``config.model_type``; empty where the class has none."""
    from transformers.conversion_mapping import extract_weight_conversions_for_model
    from transformers.core_model_loading import PrefixChange, WeightRenaming

    conversions = extract_weight_conversions_for_model(model) or []
    for conversion in conversions:
        # A converter (fused or split tensors) or a prefix change has no 1:1 name map to check or invert.
        if not isinstance(conversion, WeightRenaming) or isinstance(conversion, PrefixChange):
            raise NotImplementedError(
                f"{type(model).__name__}: transformers converts its checkpoint with {conversion!r}, which is not a "
                "plain renaming; emorl_pl.modules.hub_layout only handles renamings"
            )
    return conversions


def _saved_state_names(model: nn.Module) -> list[str]:
    """The in-memory names of the tensors ``save_pretrained`` writes: the state dict less the keys the class
    never saves and less tied copies (kept once, under the name transformers keeps)."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = model.state_dict()
    for key in getattr(model, "_keys_to_ignore_on_save", None) or ():
        state.pop(key, None)
    return list(remove_tied_weights_from_state_dict(state, model))


def hub_key_map(model: nn.Module) -> dict[str, str]:
    """In-memory name -> published name, for every tensor ``save_pretrained`` writes of ``model``.

    Raises RuntimeError if two tensors would share a name, or if a published name would not load back onto
    the tensor it came from (transformers' own load-time renaming is the judge).
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    renamings = _hub_renamings(model)
    undo = [conversion.reverse_transform() for conversion in renamings[::-1]]
    load = get_model_conversion_mapping(model)  # everything from_pretrained applies, nested ones included
    load_renamings = [c for c in load if not isinstance(c, WeightConverter)]
    load_converters = [c for c in load if isinstance(c, WeightConverter)]
    mapping: dict[str, str] = {}
    for name in _saved_state_names(model):
        published, _ = rename_source_key(name, undo, [], reverse=True)
        loaded_as, _ = rename_source_key(published, load_renamings, load_converters)
        if loaded_as != name:
            raise RuntimeError(f"{type(model).__name__}: {name} would be saved as {published}, which transformers "
                               f"loads as {loaded_as}: the derived published layout is wrong for this version")
        mapping[name] = published
    if len(set(mapping.values())) != len(mapping):
        raise RuntimeError(f"{type(model).__name__}: two tensors map to one published name")
    return mapping


def saved_weight_names(model_dir: str | Path) -> list[str]:
    """The tensor names in a saved folder's safetensors (its index if sharded), sorted."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    index = model_dir / INDEX_NAME
    if index.is_file():
        return sorted(json.loads(index.read_text())["weight_map"])
    names: list[str] = []
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            names += list(f.keys())
    return sorted(names)


def _compare(expected: Iterable[str], saved: Iterable[str], limit: int = 10) -> list[str]:
    expected, saved = set(expected), set(saved)
    unexpected, missing = sorted(saved - expected), sorted(expected - saved)
    problems = [f"{key}: not a key of the published layout" for key in unexpected[:limit]]
    problems += [f"{key}: missing (the published layout has it)" for key in missing[:limit]]
    if len(unexpected) > limit or len(missing) > limit:
        problems.append(f"... {len(unexpected)} unexpected and {len(missing)} missing keys in all")
    return problems


def meta_model(model_dir: str | Path) -> nn.Module:
    """The model class of a saved folder (by its family, see families.py), built on the meta device: names and
    shapes without memory or random init."""
    from transformers import AutoConfig

    from emorl_pl.modules.families import family_for, import_class

    config_path = Path(model_dir) / "config.json"
    config = AutoConfig.from_pretrained(model_dir)
    cls = import_class(family_for(config.model_type, str(config_path)).model_class)
    with torch.device("meta"):
        return cls(config)


def hub_layout_problems(model_dir: str | Path) -> list[str]:
    """What keeps a saved folder's weights from being in the published layout of its model class: each
    saved key that is not a published name (e.g. transformers' doubled ``language_model.model.model.*``) and
    each published name that is missing. Empty when the layout is right."""
    model_dir = Path(model_dir)
    saved = saved_weight_names(model_dir)
    if not saved:
        return [f"{model_dir}: no safetensors weights"]
    return _compare(hub_key_map(meta_model(model_dir)).values(), saved)


def save_in_hub_layout(model: nn.Module, out_dir: str | Path, **save_kwargs) -> Path:
    """``model.save_pretrained(out_dir, **save_kwargs)`` with the weights under their published names; the
    written names are checked against ``hub_key_map`` (RuntimeError if transformers wrote anything else)."""
    if save_kwargs.get("save_original_format") is False:
        raise ValueError("save_in_hub_layout writes the published layout; save_original_format=False contradicts it")
    expected = hub_key_map(model)
    out_dir = Path(out_dir)
    # save_pretrained undoes the renamings in ``_weight_conversions`` (what from_pretrained set: the ones the
    # loaded checkpoint used) and otherwise all of get_model_conversion_mapping, nested ones included, which
    # doubles ``language_model.model``. Setting it to the published renamings for the call saves the model as
    # if it had been loaded from a published checkpoint.
    had, previous = "_weight_conversions" in vars(model), vars(model).get("_weight_conversions")
    model._weight_conversions = _hub_renamings(model)
    try:
        model.save_pretrained(out_dir, **save_kwargs)
    finally:
        if had:
            model._weight_conversions = previous
        else:
            del model._weight_conversions
    problems = _compare(expected.values(), saved_weight_names(out_dir))
    if problems:
        raise RuntimeError(f"{out_dir}: save_pretrained did not write the published layout: {problems}")
    return out_dir
