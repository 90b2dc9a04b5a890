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
from). A class without an entry is saved under its in-memory names, which is what transformers then expects.

The Omni thinkers (``families.py``: ``hub_wrapper_class``) are published inside whole Omni checkpoints: the
Omni config (``thinker_config`` nested) and the thinker's weights under ``thinker.``. vLLM 0.32 serves the
thinker only from such a folder: its ``Qwen2_5OmniThinkerForConditionalGeneration`` /
``Qwen3OmniMoeThinkerForConditionalGeneration`` read ``hf_config.thinker_config`` and map ``thinker.model.`` ->
``language_model.model.``, ``thinker.lm_head.`` -> ``language_model.lm_head.``, ``thinker.`` -> ``""``, skipping
``talker.`` / ``token2wav.`` / ``code2wav.`` (vllm/model_executor/models/qwen2_5_omni_thinker.py,
qwen3_omni_moe_thinker.py, ``hf_to_vllm_mapper``); a thinker-only folder (thinker config, unprefixed names)
has no ``thinker_config`` and names it cannot place. So that is the published layout of these classes:
``save_in_hub_layout`` writes the Omni config (``enable_audio_output: false``, no talker) and the thinker
under ``thinker.``, through the Omni class's own ``save_pretrained``; transformers loads the thinker class from
it (the config's ``thinker_config``, the ``thinker.`` prefix stripped as its ``base_model_prefix``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

INDEX_NAME = "model.safetensors.index.json"


def _hub_conversions(model: nn.Module) -> list:
    """The class's root conversions (published -> in-memory), as transformers looks them up on load: by class
    name, else by ``config.model_type``; empty where the class has none. Plain renamings, and the converters
    that fuse a mixture-of-experts layer's per-expert weights into one tensor per projection (Qwen3-Omni)."""
    from transformers.conversion_mapping import extract_weight_conversions_for_model
    from transformers.core_model_loading import PrefixChange, WeightConverter, WeightRenaming

    conversions = extract_weight_conversions_for_model(model) or []
    for conversion in conversions:
        # A prefix change has no published name of its own to check or invert.
        if not isinstance(conversion, (WeightRenaming, WeightConverter)) or isinstance(conversion, PrefixChange):
            raise NotImplementedError(
                f"{type(model).__name__}: transformers converts its checkpoint with {conversion!r}, which is not a "
                "renaming or a tensor converter; emorl_pl.modules.hub_layout does not handle it"
            )
    return conversions


def _hub_renamings(model: nn.Module) -> list:
    """The class's root renamings: ``_hub_conversions`` where every one is a plain renaming (a 1:1 name map);
    NotImplementedError for a class whose checkpoint tensors are converted (``to_hub_state`` handles those)."""
    from transformers.core_model_loading import WeightConverter

    conversions = _hub_conversions(model)
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    if converters:
        raise NotImplementedError(
            f"{type(model).__name__}: its published tensors are not its own one for one (transformers converts "
            f"{converters[0].source_patterns} -> {converters[0].target_patterns}); use hub_layout.to_hub_state"
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


def _family(model: nn.Module):
    """The model's adapter in ``families.py`` (by ``config.model_type``), or None for a class without one."""
    from emorl_pl.modules.families import FAMILIES

    return FAMILIES.get(getattr(getattr(model, "config", None), "model_type", None))


def hub_prefix(model: nn.Module) -> str:
    """The prefix of ``model``'s weights in its published checkpoint: ``thinker.`` for an Omni thinker (saved in
    the whole Omni model's layout), else empty."""
    family = _family(model)
    return family.hub_prefix if family is not None and family.hub_wrapper_class else ""


def _hub_wrapper(model: nn.Module) -> nn.Module:
    """The published checkpoint's model around ``model``: for an Omni thinker the whole Omni class, built on
    the meta device from the thinker's config without talker (``enable_audio_output: false``), with ``model``
    as its thinker; else ``model`` itself."""
    from emorl_pl.modules.families import import_class

    family = _family(model)
    if family is None or not family.hub_wrapper_class:
        return model
    cls = import_class(family.hub_wrapper_class)
    config = cls.config_class(thinker_config=model.config.to_dict(), enable_audio_output=False)
    config.dtype = model.config.dtype
    with torch.device("meta"):
        wrapper = cls(config)
    wrapper.thinker = model
    wrapper.generation_config = model.generation_config
    return wrapper


def hub_key_map(model: nn.Module) -> dict[str, str]:
    """In-memory name -> published name, for every tensor ``save_pretrained`` writes of ``model``.

    Raises RuntimeError if two tensors would share a name, or if a published name would not load back onto
    the tensor it came from (transformers' own load-time renaming is the judge; an Omni thinker's ``thinker.``
    prefix is stripped first, as loading the thinker class from the whole Omni checkpoint does).
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    prefix = hub_prefix(model)
    renamings = _hub_renamings(model)
    undo = [conversion.reverse_transform() for conversion in renamings[::-1]]
    load = get_model_conversion_mapping(model)  # everything from_pretrained applies, nested ones included
    load_renamings = [c for c in load if not isinstance(c, WeightConverter)]
    load_converters = [c for c in load if isinstance(c, WeightConverter)]
    mapping: dict[str, str] = {}
    for name in _saved_state_names(model):
        published, _ = rename_source_key(name, undo, [], reverse=True)
        loaded_as, _ = rename_source_key(published, load_renamings, load_converters)
        published = prefix + published
        if loaded_as != name:
            raise RuntimeError(f"{type(model).__name__}: {name} would be saved as {published}, which transformers "
                               f"loads as {loaded_as}: the derived published layout is wrong for this version")
        mapping[name] = published
    if len(set(mapping.values())) != len(mapping):
        raise RuntimeError(f"{type(model).__name__}: two tensors map to one published name")
    return mapping


def has_converted_weights(model: nn.Module) -> bool:
    """Whether ``model``'s published tensors are converted, not only renamed (a mixture-of-experts layer's
    per-expert weights, fused in memory)."""
    from transformers.core_model_loading import WeightConverter

    return any(isinstance(c, WeightConverter) for c in _hub_conversions(model))


def to_hub_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (in-memory names of ``model``, e.g. ``merged_state_dict``) as the published checkpoint holds
    it: renamed, converted tensors split back (one per expert) by transformers' own ``revert_weight_conversion``
    with the class's root conversions, and prefixed (``hub_prefix``). ``model`` may be on the meta device."""
    from transformers.core_model_loading import revert_weight_conversion

    had, previous = "_weight_conversions" in vars(model), vars(model).get("_weight_conversions")
    model._weight_conversions = _hub_conversions(model)
    try:
        published = revert_weight_conversion(model, dict(state))
    finally:
        if had:
            model._weight_conversions = previous
        else:
            del model._weight_conversions
    prefix = hub_prefix(model)
    return {prefix + name: tensor for name, tensor in published.items()}


def hub_tensors(model: nn.Module, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """One in-memory tensor of ``model`` as the published checkpoint holds it (``to_hub_state`` of it alone):
    one renamed tensor, or for a fused mixture-of-experts weight one tensor per expert (and per projection).
    For streaming a model's weights to an engine one tensor at a time."""
    return to_hub_state(model, {name: tensor})


class HubConverter:
    """``model``'s in-memory tensors as its published checkpoint holds them, one tensor at a time: what a weight
    sync streams to an engine without a second copy of the model. ``converter(name, tensor)`` is that tensor's
    published tensors (``hub_tensors``): one renamed tensor, or for a fused mixture-of-experts weight one per
    expert and projection; empty for a tensor the checkpoint does not hold (a tied copy). ``sources``: the
    in-memory names the checkpoint needs; ``published``: every published name (``published_names``).
    ``model`` may be on the meta device (``meta_model``)."""

    def __init__(self, model: nn.Module) -> None:
        from transformers.core_model_loading import WeightConverter

        for conversion in _hub_conversions(model):
            # each published tensor must come from one in-memory tensor, or one tensor alone cannot be converted
            if isinstance(conversion, WeightConverter) and len(conversion.target_patterns) > 1:
                raise NotImplementedError(
                    f"{type(model).__name__}: transformers fuses {conversion.target_patterns} into one published "
                    "tensor; a weight sync that streams one tensor at a time cannot write it"
                )
        self.model = model
        # renamed only: one name lookup per tensor (the map checked once against the load direction)
        self.key_map = None if has_converted_weights(model) else hub_key_map(model)
        self.sources = frozenset(self.key_map if self.key_map is not None else _saved_state_names(model))
        self.published = frozenset(published_names(model))

    def __call__(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        if name not in self.sources:
            return {}
        if self.key_map is not None:
            return {self.key_map[name]: tensor}
        return hub_tensors(self.model, name, tensor)


def published_names(model: nn.Module) -> list[str]:
    """Every tensor name of ``model``'s published checkpoint, sorted: ``hub_key_map``'s values, or for a
    class with converted tensors ``to_hub_state``'s names, each checked to load back onto a tensor of
    ``model`` by transformers' own load-time conversion (after ``hub_prefix``)."""
    if not has_converted_weights(model):
        return sorted(hub_key_map(model).values())
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    state = model.state_dict()
    names = sorted(to_hub_state(model, {k: state[k] for k in _saved_state_names(model)}))
    load = get_model_conversion_mapping(model)
    renamings = [c for c in load if not isinstance(c, WeightConverter)]
    converters = [c for c in load if isinstance(c, WeightConverter)]
    prefix = hub_prefix(model)
    for name in names:
        loaded_as, _ = rename_source_key(name[len(prefix):], renamings, converters)
        if loaded_as not in state:
            raise RuntimeError(f"{type(model).__name__}: published {name} would load as {loaded_as}, not a tensor "
                               "of the model: the derived published layout is wrong for this version")
    return names


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
    family = family_for(config.model_type, str(config_path))
    with torch.device("meta"):
        return import_class(family.model_class)(family.model_config(config))


def hub_layout_problems(model_dir: str | Path) -> list[str]:
    """What keeps a saved folder's weights from being in the published layout of its model class: each
    saved key that is not a published name (e.g. transformers' doubled ``language_model.model.model.*``) and
    each published name that is missing. Empty when the layout is right."""
    model_dir = Path(model_dir)
    saved = saved_weight_names(model_dir)
    if not saved:
        return [f"{model_dir}: no safetensors weights"]
    return _compare(published_names(meta_model(model_dir)), saved)


def save_in_hub_layout(model: nn.Module, out_dir: str | Path, **save_kwargs) -> Path:
    """``model.save_pretrained(out_dir, **save_kwargs)`` with the weights under their published names (an Omni
    thinker as the whole Omni model's thinker); the written names are checked against ``published_names``
    (RuntimeError if transformers wrote anything else)."""
    if save_kwargs.get("save_original_format") is False:
        raise ValueError("save_in_hub_layout writes the published layout; save_original_format=False contradicts it")
    expected = published_names(model)
    out_dir = Path(out_dir)
    target = _hub_wrapper(model)  # an Omni thinker: saved as the whole Omni model's thinker
    # save_pretrained undoes the renamings in ``_weight_conversions`` (what from_pretrained set: the ones the
    # loaded checkpoint used) and otherwise all of get_model_conversion_mapping, nested ones included, which
    # doubles ``language_model.model``. Setting it to the published renamings for the call saves the model as
    # if it had been loaded from a published checkpoint.
    had, previous = "_weight_conversions" in vars(target), vars(target).get("_weight_conversions")
    target._weight_conversions = _hub_conversions(target)
    try:
        target.save_pretrained(out_dir, **save_kwargs)
    finally:
        if had:
            target._weight_conversions = previous
        else:
            del target._weight_conversions
    problems = _compare(expected, saved_weight_names(out_dir))
    if problems:
        raise RuntimeError(f"{out_dir}: save_pretrained did not write the published layout: {problems}")
    return out_dir
