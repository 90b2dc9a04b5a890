"""Rewards for GRPO: ESWR (emotion similarity-weighted), format and accuracy; a registry and a weighted set.

Every reward is a callable ``fn(completions, labels, **columns) -> list[float | None]`` where ``labels``
are canonical gold labels, one per completion, and ``None`` means "not applicable" (left out of that
reward's mean and of the weighted total). The trainer passes every per-utterance column of the batch,
one entry per completion (``keys``/``key``, ``texts``/``transcript``, ``speaker``, ``corpus``, ``meta``,
``group``, ...) and ``progress`` (fraction of training done, in [0, 1]); rewards ignore the columns they
do not need through ``**columns``.

Values are checked at every call, in training and evaluation alike: each must be a finite real number
(bools, numpy / torch scalars and one-element tensors are converted) or None. Anything else raises
``RewardValueError`` naming the reward, the sample's key, the completion's index and the value: NaN or
+-inf (a NaN would otherwise pass for "not applicable" unannounced and show up as NaN logged means), a
string, a multi-element tensor. None is the way to say "not applicable"; a reward that computes vectorised
and marks it with NaN declares so with a class or function attribute ``nan_means_not_applicable = True``:
its NaNs then become None. Infinities are errors even then.

Built-in rewards are named (``eswr``, ``format``, ``accuracy``; ``register_reward`` adds names). A
reward of your own needs no registration: name it in the config by ``class_path`` (a class, built with
its ``init_args`` plus ``labels`` / ``mode`` when its ``__init__`` takes them, or a plain function),
imported when the ``RewardSet`` is built.

ESWR (EMO-RL, Li et al. 2025) for a prediction p, gold g, similarity S, threshold gamma and weight
alpha::

    r(p, g) = 1                  if p == g
            = alpha * S(p, g)    if S(p, g) > gamma
            = 0                  otherwise (and when p is None: no label could be read)

alpha follows a schedule over training (``alpha_at``) so that partial credit for a near miss fades and
the reward becomes plain accuracy by the end.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from emorl_pl.emotions import SimilarityMatrix, SimilaritySpec, get_label_set
from emorl_pl.reasoning import check_mode, parse_response

RewardFn = Callable[..., list[float | None]]

SCHEDULES: tuple[str, ...] = ("constant", "linear", "cosine")


def alpha_at(schedule: str, progress: float, alpha_start: float = 1.0, alpha_end: float = 0.0) -> float:
    """alpha at training progress t = clip(progress, 0, 1), from a = alpha_start to b = alpha_end.

    constant: a;  linear: a + (b - a) t;  cosine: b + (a - b) (1 + cos(pi t)) / 2.
    """
    t = min(max(float(progress), 0.0), 1.0)
    if schedule == "constant":
        return alpha_start
    if schedule == "linear":
        return alpha_start + (alpha_end - alpha_start) * t
    if schedule == "cosine":
        return alpha_end + (alpha_start - alpha_end) * (1.0 + math.cos(math.pi * t)) / 2.0
    raise ValueError(f"unknown alpha schedule {schedule!r}; known: {', '.join(SCHEDULES)}")


def eswr_reward(pred: str | None, gold: str, sim: SimilarityMatrix, gamma: float, alpha: float) -> float:
    """r = 1 if pred == gold; alpha * S(pred, gold) if S > gamma; else 0 (None or unknown pred: 0)."""
    if gold not in sim.labels:
        raise ValueError(f"gold label {gold!r} is not in the reward's label set {sim.labels}")
    if pred is None or pred not in sim.labels:
        return 0.0
    if pred == gold:
        return 1.0
    s = sim(pred, gold)
    return alpha * s if s > gamma else 0.0


REWARDS: dict[str, type] = {}


def register_reward(name: str) -> Callable[[type], type]:
    """Class decorator: make a reward buildable by ``name`` from configs."""

    def deco(cls: type) -> type:
        if name in REWARDS and REWARDS[name] is not cls:
            raise ValueError(f"reward name {name!r} is already registered to {REWARDS[name].__name__}")
        REWARDS[name] = cls
        cls.name = name
        return cls

    return deco


def _check_lengths(completions: Sequence[str], labels: Sequence[str]) -> None:
    if len(completions) != len(labels):
        raise ValueError(f"got {len(completions)} completions but {len(labels)} gold labels")


def _progress_list(columns: Mapping[str, Any], n: int) -> list[float]:
    """``progress`` as one float per completion (a scalar is broadcast, TRL-style lists are kept)."""
    if "progress" not in columns:
        raise KeyError("reward needs the 'progress' column (fraction of training done, in [0, 1])")
    p = columns["progress"]
    if isinstance(p, (int, float)):
        return [float(p)] * n
    values = [float(x) for x in p]
    if len(values) != n:
        raise ValueError(f"'progress' column has {len(values)} values for {n} completions")
    return values


@register_reward("eswr")
class ESWRReward:
    """ESWR over the lenient label of each completion (see the module docstring).

    The label is the lenient one (``parse_response(...).label``), not gated on the strict format:
    format has its own reward, and mixing the two would make a badly formatted right answer worth as
    little as a wrong one.
    """

    name = "eswr"

    def __init__(
        self,
        labels: Sequence[str] | str,
        mode: str = "esr",
        similarity: SimilaritySpec = "plutchik",
        gamma: float = 0.7,
        alpha_schedule: str = "linear",
        alpha_start: float = 1.0,
        alpha_end: float = 0.0,
    ) -> None:
        self.labels = get_label_set(labels)
        self.mode = check_mode(mode)
        self.sim = SimilarityMatrix.build(similarity, self.labels)
        self.gamma = float(gamma)
        alpha_at(alpha_schedule, 0.0, alpha_start, alpha_end)  # fail on a bad schedule now, not mid-run
        self.alpha_schedule, self.alpha_start, self.alpha_end = alpha_schedule, alpha_start, alpha_end

    def alpha(self, progress: float) -> float:
        return alpha_at(self.alpha_schedule, progress, self.alpha_start, self.alpha_end)

    def __call__(self, completions: list[str], labels: list[str], **columns: Any) -> list[float | None]:
        _check_lengths(completions, labels)
        if self.alpha_schedule == "constant" and "progress" not in columns:
            progress = [0.0] * len(completions)
        else:
            progress = _progress_list(columns, len(completions))
        return [
            eswr_reward(
                parse_response(c, self.mode, self.labels).label, g, self.sim, self.gamma, self.alpha(p)
            )
            for c, g, p in zip(completions, labels, progress)
        ]


@register_reward("format")
class FormatReward:
    """r = 1 if the completion passes the strict format check of the mode, else 0."""

    name = "format"

    def __init__(self, labels: Sequence[str] | str, mode: str = "esr") -> None:
        self.labels = get_label_set(labels)
        self.mode = check_mode(mode)

    def __call__(self, completions: list[str], labels: list[str], **columns: Any) -> list[float | None]:
        _check_lengths(completions, labels)
        return [float(parse_response(c, self.mode, self.labels).format_ok) for c in completions]


@register_reward("accuracy")
class AccuracyReward:
    """r = 1 if the lenient label equals the gold label, else 0."""

    name = "accuracy"

    def __init__(self, labels: Sequence[str] | str, mode: str = "esr") -> None:
        self.labels = get_label_set(labels)
        self.mode = check_mode(mode)

    def __call__(self, completions: list[str], labels: list[str], **columns: Any) -> list[float | None]:
        _check_lengths(completions, labels)
        return [
            float(parse_response(c, self.mode, self.labels).label == g) for c, g in zip(completions, labels)
        ]


def import_object(path: str) -> Any:
    """The object at the dotted ``module.attr`` path (``my_rewards.LengthPenalty``), imported on demand."""
    module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ImportError("expected a dotted path 'module.name'")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ImportError(f"module {module_name!r} has no attribute {attr!r}") from None


def accepts(fn: Callable[..., Any], param: str) -> bool:
    """Whether ``fn`` (a class: its ``__init__``) takes a keyword ``param``, by name or through ``**kwargs``."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # no introspectable signature (some builtins): pass nothing extra
        return False
    if param in params and params[param].kind not in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.VAR_POSITIONAL):
        return True
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _check_binds(cls: type, kwargs: Mapping[str, Any], where: str) -> None:
    """Refuse options the class does not take, or required ones that are missing, now and naming the
    reward, rather than with a bare TypeError from deep in the CLI."""
    try:
        sig = inspect.signature(cls)
    except (TypeError, ValueError):
        return
    try:
        sig.bind(**kwargs)
    except TypeError as e:
        raise ValueError(f"{where}: {_qualname(cls)}{_plain(sig)} cannot be built with {sorted(kwargs)}: {e}") from None


