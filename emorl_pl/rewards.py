"""Rewards for GRPO: ESWR (emotion similarity-weighted), format and accuracy; a registry and a weighted set.

Every reward is a callable ``fn(completions, labels, **columns) -> list[float | None]`` where ``labels``
are canonical gold labels, one per completion, and ``None`` means "not applicable" (left out of that
reward's mean and of the weighted total). The trainer always passes ``progress`` (fraction of training
done, in [0, 1]) as a column; rewards that do not need it ignore ``**columns``.

ESWR (EMO-RL, Li et al. 2025) for a prediction p, gold g, similarity S, threshold gamma and weight
alpha::

    r(p, g) = 1                  if p == g
            = alpha * S(p, g)    if S(p, g) > gamma
            = 0                  otherwise (and when p is None: no label could be read)

alpha follows a schedule over training (``alpha_at``) so that partial credit for a near miss fades and
the reward becomes plain accuracy by the end.
"""

from __future__ import annotations

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


def build_reward(name_or_spec: str | Mapping[str, Any], labels: Sequence[str] | str, mode: str) -> RewardFn:
    """A reward from its registered name, or from ``{"name": ..., **kwargs}`` (kwargs go to the class)."""
    if isinstance(name_or_spec, str):
        name, kwargs = name_or_spec, {}
    elif isinstance(name_or_spec, Mapping):
        if "name" not in name_or_spec:
            raise ValueError(f"reward spec {dict(name_or_spec)} has no 'name' key")
        kwargs = {k: v for k, v in name_or_spec.items() if k != "name"}
        name = name_or_spec["name"]
    else:
        raise TypeError(f"reward must be a name or a mapping with 'name', got {type(name_or_spec).__name__}")
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(sorted(REWARDS))}")
    return REWARDS[name](labels=labels, mode=mode, **kwargs)


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
    **kwargs}}``, or a list of names / ``{"name": ..., "weight": w, **kwargs}`` specs (weight 1 if not
    given).
    """

    def __init__(
        self,
        rewards: Mapping[str, float | Mapping[str, Any]] | Sequence[str | Mapping[str, Any]],
        labels: Sequence[str] | str,
        mode: str = "esr",
    ) -> None:
        specs: list[dict[str, Any]] = []
        if isinstance(rewards, Mapping):
            for name, value in rewards.items():
                spec = dict(value) if isinstance(value, Mapping) else {"weight": value}
                specs.append({"name": name, **spec})
        else:
            specs = [{"name": r} if isinstance(r, str) else dict(r) for r in rewards]
        if not specs:
            raise ValueError("reward set is empty; give at least one reward, e.g. {'eswr': 1.0}")
        self.fns: dict[str, RewardFn] = {}
        self.weights: dict[str, float] = {}
        for spec in specs:
            weight = float(spec.pop("weight", 1.0))
            fn = build_reward(spec, labels, mode)
            if spec["name"] in self.fns:
                raise ValueError(f"reward {spec['name']!r} is listed twice")
            self.fns[spec["name"]] = fn
            self.weights[spec["name"]] = weight

    def __call__(self, completions: list[str], labels: list[str], **columns: Any) -> RewardOutput:
        per_reward = {name: list(fn(completions, labels, **columns)) for name, fn in self.fns.items()}
        for name, values in per_reward.items():
            if len(values) != len(completions):
                raise ValueError(
                    f"reward {name!r} returned {len(values)} values for {len(completions)} completions"
                )
        total = []
        for i in range(len(completions)):
            terms = [self.weights[n] * r[i] for n, r in per_reward.items() if r[i] is not None]
            total.append(sum(terms) if terms else math.nan)
        return RewardOutput(total=total, per_reward=per_reward)

    means = staticmethod(means)
