"""``emorl-plan``: will this recipe fit? Peak GPU memory per rank, piece by piece, before anything is loaded.

    emorl-plan -c configs/trainer/fsdp2_8gpu.yaml --model configs/model/emorl_qwen2_audio_7b.yaml \\
        --data configs/data/iemocap.yaml --model-config configs/model/qwen2_audio_7b_config.json

Reads the same LightningCLI YAML files as ``emorl fit`` (``-c`` whole configs, ``--model`` / ``--data`` /
``--trainer`` section files, ``--section.key value`` overrides) and the model's ``config.json`` (from
``model_dir``, or ``--model-config``), then prints ``emorl_pl.memory_plan.plan``: what each rank holds
throughout, each stage of a step on top of it, the peak, whether it fits ``--gpu-memory`` GiB with a 15%
margin and, when it does not, what to change with the new estimate. No model is loaded; the constructor
defaults it fills in (``GRPOModule``, ``AudioLMPolicy``, ``LoraSettings``, ``ShardDataModule``) and the FSDP2
mesh (``strategies.mesh_shape``) are read from the code itself, so it imports torch and Lightning.

With ``--model.init_args.policy.init_args.rollout_engine vllm`` (and ``...policy.init_args.vllm: {...}``) it
counts the colocated vLLM engine (its weight copy, its reservation of ``gpu_memory_utilization`` of the
``--gpu-memory``, sleep mode) and says whether sleep mode changes the verdict; ``VLLMSettings``' defaults
come from ``emorl_pl.modules.vllm_engine`` itself (``memory_plan.vllm_engine_defaults``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import inspect
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from emorl_pl.memory_plan import (
    DTYPE_BYTES,
    LM_PROJECTIONS,
    MARGIN,
    TEXT_TOKENS,
    VLLM_DTYPES,
    ModelGeometry,
    Plan,
    PlanSettings,
    audio_params,
    audio_tokens,
    engine_activation_bytes,
    engine_dtype,
    engine_kv_tokens,
    engine_reserved_bytes,
    engine_weight_bytes,
    lm_params,
    lora_adapted_targets,
    plan,
    rollout_engines,
    suggestions,
    text_tokens,
    trainable_params,
    verdict,
    vllm_engine_defaults,
)

POLICY = ("model", "init_args", "policy", "init_args")
# The constructor arguments the plan reads; their defaults come from the constructors (``constructor_defaults``).
MODULE_KEYS = ("group_size", "max_new_tokens", "beta", "micro_batch_size", "num_iterations", "accumulate_grad_batches",
               "mode", "labels", "eval_max_new_tokens")
POLICY_KEYS = ("dtype", "gradient_checkpointing", "lora", "freeze_audio_tower", "fused_decode", "rollout_engine", "vllm")
LORA_KEYS = ("r", "dropout", "target_modules")
DATA_KEYS = ("batch_size", "eval_batch_size", "max_duration", "label_set")
# Number of labels of the named label sets (emorl_pl.emotions.LABEL_SETS), for the prompt's length.
LABEL_SET_SIZES = {"iemocap4": 4, "meld7": 7, "ravdess8": 8, "cremad6": 6, "savee7": 7}
# Qwen2Config / Qwen2AudioEncoderConfig defaults (transformers 5.17): the published Qwen2-Audio config.json
# leaves the language model's geometry to them.
QWEN2_TEXT_DEFAULTS = {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016,
                       "num_hidden_layers": 32, "num_attention_heads": 32, "tie_word_embeddings": False}
AUDIO_DEFAULTS = {"d_model": 1280, "encoder_layers": 32, "encoder_attention_heads": 20, "encoder_ffn_dim": 5120,
                  "num_mel_bins": 128, "max_source_positions": 1500}


AUDIO_ALIASES = {"d_model": "hidden_size", "encoder_layers": "num_hidden_layers",
                 "encoder_attention_heads": "num_attention_heads", "encoder_ffn_dim": "intermediate_size"}


class PlanConfigError(ValueError):
    """A config lacks something the plan needs, or has a value it cannot read (the message names it)."""


def constructor_defaults() -> dict[str, dict[str, Any]]:
    """The defaults of the arguments the plan reads, from the code when called: ``GRPOModule.__init__``
    ("module"), ``AudioLMPolicy.__init__`` ("policy"), the ``LoraSettings`` dataclass ("lora") and
    ``ShardDataModule.__init__`` ("data")."""
    from emorl_pl.datamodules.webdataset import ShardDataModule
    from emorl_pl.modules.grpo_module import GRPOModule
    from emorl_pl.modules.policy import AudioLMPolicy, LoraSettings

    def signature(fn: Any, keys: Sequence[str]) -> dict[str, Any]:
        params = inspect.signature(fn).parameters
        return {k: params[k].default for k in keys}

    lora = {f.name: f.default for f in dataclasses.fields(LoraSettings)}
    return {"module": signature(GRPOModule.__init__, MODULE_KEYS),
            "policy": signature(AudioLMPolicy.__init__, POLICY_KEYS),
            "lora": {k: lora[k] for k in LORA_KEYS},
            "data": signature(ShardDataModule.__init__, DATA_KEYS)}


# ------------------------------------------------------------------------------------------ config.json
def geometry_from_config(path: str | Path) -> ModelGeometry:
    """The shapes of a Qwen2-Audio (``qwen2_audio``), Audio Flamingo 3 (``audioflamingo3``), Qwen2.5-Omni or
    Qwen3-Omni-MoE (thinker) config.json; keys the file leaves out take transformers' defaults, as
    ``from_pretrained`` would. The Omni thinkers' towers (audio, and vision, which the thinker loads too) are
    counted by building the thinker on the meta device (``_tower_params``)."""
    path = Path(path)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PlanConfigError(f"{path}: no such file (pass --model-config PATH/config.json)") from None
    except json.JSONDecodeError as err:
        raise PlanConfigError(f"{path}: not valid JSON ({err})") from None
    outer = config
    if "thinker_config" in config:  # Qwen2.5-Omni, Qwen3-Omni: the thinker is the audio-LM
        config = config["thinker_config"]
    model_type = config.get("model_type")
    known = ("qwen2_audio", "audioflamingo3", "qwen2_5_omni_thinker", "qwen3_omni_moe_thinker")
    if model_type not in known:
        raise PlanConfigError(f"{path}: model_type {model_type!r} is not one of {', '.join(known)}")
    text = {**QWEN2_TEXT_DEFAULTS, **config.get("text_config", {})}
    # transformers 5 writes some encoder configs (AudioFlamingo3EncoderConfig) with the generic names, which its
    # attribute_map aliases to Whisper's: either spelling is read.
    given = dict(config.get("audio_config", {}))
    for whisper, generic in AUDIO_ALIASES.items():
        if whisper not in given and generic in given:
            given[whisper] = given[generic]
    audio = {**AUDIO_DEFAULTS, **given}

    def size(section: str, values: Mapping[str, Any], key: str) -> int:
        return _count(values[key], f"{section}.{key}", str(path))

    def optional_size(key: str) -> int | None:  # null or absent: derived from the other sizes
        return None if text.get(key) is None else size("text_config", text, key)

    heads = size("text_config", text, "num_attention_heads")
    hidden = size("text_config", text, "hidden_size")
    # transformers writes the checkpoint's dtype as torch_dtype (older) or dtype (5.x), top level or per part.
    dtypes = [c.get(k) for c in (config, outer, text) for k in ("torch_dtype", "dtype")]
    moe = model_type == "qwen3_omni_moe_thinker"
    moe_sizes = ({"num_experts": size("text_config", text, "num_experts"),
                  "experts_per_token": size("text_config", text, "num_experts_per_tok"),
                  "moe_intermediate_size": size("text_config", text, "moe_intermediate_size")} if moe else {})
    omni = model_type.endswith("_thinker")
    torch_dtype = next((d for d in dtypes if isinstance(d, str)), None)
    features = _feature_extractor(path, outer.get("model_type", model_type), omni)
    return ModelGeometry(
        vocab_size=size("text_config", text, "vocab_size"),
        hidden_size=hidden,
        num_layers=size("text_config", text, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=optional_size("num_key_value_heads") or heads,
        head_dim=optional_size("head_dim") or hidden // heads,
        intermediate_size=size("text_config", text, "intermediate_size"),
        tie_word_embeddings=bool(text.get("tie_word_embeddings", config.get("tie_word_embeddings", False))),
        audio_d_model=size("audio_config", audio, "d_model"),
        audio_layers=size("audio_config", audio, "encoder_layers"),
        audio_heads=size("audio_config", audio, "encoder_attention_heads"),
        audio_ffn=size("audio_config", audio, "encoder_ffn_dim"),
        num_mel_bins=size("audio_config", audio, "num_mel_bins"),
        max_source_positions=size("audio_config", audio, "max_source_positions"),
        projector=model_type in ("qwen2_audio", "audioflamingo3"),
        projector_layers=2 if model_type == "audioflamingo3" else 1,
        attention_bias=bool(text.get("attention_bias", not moe)),  # Qwen2: q/k/v biases; Qwen3: none
        qk_norm=moe,
        **moe_sizes,
        tower_params=_tower_params(model_type, config, str(path)) if omni else None,
        audio_chunk_tokens=13 if moe else None,
        name=path.parent.name if path.name == "config.json" else path.stem,
        torch_dtype=torch_dtype,
        **features,
    )


def _feature_extractor(path: Path, model_type: str, omni: bool) -> dict[str, Any]:
    """``ModelGeometry``'s feature-extractor fields. The window, rate, hop and FFT size from the model folder's
    preprocessor_config.json when there is one; else the release's: the Omni thinkers' published 300 s window
    (``tiny.OMNI_CHUNK_SECONDS``, what their test models are built with), the encoder's 30 s for the others.
    Whether each clip is padded to the whole window: the processor class's own ``audio_kwargs`` default
    (transformers' ``<Processor>Kwargs._defaults``; "max_length" pads to the window, ``True`` to the longest clip)."""
    import transformers
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    processor = getattr(transformers, PROCESSOR_MAPPING_NAMES[model_type])
    padding = processor.valid_processor_kwargs._defaults.get("audio_kwargs", {}).get("padding", "max_length")
    out: dict[str, Any] = {"features_padded_to_window": padding == "max_length"}
    preprocessor = path.with_name("preprocessor_config.json")
    if path.name == "config.json" and preprocessor.is_file():
        try:
            given = json.loads(preprocessor.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise PlanConfigError(f"{preprocessor}: not valid JSON ({err})") from None
        for key in ("sampling_rate", "hop_length", "n_fft"):
            if key in given:
                out[key] = _count(given[key], key, str(preprocessor))
        if "chunk_length" in given:
            out["feature_window_seconds"] = float(_count(given["chunk_length"], "chunk_length", str(preprocessor)))
    elif omni:
        from emorl_pl.modules.tiny import OMNI_CHUNK_SECONDS

        out["feature_window_seconds"] = float(OMNI_CHUNK_SECONDS)
    return out


def _tower_params(model_type: str, config: dict, where: str) -> int:
    """Parameters outside the language model (``model.*`` and ``lm_head``) of the family's model class built
    from ``config`` on the meta device: the Omni thinkers' audio and vision towers."""
    import torch

    from emorl_pl.modules.families import family_for, import_class

    model_class = import_class(family_for(model_type, where).model_class)
    try:
        hf_config = model_class.config_class(**config)
    except (TypeError, ValueError) as err:
        raise PlanConfigError(f"{where}: {model_class.config_class.__name__} cannot read it ({err})") from None
    with torch.device("meta"):
        model = model_class(hf_config)
    return sum(p.numel() for n, p in model.named_parameters()
               if not (n.startswith("model.") or n.startswith("lm_head.")))


# ------------------------------------------------------------------------------------------ YAML files
def deep_merge(base: dict, update: Mapping) -> dict:
    """``update`` over ``base``, recursively for mappings (a later file wins key by key, as LightningCLI);
    a new ``class_path`` replaces the block's ``init_args`` instead of merging into them."""
    out = copy.deepcopy(base)
    if "class_path" in update and update.get("class_path") != out.get("class_path"):
        out.pop("init_args", None)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _load_yaml(path: str) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PlanConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as err:
        raise PlanConfigError(f"{path}: not valid YAML ({err})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise PlanConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _set_dotted(config: dict, dotted: str, value: Any) -> None:
    node = config
    *parents, last = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise PlanConfigError(f"--{dotted}: {key!r} is not a mapping in the merged config")
    node[last] = value


def merged_config(configs: Sequence[str], sections: Mapping[str, Sequence[str]] = (),
                  overrides: Sequence[tuple[str, str]] = ()) -> tuple[dict, dict[str, str]]:
    """The run's config as ``emorl fit`` would merge it: whole-config files in order, then section files
    (``--model FILE``), then ``--a.b.c VALUE`` overrides (values parsed as YAML). Also returns, per
    top-level section, the files that set it (for error messages)."""
    config: dict = {}
    origin: dict[str, list[str]] = {}
    for path in configs:
        data = _load_yaml(path)
        config = deep_merge(config, data)
        for key in data:
            origin.setdefault(key, []).append(path)
    for section, paths in dict(sections).items():
        for path in paths:
            config = deep_merge(config, {section: _load_yaml(path)})
            origin.setdefault(section, []).append(path)
    for dotted, raw in overrides:
        _set_dotted(config, dotted, yaml.safe_load(raw))
        origin.setdefault(dotted.split(".")[0], []).append(f"--{dotted}")
    return config, {k: ", ".join(v) for k, v in origin.items()}


# ------------------------------------------------------------------------------------------ value checks
def _count(value: Any, key: str, where: str, *, optional: bool = False) -> int | None:
    """``value`` as a whole number >= 1 (None allowed when ``optional``); else an error naming ``key`` and
    the file(s) ``where`` it was set. Bools and fractions are refused: ``batch_size: 2.5`` is a typo."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        wanted = "a whole number >= 1" + (" or null" if optional else "")
        raise PlanConfigError(f"{key} must be {wanted}, got {value!r} (in {where})")
    return value


def _number(value: Any, key: str, where: str, *, low: float, low_open: bool, high: float = math.inf,
            optional: bool = False) -> float | None:
    """``value`` as a finite number in [low, high) (or (low, high) when ``low_open``); None allowed when
    ``optional``; else an error naming ``key`` and where it was set."""
    if value is None and optional:
        return None
    number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    above = number > low if low_open else number >= low
    if not (math.isfinite(number) and above and number < high):
        wanted = f"a number {'>' if low_open else '>='} {low:g}" + (f" and < {high:g}" if high < math.inf else "")
        raise PlanConfigError(f"{key} must be {wanted}{' or null' if optional else ''}, got {value!r} (in {where})")
    return number


def _choice(value: Any, key: str, where: str, choices: Sequence[str], *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if value not in choices:
        raise PlanConfigError(f"{key} must be one of {', '.join(choices)}, got {value!r} (in {where})")
    return value


def _prefix(config: dict, section: str) -> str:
    """The dotted path of a section's constructor arguments, for messages: ``data.init_args.`` or ``data.``."""
    block = config.get(section)
    return f"{section}.init_args." if isinstance(block, dict) and "class_path" in block else f"{section}."


def _get(config: dict, keys: Sequence[str], default: Any = None) -> Any:
    node: Any = config
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return node


def _init_args(config: dict, section: str) -> dict:
    """A section's constructor arguments: ``init_args`` of a class_path block, or the mapping itself."""
    block = config.get(section) or {}
    if not isinstance(block, dict):
        return {}
    return block.get("init_args", {} if "class_path" in block else block) or {}


def _strategy(trainer: dict) -> str:
    strategy = trainer.get("strategy", "auto")
    name = strategy.get("class_path", "") if isinstance(strategy, dict) else str(strategy)
    lowered = name.lower()
    if "fsdp" in lowered or "modelparallel" in lowered:
        return "fsdp2"
    if "ddp" in lowered:
        return "ddp"
    return "auto"


def _devices(trainer: dict, where: str) -> int | None:
    """GPUs of the run, devices x num_nodes; None when Lightning decides (``auto``, -1: every visible GPU)."""
    devices = trainer.get("devices", "auto")
    nodes = 1 if trainer.get("num_nodes") is None else _count(trainer["num_nodes"], "trainer.num_nodes", where)
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if devices in ("auto", None, -1):
        return None
    if isinstance(devices, list) and devices:
        return len(devices) * nodes
    if isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1:
        return devices * nodes
    raise PlanConfigError(f"trainer.devices must be a number >= 1, -1, a non-empty list of GPU indices or 'auto', "
                          f"got {devices!r} (in {where})")


def _shard_degree(strategy_args: Mapping[str, Any], gpus: int, nodes: int, where: str) -> int:
    """FSDP2Strategy's shard degree for ``gpus`` ranks on ``nodes`` nodes, as ``strategies.mesh_shape`` picks it
    from ``trainer.strategy.init_args.shard_degree`` / ``replicate_degree`` ("auto": one node's devices)."""
    from emorl_pl.strategies import mesh_shape

    degrees = {}
    for name in ("shard_degree", "replicate_degree"):
        value = strategy_args.get(name, "auto")
        degrees[name] = value if value == "auto" else _count(value, f"trainer.strategy.init_args.{name}", where)
    if gpus % nodes:
        raise PlanConfigError(f"{gpus} GPUs do not split evenly over trainer.num_nodes {nodes} (in {where})")
    try:
        _, shard = mesh_shape(gpus, gpus // nodes, degrees["shard_degree"], degrees["replicate_degree"])
    except ValueError as err:
        raise PlanConfigError(f"{err} (in {where})") from None
    return shard


def _engine_settings(value: Any, key: str, where: str) -> dict[str, Any]:
    """``policy.init_args.vllm`` (a ``VLLMSettings`` mapping, or null) over the dataclass's defaults, each value
    checked; an unknown key is an error naming the known ones, as jsonargparse would refuse it."""
    defaults = vllm_engine_defaults()
    if value is None:
        return defaults
    if not isinstance(value, dict):
        raise PlanConfigError(f"{key} must be a mapping of VLLMSettings fields or null, got {value!r} (in {where})")
    unknown = sorted(set(value) - set(defaults))
    if unknown:
        raise PlanConfigError(f"{key}: unknown VLLMSettings field(s) {unknown}; known: {sorted(defaults)} (in {where})")
    out = {**defaults, **value}
    fraction = _number(out["gpu_memory_utilization"], key + ".gpu_memory_utilization", where, low=0, low_open=True)
    if fraction > 1:
        raise PlanConfigError(f"{key}.gpu_memory_utilization must be a fraction in (0, 1], got {fraction!r} (in {where})")
    if not isinstance(out["enable_sleep_mode"], bool):
        raise PlanConfigError(f"{key}.enable_sleep_mode must be true or false, got {out['enable_sleep_mode']!r} "
                              f"(in {where})")
    _choice(out["dtype"], key + ".dtype", where, list(VLLM_DTYPES))
    _count(out["max_model_len"], key + ".max_model_len", where)
    return out


def settings_from_config(config: dict, origin: Mapping[str, str], *, audio_seconds: float | None = None,
                         gpus: int | None = None, device: str = "cuda", window_seconds: float = 30.0,
                         reference_dtype: str | None = None,
                         gpu_memory_gib: float | None = None,
                         audio_chunk_tokens: int | None = None) -> tuple[PlanSettings, dict]:
    """``PlanSettings`` of one rank from a merged LightningCLI config; also returns what was assumed
    (audio seconds and where they came from, text tokens, ...) for the printout.

    Under FSDP2 the code shards the full-fine-tuning reference like the policy, in the compute dtype,
    gathers every unit once for a (fused-decode) rollout, and reduces gradients once per optimizer step
    unless the strategy says ``sync_gradients: per_backward``. With ``rollout_engine: vllm`` the engine's
    settings are ``policy.init_args.vllm`` over ``VLLMSettings``' defaults, and its reservation is a fraction
    of ``gpu_memory_gib``."""
    defaults = constructor_defaults()
    module = {**defaults["module"], **_init_args(config, "model")}
    policy = {**defaults["policy"], **(_get(config, POLICY) or {})}
    data = {**defaults["data"], **_init_args(config, "data")}
    trainer = config.get("trainer") or {}
    where_model = origin.get("model", "the model config")
    where_data = origin.get("data", "the data config (or its defaults)")
    where_trainer = origin.get("trainer", "the trainer config")
    if not _get(config, ("model", "init_args", "policy")):
        raise PlanConfigError(f"model.init_args.policy is not set (in {where_model}): pass the model section, "
                              "e.g. --model configs/model/emorl_qwen2_audio_7b.yaml")
    # Every value the plan reads is checked here, so that a nonsensical one is named with its key and file
    # instead of failing as a bare arithmetic error, or giving a plan for an impossible run.
    m, d, pol = _prefix(config, "model"), _prefix(config, "data"), ".".join(POLICY) + "."
    counts = {key: _count(module[key], m + key, where_model)
              for key in ("group_size", "max_new_tokens", "micro_batch_size", "num_iterations", "accumulate_grad_batches")}
    eval_max_new_tokens = _count(module.get("eval_max_new_tokens"), m + "eval_max_new_tokens", where_model, optional=True)
    beta = _number(module["beta"], m + "beta", where_model, low=0, low_open=False)
    mode = _choice(module["mode"], m + "mode", where_model, sorted(TEXT_TOKENS))
    batch_size = _count(data["batch_size"], d + "batch_size", where_data)
    eval_batch_size = _count(data.get("eval_batch_size"), d + "eval_batch_size", where_data, optional=True)
    max_duration = _number(data.get("max_duration"), d + "max_duration", where_data, low=0, low_open=True,
                           optional=True)
    policy_dtype = _choice(policy["dtype"], pol + "dtype", where_model, sorted(DTYPE_BYTES))
    rollout_engine = _choice(policy["rollout_engine"], pol + "rollout_engine", where_model, rollout_engines())
    engine = {}
    if rollout_engine == "vllm":
        engine = _engine_settings(policy["vllm"], pol + "vllm", where_model)

    strategy = _strategy(trainer)
    strategy_args = _get(trainer, ("strategy", "init_args")) or {}
    n = gpus if gpus is not None else _devices(trainer, where_trainer)
    if n is None:
        n = 1 if strategy == "auto" else None
    if n is None:
        raise PlanConfigError(f"trainer.devices is {trainer.get('devices', 'auto')!r} (in {where_trainer}): Lightning "
                              "picks the GPU count at run time; pass --gpus N")
    if strategy == "auto":
        strategy = "single" if n == 1 else "ddp"
    nodes = 1 if trainer.get("num_nodes") is None else _count(trainer["num_nodes"], "trainer.num_nodes", where_trainer)
    shard_degree = _shard_degree(strategy_args, n, nodes, where_trainer) if strategy == "fsdp2" else None

    lora = policy.get("lora")
    lora_rank, lora_targets, lora_dropout = None, LM_PROJECTIONS, 0.0
    if lora is not None:
        if not isinstance(lora, dict):
            raise PlanConfigError(f"{pol}lora must be a mapping of LoRA settings or null, got {lora!r} (in {where_model})")
        lora = {**defaults["lora"], **lora}
        lora_rank = _count(lora["r"], pol + "lora.r", where_model)
        lora_dropout = _number(lora["dropout"], pol + "lora.dropout", where_model, low=0, low_open=False, high=1)
        targets = lora["target_modules"]
        if isinstance(targets, str):
            raise PlanConfigError(f"model.init_args.policy.init_args.lora.target_modules is a regex (in {where_model}); "
                                  "the plan needs a list of projection names")
        lora_targets = tuple(targets or LM_PROJECTIONS)

    labels = data.get("label_set") or module.get("labels")
    num_labels = len(labels) if isinstance(labels, list) else LABEL_SET_SIZES.get(labels, 4)
    if audio_seconds is None:
        audio_seconds = min(float(max_duration), window_seconds) if max_duration else window_seconds
        source = ("data.init_args.max_duration (the longest utterance)" if max_duration
                  else "the feature extractor's window (no data.init_args.max_duration)")
    else:
        source = "--audio-seconds"
    n_text = text_tokens(mode, num_labels)
    n_audio = audio_tokens(audio_seconds, window_seconds, audio_chunk_tokens)
    precision = str(trainer.get("precision", "32-true"))
    if precision in ("32", "64", "16", "bf16"):
        precision = {"32": "32-true", "64": "64-true", "16": "16-mixed", "bf16": "bf16-mixed"}[precision]
    settings = PlanSettings(
        batch_size=batch_size,
        group_size=counts["group_size"],
        prompt_tokens=n_audio + n_text,
        max_new_tokens=counts["max_new_tokens"],
        micro_batch_size=counts["micro_batch_size"],
        lora_rank=lora_rank,
        lora_targets=lora_targets,
        lora_dropout=lora_dropout,
        policy_dtype=policy_dtype,
        precision=precision,
        strategy=strategy,
        num_gpus=int(n),
        num_nodes=nodes,
        shard_degree=shard_degree,
        gradient_checkpointing=bool(policy["gradient_checkpointing"]),
        beta=beta,
        num_iterations=counts["num_iterations"],
        accumulate_grad_batches=counts["accumulate_grad_batches"],
        freeze_audio_tower=bool(policy["freeze_audio_tower"]),
        fused_decode=str(policy["fused_decode"]),
        eval_batch_size=eval_batch_size or batch_size,
        eval_max_new_tokens=eval_max_new_tokens,
        device=device,
        fsdp_param_dtype=_choice(strategy_args.get("param_dtype"), "trainer.strategy.init_args.param_dtype",
                                 where_trainer, sorted(DTYPE_BYTES), optional=True),
        fsdp_sync=_choice(strategy_args.get("sync_gradients", "per_step"), "trainer.strategy.init_args.sync_gradients",
                          where_trainer, ("per_step", "per_backward")),
        reference_sharded=strategy == "fsdp2",
        sharded_loading=strategy == "fsdp2",
        reference_dtype=reference_dtype,
        rollout_gathered=strategy == "fsdp2" and str(policy["fused_decode"]) != "off" and rollout_engine == "fused",
        rollout_engine=rollout_engine,
        vllm_gpu_memory_utilization=engine.get("gpu_memory_utilization"),
        vllm_sleep=engine.get("enable_sleep_mode"),
        vllm_dtype=engine.get("dtype"),
        vllm_max_model_len=engine.get("max_model_len"),
        gpu_memory_gib=gpu_memory_gib,
        audio_seconds=audio_seconds,
    )
    assumed = {"audio_seconds": audio_seconds, "audio_source": source, "audio_tokens": n_audio,
               "text_tokens": n_text, "mode": module["mode"], "num_labels": num_labels}
    return settings, assumed


def model_config_path(config: dict, origin: Mapping[str, str], override: str | None) -> Path:
    """``--model-config``, else ``<model_dir>/config.json``; a clear error naming the key when neither is there."""
    if override:
        return Path(override)
    model_dir = _get(config, (*POLICY, "model_dir"))
    where = origin.get("model", "the config")
    if not model_dir:
        raise PlanConfigError(f"model.init_args.policy.init_args.model_dir is not set (in {where}); "
                              "pass --model-config PATH/config.json")
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise PlanConfigError(
            f"{path} (model.init_args.policy.init_args.model_dir in {where}) does not exist: download the model "
            "there, or pass --model-config PATH/config.json (e.g. configs/model/qwen2_audio_7b_config.json)")
    return path


# ------------------------------------------------------------------------------------------ printing
def _gib(x: float) -> str:
    return f"{x / 2**30:8.2f}"


def format_plan(p: Plan, limit_gib: float, assumed: Mapping[str, Any], source: str) -> str:
    g, s = p.geometry, p.settings
    n_total, n_train = lm_params(g) + audio_params(g), trainable_params(g, s)
    tuning = (f"LoRA r={s.lora_rank} on {len(lora_adapted_targets(g, s.lora_targets))} LM projections" if s.lora
              else "full fine-tuning of the LM")
    strategy = {"single": "one device", "ddp": f"DDP over {s.num_gpus} GPUs",
                "fsdp2": f"FSDP2 over {s.num_gpus} GPUs" + (
                    f" (HSDP: {s.num_gpus // s.shards} replicas of {s.shards} shards)" if s.shards < s.num_gpus
                    else "")}[s.strategy]
    lines = [
        f"Memory plan per GPU ({source})",
        f"  model: {n_total / 1e9:.2f} B parameters (language model {lm_params(g) / 1e9:.2f} B"
        + (f": {g.num_experts} experts, {g.experts_per_token} per token" if g.moe else "")
        + f", {'audio and vision towers' if g.tower_params is not None else 'audio encoder'} "
        f"{audio_params(g) / 1e9:.2f} B); {tuning}: {n_train / 1e9:.3g} B trainable",
        f"  run: {strategy}{f' (param_dtype {s.fsdp_param_dtype})' if s.strategy == 'fsdp2' and s.fsdp_param_dtype else ''};"
        f" policy dtype {s.policy_dtype}; precision {s.precision}; gradient checkpointing "
        f"{'on' if s.gradient_checkpointing else 'off'}; beta {s.beta:g}" + (
            f"; rollouts on a colocated vLLM engine (gpu_memory_utilization {s.engine_settings['gpu_memory_utilization']:g}, "
            f"sleep mode {'on' if s.engine_sleeps else 'off'})" if s.vllm else ""),
        f"  per GPU: B = {s.batch_size} x G = {s.group_size} = {s.rows} rollouts; prompt {s.prompt_tokens} tokens "
        f"({assumed['audio_seconds']:g} s of audio -> {assumed['audio_tokens']} audio tokens, from "
        f"{assumed['audio_source']}; + {assumed['text_tokens']} text, mode {assumed['mode']}); "
        f"max_new_tokens {s.max_new_tokens}; micro-batch {s.micro_rows} rows",
        "",
        f"  {'held throughout':<58}{'GiB':>8}",
    ]
    for piece in p.always:
        lines.append(f"    {piece.name:<56}{_gib(piece.bytes)}   {piece.detail}")
    lines.append(f"    {'total':<56}{_gib(p.always_bytes)}")
    lines += ["", f"  {'each stage of a step, on top of that':<58}{'GiB':>8}  total GiB"]
    peak = p.peak_stage
    for stage in p.stages:
        mark = "  <- peak" if stage is peak else ""
        lines.append(f"    {stage.name:<56}{_gib(stage.bytes)}  {p.stage_total_gib(stage):8.2f}{mark}")
        for piece in stage.pieces:
            lines.append(f"      {piece.name:<54}{_gib(piece.bytes)}             {piece.detail}")
    v = verdict(p.peak_gib, limit_gib)
    headroom = 100 * (1 - p.peak_gib / limit_gib)
    lines += ["", f"  peak per GPU: {p.peak_gib:.2f} GiB ({peak.name}) of {limit_gib:g} GiB: "
              + {"fits": f"fits ({headroom:.0f}% headroom, >= {100 * MARGIN:.0f}% wanted)",
                 "tight": f"fits, but only {headroom:.0f}% headroom (< {100 * MARGIN:.0f}% wanted)",
                 "does not fit": f"DOES NOT FIT ({-headroom:.0f}% over)"}[v]]
    if s.vllm:
        lines += engine_summary(p, limit_gib)
    for note in p.notes:
        lines.append(f"  note: {note}")
    return "\n".join(lines)


_VERDICT_WORDS = {"fits": "fits", "tight": f"tight (under {100 * MARGIN:.0f}% headroom)", "does not fit": "DOES NOT FIT"}


def engine_summary(p: Plan, limit_gib: float) -> list[str]:
    """Two lines on the vLLM engine: its share of the peak (weights, KV cache pool, activations; held throughout
    or, with sleep mode, only while it samples) and the peak and verdict with sleep mode the other way round."""
    g, s = p.geometry, p.settings
    w, r, a = engine_weight_bytes(g, s), engine_reserved_bytes(g, s), engine_activation_bytes(g, s)
    u = s.engine_settings["gpu_memory_utilization"]
    dtype = engine_dtype(g, s)
    in_peak = sum(x.bytes for x in (*p.always, *p.peak_stage.pieces) if x.name.startswith("vLLM engine:"))
    needed = s.rows * (s.prompt_tokens + s.max_new_tokens)
    held = ("on the GPU only while it samples (rollout, validation): sleep mode" if s.engine_sleeps
            else "held throughout (no sleep mode)")
    lines = [f"  vLLM engine: {r / 2**30:.2f} GiB per GPU = max(gpu_memory_utilization {u:g} x {s.gpu_memory_gib:g} GiB, "
             f"W + A): its weights W {w / 2**30:.2f} GiB ({dtype}) + KV cache pool {(r - w - a) / 2**30:.2f} GiB "
             f"(~{engine_kv_tokens(g, s):,} tokens; a rollout's B x G x (P + T) = {needed:,}) + activations A "
             f"{a / 2**30:.2f} GiB; {held}; {in_peak / 2**30:.2f} GiB of the {p.peak_gib:.2f} GiB peak"]
    other = plan(g, dataclasses.replace(s, vllm_sleep=not s.engine_sleeps))
    v, v_other = verdict(p.peak_gib, limit_gib), verdict(other.peak_gib, limit_gib)
    change = (f"sleep mode does not change the verdict ({_VERDICT_WORDS[v]} either way)" if v == v_other else
              f"sleep mode changes the verdict: {_VERDICT_WORDS[v if s.engine_sleeps else v_other]} with it, "
              f"{_VERDICT_WORDS[v_other if s.engine_sleeps else v]} without it")
    lines.append(f"  vLLM sleep mode {'off' if s.engine_sleeps else 'on'} instead: peak {other.peak_gib:.2f} GiB "
                 f"({other.peak_stage.name}), {_VERDICT_WORDS[v_other]}; {change}")
    return lines


def format_suggestions(items: Sequence, limit_gib: float) -> str:
    if not items:
        return ""
    lines = ["", f"  to get {100 * MARGIN:.0f}% under {limit_gib:g} GiB, change{' one of' if len(items) > 1 else ''}:"]
    for item in items:
        if item.combined:
            lines.append("    or all of these together (no single change is enough):")
            lines += [f"      {change}" for change in item.change.split(" + ")[:-1]]
            lines.append(f"      {item.change.split(' + ')[-1]:<94} {item.peak_gib:7.2f} GiB  {item.verdict}")
        else:
            lines.append(f"    {item.change:<96} {item.peak_gib:7.2f} GiB  {item.verdict}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ main
def _positive(kind: type, what: str) -> Any:
    """An argparse ``type``: a finite ``kind`` > 0, else an argparse error (exit 2) naming the flag and
    ``what`` it expects; a zero GPU memory would divide by zero, a negative one give nonsense advice."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what  # argparse's name for the type in its own messages
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="emorl-plan",
        description="Will this recipe fit? Peak GPU memory per rank, piece by piece, from the run's YAML files and "
                    "the model's config.json, before anything is loaded.",
        epilog="Other --section.key VALUE options override the merged config, as with emorl fit.")
    p.add_argument("-c", "--config", action="append", default=[], help="a whole LightningCLI config (repeatable)")
    for section in ("model", "data", "trainer"):
        p.add_argument(f"--{section}", action="append", default=[], metavar="FILE",
                       help=f"a config file for the {section} section alone (repeatable)")
    p.add_argument("--model-config", help="the model's config.json (default: <model_dir>/config.json)")
    p.add_argument("--gpus", type=_positive(int, "a whole number of GPUs >= 1"),
                   help="GPUs of the run (default: trainer.devices x trainer.num_nodes)")
    p.add_argument("--gpu-memory", type=_positive(float, "a number of GiB > 0"), default=80.0,
                   help="memory per GPU in GiB (default 80; a vLLM engine reserves its gpu_memory_utilization of it)")
    p.add_argument("--audio-seconds", type=_positive(float, "a number of seconds > 0"), default=None,
                   help="longest utterance in seconds (default: data max_duration, capped at the 30 s window)")
    p.add_argument("--reference-dtype", choices=("float32", "bfloat16"), default=None,
                   help="what-if: the reference copy's dtype (default: the policy dtype; sharded: the compute dtype)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help=argparse.SUPPRESS)
    return p


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[tuple[str, str]]]:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    overrides: list[tuple[str, str]] = []
    i = 0
    while i < len(rest):
        item = rest[i]
        if not item.startswith("--") or "." not in item:
            parser.error(f"unrecognized argument {item!r} (overrides look like --model.init_args.group_size 8)")
        key, eq, value = item[2:].partition("=")
        if not eq:
            if i + 1 >= len(rest):
                parser.error(f"{item} needs a value")
            value, i = rest[i + 1], i + 1
        overrides.append((key, value))
        i += 1
    if not (args.config or args.model):
        parser.error("pass the run's config: -c CONFIG.yaml (and --model/--data/--trainer section files)")
    return args, overrides


def main(argv: Sequence[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    try:
        config, origin = merged_config(args.config, {"model": args.model, "data": args.data,
                                                     "trainer": args.trainer}, overrides)
        path = model_config_path(config, origin, args.model_config)
        geometry = geometry_from_config(path)
        settings, assumed = settings_from_config(
            config, origin, audio_seconds=args.audio_seconds, gpus=args.gpus, device=args.device,
            window_seconds=geometry.feature_seconds, reference_dtype=args.reference_dtype,
            gpu_memory_gib=args.gpu_memory, audio_chunk_tokens=geometry.audio_chunk_tokens)
        result = plan(geometry, settings)
    except (PlanConfigError, ValueError) as err:
        print(f"emorl-plan: error: {err}", file=sys.stderr)
        return 2
    print(format_plan(result, args.gpu_memory, assumed, str(path)))
    print(format_suggestions(suggestions(geometry, settings, args.gpu_memory), args.gpu_memory))
    return 0


if __name__ == "__main__":
    sys.exit(main())