def _check_named(fn: Callable[..., Any], kwargs: Mapping[str, Any], where: str) -> None:
    """Every option given to a function must be one of its named parameters."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    named = {n for n, p in sig.parameters.items()
             if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    unknown = sorted(set(kwargs) - named)
    if unknown:
        raise ValueError(f"{where}: {_qualname(fn)}{_plain(sig)} cannot take {unknown}: not parameters of the "
                         "function (init_args must name them)")


def _check_call_signature(fn: RewardFn, where: str) -> None:
    """The trainer calls ``fn(completions, labels, **columns)`` with every batch column, so a reward must
    take two positional arguments and ``**columns``; checked when the set is built, not at the first step."""
    if not callable(fn):
        raise TypeError(f"{where}: {type(fn).__name__} object is not callable; a reward is "
                        "fn(completions, labels, **columns) -> list[float | None]")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        raise TypeError(f"{where}: {_qualname(fn)}{_plain(sig)} must accept **columns: the trainer passes every batch "
                        "column (keys, transcript, speaker, corpus, meta, group, progress, ...)")
    # Required keyword-only parameters name columns (``*, transcript``): the trainer supplies those.
    columns = {name: None for name, p in sig.parameters.items()
               if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is inspect.Parameter.empty}
    try:
        sig.bind([], [], **columns)
    except TypeError as e:
        raise TypeError(f"{where}: {_qualname(fn)}{_plain(sig)} cannot be called as fn(completions, labels): {e}") from None


def _plain(sig: inspect.Signature) -> str:
    """A signature without annotations, short enough for an error message: ``(value=1.0)``."""
    empty = inspect.Parameter.empty
    params = [p.replace(annotation=empty) for p in sig.parameters.values()]
    return str(sig.replace(parameters=params, return_annotation=empty))


def _qualname(obj: Any) -> str:
    obj = obj.func if isinstance(obj, functools.partial) else obj
    target = obj if inspect.isclass(obj) or inspect.isfunction(obj) else type(obj)
    return f"{target.__module__}.{target.__qualname__}"


def instantiate_reward(
    obj: Any, init_args: Mapping[str, Any], labels: Sequence[str] | str, mode: str, where: str
) -> RewardFn:
    """A reward from a class (built with ``init_args``, plus ``labels`` / ``mode`` when its ``__init__``
    takes them) or a function (``init_args`` bound as keyword arguments)."""
    if inspect.isclass(obj):
        # None counts as not given: jsonargparse fills a parameter without a default with None.
        injected = {k: v for k, v in (("labels", labels), ("mode", mode))
                    if init_args.get(k) is None and accepts(obj, k)}
        kwargs = {**init_args, **injected}
        _check_binds(obj, kwargs, where)
        fn = obj(**kwargs)
    elif callable(obj):
        # A reward function always has **columns, which would swallow a misspelt option: name them.
        _check_named(obj, init_args, where)
        fn = functools.partial(obj, **init_args) if init_args else obj
    else:
        raise TypeError(f"{where}: {obj!r} is neither a class nor a function")
    _check_call_signature(fn, where)
    return fn


def _normalize_spec(name_or_spec: str | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(name, spec without name): a plain string is a registered name, or a dotted ``module.attr`` path."""
    if isinstance(name_or_spec, str):
        if name_or_spec not in REWARDS and "." in name_or_spec:
            return name_or_spec, {"class_path": name_or_spec}
        return name_or_spec, {}
    if not isinstance(name_or_spec, Mapping):
        raise TypeError(f"reward must be a name or a mapping with 'name', got {type(name_or_spec).__name__}")
    spec = {k: v for k, v in name_or_spec.items() if k != "name"}
    if "name" in name_or_spec:
        return str(name_or_spec["name"]), spec
    if isinstance(spec.get("class_path"), str):  # unnamed: named after the class / function
        return spec["class_path"].rpartition(".")[2], spec
    raise ValueError(f"reward spec {dict(name_or_spec)} has no 'name' key (nor a class_path)")


def build_reward(name_or_spec: str | Mapping[str, Any], labels: Sequence[str] | str, mode: str) -> RewardFn:
    """A reward from its registered name, ``{"name": ..., **kwargs}`` (kwargs go to the class), or
    ``{"name": ..., "class_path": "module.Class_or_function", "init_args": {...}}`` for a user's own
    reward, imported when the set is built (no registration needed)."""
    name, spec = _normalize_spec(name_or_spec)
    where = f"rewards.{name}"
    labels = get_label_set(labels)  # a user's class gets the label tuple, never a set's name
    init_args = spec.pop("init_args", None) or {}
    if not isinstance(init_args, Mapping):
        raise TypeError(f"{where}.init_args must be a mapping of options, got {type(init_args).__name__}")
    class_path = spec.pop("class_path", None)
    if class_path is not None:
        if spec:
            raise ValueError(f"{where}: unexpected keys {sorted(spec)} next to class_path; put the reward's "
                             "options under init_args (and its weight under weight)")
        try:
            obj = import_object(str(class_path))
        except ImportError as e:
            hint = ""
            top = str(class_path).split(".")[0]
            if isinstance(e, ModuleNotFoundError) and e.name == top:
                hint = f" (is the folder holding {top!r} on PYTHONPATH? e.g. PYTHONPATH=. emorl fit ...)"
            raise ValueError(f"{where}.class_path {class_path!r} could not be imported: {e}{hint}") from e
        return instantiate_reward(obj, dict(init_args), labels, mode, where)
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(sorted(REWARDS))} "
                         "(or give class_path: module.ClassOrFunction for your own)")
    duplicated = sorted(set(spec) & set(init_args))
    if duplicated:
        raise ValueError(f"{where}: {duplicated} given both directly and under init_args")
    return instantiate_reward(REWARDS[name], {**spec, **init_args}, labels, mode, where)


@dataclass
class RewardOutput:
    """``total[i] = sum_k w_k r_k[i]`` over rewards k with r_k[i] not None (nan if all are None)."""

    total: list[float]
    per_reward: dict[str, list[float | None]]


def means(per_reward: Mapping[str, Sequence[float | None]]) -> dict[str, float]:
    """Mean of each reward over the completions where it is not None (nan when it never applies)."""
    out = {}
    for name, values in per_reward.items():
        kept = [float(v) for v in values if v is not None]
        out[name] = sum(kept) / len(kept) if kept else math.nan
    return out


class RewardSet:
    """Named rewards with weights, built from config.

    ``rewards`` is ``{name: weight}`` (e.g. ``{"eswr": 1.0, "format": 1.0}``), ``{name: {"weight": w,
    **kwargs}}``, ``{name: {"class_path": "module.Class", "init_args": {...}, "weight": w}}`` for a
    reward of your own, or a list of names / ``{"name": ..., "weight": w, **kwargs}`` specs (weight 1 if
    not given). A value may also be a reward object itself (weight 1), and a jsonargparse Namespace
    stands for its dict: LightningCLI passes one of these for a ``class_path`` block without ``weight``
    when the field is typed ``Any``.
    """

    def __init__(
        self,
        rewards: Mapping[str, float | Mapping[str, Any] | RewardFn] | Sequence[str | Mapping[str, Any]],
        labels: Sequence[str] | str,
        mode: str = "esr",
    ) -> None:
        specs: list[tuple[str, dict[str, Any]]] = []
        if isinstance(rewards, Mapping):
            for name, value in rewards.items():
                value = _plain_spec(value)
                if isinstance(value, Mapping):
                    specs.append((str(name), dict(value)))
                elif callable(value):
                    specs.append((str(name), {"fn": value}))
                else:
                    specs.append((str(name), {"weight": value}))
        else:
            specs = [_normalize_spec(_plain_spec(r)) for r in rewards]
        if not specs:
            raise ValueError("reward set is empty; give at least one reward, e.g. {'eswr': 1.0}")
        self.fns: dict[str, RewardFn] = {}
        self.weights: dict[str, float] = {}
        for name, spec in specs:
            if name in self.fns:
                raise ValueError(f"reward {name!r} is listed twice")
            self.weights[name] = _weight(spec.pop("weight", 1.0), name)
            if "fn" in spec:
                _check_call_signature(spec["fn"], f"rewards.{name}")
                self.fns[name] = spec["fn"]
            else:
                self.fns[name] = build_reward({"name": name, **spec}, labels, mode)

    def __call__(self, completions: list[str], labels: list[str], **columns: Any) -> RewardOutput:
        per_reward = {}
        keys = _sample_keys(columns, len(completions))
        for name, fn in self.fns.items():
            try:
                values = fn(completions, labels, **columns)
            except Exception as e:  # the traceback alone may not say which configured reward failed
                e.add_note(f"in reward {name!r} (rewards.{name})")
                raise
            per_reward[name] = _check_values(name, values, len(completions), keys, declares_nan_not_applicable(fn))
        total = []
        for i in range(len(completions)):
            terms = [self.weights[n] * r[i] for n, r in per_reward.items() if r[i] is not None]
            total.append(sum(terms) if terms else math.nan)
        return RewardOutput(total=total, per_reward=per_reward)

    means = staticmethod(means)


def _plain_spec(value: Any) -> Any:
    """A jsonargparse Namespace as a dict: LightningCLI hands over a ``class_path`` block without
    ``weight`` as a Namespace when the field is typed ``Any`` (with the class's defaults filled in)."""
    return value.as_dict() if callable(getattr(value, "as_dict", None)) and not isinstance(value, Mapping) else value


def _weight(value: Any, name: str) -> float:
    try:
        weight = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"rewards.{name}.weight must be a number, got {value!r}") from None
    if not math.isfinite(weight):  # a nan / inf weight would turn every total into nan / inf
        raise ValueError(f"rewards.{name}.weight must be a finite number, got {value!r}")
    return weight


class RewardValueError(ValueError):
    """A reward returned something other than a finite number or None; the message names the reward, the
    sample and the value."""


NAN_FLAG = "nan_means_not_applicable"


def declares_nan_not_applicable(fn: Any) -> bool:
    """Whether reward ``fn`` (an object, its class, or a function, also under ``functools.partial``) declares
    ``nan_means_not_applicable = True``: its NaN values then mean "not applicable", as None does."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, NAN_FLAG, False) is True


def _sample_keys(columns: Mapping[str, Any], n: int) -> list[Any] | None:
    """The sample key of each completion, for error messages (the trainer passes ``key``/``keys``)."""
    for name in ("key", "keys"):
        keys = columns.get(name)
        if isinstance(keys, (list, tuple)) and len(keys) == n:
            return list(keys)
    return None


def _short(value: Any, limit: int = 80) -> str:
    """repr of a returned value, cut for an error message (a wrong return may be a large tensor)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({type(value).__name__})"


def _check_values(name: str, values: Any, n: int, keys: Sequence[Any] | None = None,
                  nan_ok: bool = False) -> list[float | None]:
    """A reward's output as floats / None: one per completion, finite real numbers only (numpy / torch scalars
    and bools are converted; NaN becomes None when the reward declares ``nan_ok``), so that a wrong value fails
    here, naming the reward and the sample, not as a NaN in the logs or deep in the loss."""
    try:
        values = list(values)
    except TypeError:
        raise RewardValueError(f"reward {name!r} returned {type(values).__name__}, expected a list of "
                               f"{n} floats or None") from None
    if len(values) != n:
        raise RewardValueError(f"reward {name!r} returned {len(values)} values for {n} completions")
    out: list[float | None] = []
    for i, v in enumerate(values):
        if v is None:
            out.append(None)
            continue
        where = f"for sample {keys[i]!r} (completion {i})" if keys is not None else f"for completion {i}"
        try:
            if isinstance(v, (str, bytes)):  # float("0.5") would pass a string off as a number
                raise TypeError
            x = float(v)
        except (TypeError, ValueError):
            raise RewardValueError(f"reward {name!r} returned {_short(v)} {where}; expected a float or None") from None
        if math.isnan(x) and nan_ok:
            out.append(None)
        elif math.isnan(x):
            raise RewardValueError(f"reward {name!r} returned nan {where}; return None for \"not applicable\" "
                                   f"(or declare {NAN_FLAG} = True on the reward)")
        elif math.isinf(x):
            raise RewardValueError(f"reward {name!r} returned {x!r} {where}; rewards must be finite "
                                   "(None for \"not applicable\")")
        else:
            out.append(x)
    return out
