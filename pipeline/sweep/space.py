"""The `tune` section checked and turned into a sweep plan, before Ray or any trial starts.

`tune.search_space` keys are dotted config paths; a value is a grid (plain list), `{choice: [...]}`,
`{loguniform: [lo, hi]}`, `{uniform: [lo, hi]}` or a constant. Every problem a user can cause
(unknown field, empty list, bad range, a value the field rejects, a metric the training never
reports, a space the search algorithm cannot take) is one `ConfigError` sentence from `plan_sweep`.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin

from raysft.pipeline.config import NOT_IN_DATA_KEY, Config, get_dotted
from raysft.pipeline.errors import ConfigError
from raysft.pipeline.training.generate_eval import GEN_PREFIX, enabled, metric_key

log = logging.getLogger("raysft.tune")

# What the training loop reports (training/loop.py): every step, and at eval intervals and the end.
STEP_METRICS = ("step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "trained_tokens")
EVAL_METRICS = ("eval_loss", "eval_ppl")
REPORTED_METRICS = STEP_METRICS + EVAL_METRICS

Kind = Literal["grid", "choice", "loguniform", "uniform", "constant"]
DISTRIBUTIONS = ("choice", "loguniform", "uniform")
# Keys a sweep may not search: they name the sweep itself or its resources (which size concurrency).
FIXED_SECTIONS = ("run.", "tune.", "scaling.")
# Searched keys that change the prepared data (the data plan's cache key): each distinct
# combination is prepared up front, so no trial tokenizes.
DATA_KEY_FIELDS = ("model.name_or_path", "model.tokenizer", "model.gguf_file", "model.trust_remote_code")


@dataclass(frozen=True)
class Param:
    """One searched config field: its dotted key and how Tune draws its values."""

    key: str
    kind: Kind
    values: tuple = ()  # grid / choice / constant values
    low: float = 0.0  # ranges
    high: float = 0.0
    integer: bool = False  # the field is an int: ranges draw integers

    @property
    def finite(self) -> bool:
        return self.kind in ("grid", "choice", "constant")

    @property
    def changes_data(self) -> bool:
        return (self.key.startswith("data.") and self.key not in NOT_IN_DATA_KEY) or self.key in DATA_KEY_FIELDS

    def to_tune(self) -> Any:
        """The Ray Tune domain for this parameter."""
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        if self.kind == "choice":
            return tune.choice(list(self.values))
        if self.kind == "constant":
            return self.values[0]
        if self.kind == "loguniform":
            return (
                tune.lograndint(int(self.low), int(self.high) + 1)
                if self.integer
                else tune.loguniform(self.low, self.high)
            )
        return tune.randint(int(self.low), int(self.high) + 1) if self.integer else tune.uniform(self.low, self.high)


@dataclass(frozen=True)
class SweepPlan:
    """A checked sweep: parameters in the order written, and the derived settings of the tune section."""

    params: tuple[Param, ...]
    metric: str
    mode: str
    alpha_rule: str | None
    num_trials: int | None  # known for grids and fixed-sample searches
    data_params: tuple[Param, ...] = field(default=())

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.params]

    def param_space(self) -> dict[str, Any]:
        """Ray Tune `param_space`: flat, keyed by dotted config path."""
        return {p.key: p.to_tune() for p in self.params}

    def data_variants(self) -> list[dict[str, Any]]:
        """Every distinct combination of searched values that changes the prepared data ([{}] if none)."""
        if not self.data_params:
            return [{}]
        keys = [p.key for p in self.data_params]
        return [dict(zip(keys, combo)) for combo in itertools.product(*(p.values for p in self.data_params))]


def data_overrides(plan: SweepPlan, sampled: dict[str, Any]) -> dict[str, Any]:
    """The part of a trial's sampled values that selects its prepared data."""
    return {p.key: sampled[p.key] for p in plan.data_params if p.key in sampled}


def trial_overrides(plan: SweepPlan, sampled: dict[str, Any], base: Config) -> dict[str, Any]:
    """Sampled values plus derived ones (lora.alpha from lora.r under alpha_rule) as {dotted: value}."""
    out = {k: _plain(v) for k, v in sampled.items() if k in plan.keys}
    if plan.alpha_rule is not None:
        r = out.get("lora.r", base.lora.r)
        out["lora.alpha"] = float(2 * r if plan.alpha_rule == "2r" else r)
    return out


def _check_generation_metric(cfg: Config, where: str) -> None:
    """A gen_* metric comes from train.eval_generate (training/generate_eval.py), read from each trial's
    metrics.jsonl when the trials end: the trials can be ranked by it, but no scheduler or searcher sees it
    during the sweep (Ray Train's validation results do not reach Tune's per-step results)."""
    t = cfg.tune
    if not enabled(cfg):
        raise ConfigError(f"tune.metric '{t.metric}'{where} is a generation metric; set train.eval_generate.prompts.")
    key = metric_key(cfg)
    if t.metric != key:
        raise ConfigError(f"tune.metric '{t.metric}'{where} is not what train.eval_generate reports ({key}).")
    if t.search_alg == "optuna":
        raise ConfigError(
            f"tune.metric '{t.metric}'{where} reaches the sweep only when a trial ends, too late for "
            "search_alg optuna; use grid or random."
        )
    if t.scheduler == "asha":
        log.warning(
            "tune.metric %s is read when each trial ends: ASHA never sees it and stops no trial; "
            "set tune.scheduler: none to say so",
            t.metric,
        )


def plan_sweep(cfg: Config) -> SweepPlan:
    """Check the `tune` section against the config schema and the training's metrics; one sentence on error."""
    t = cfg.tune
    where = f" in {cfg.source}" if cfg.source else ""
    if not t.search_space:
        raise ConfigError(f"tune.search_space{where} is empty: add at least one field to search, e.g. train.lr.")
    base = cfg.to_dict()
    params = tuple(_parse_param(cfg, base, key, spec, where) for key, spec in t.search_space.items())
    keys = [p.key for p in params]
    if t.alpha_rule is not None and "lora.alpha" in keys:
        raise ConfigError(
            f"tune.alpha_rule{where} derives lora.alpha, so lora.alpha cannot also be in tune.search_space."
        )

    if t.metric.startswith(GEN_PREFIX):
        _check_generation_metric(cfg, where)
    elif t.metric not in REPORTED_METRICS:
        raise ConfigError(
            f"tune.metric '{t.metric}'{where} is never reported by the training; "
            f"use one of {', '.join(REPORTED_METRICS)}."
        )
    if t.metric in EVAL_METRICS and cfg.data.eval is None and cfg.data.eval_split == 0:
        raise ConfigError(
            f"tune.metric '{t.metric}'{where} is never reported without eval data; set data.eval or data.eval_split."
        )

    if t.search_alg == "grid":
        for p in params:
            if not p.finite:
                raise ConfigError(
                    f"tune.search_space.{p.key}{where} is a {p.kind} range, which search_alg grid cannot enumerate; "
                    "list the values."
                )
        params = tuple(Param(p.key, "grid", p.values) if p.kind == "choice" else p for p in params)
    if t.search_alg == "optuna":
        for p in params:
            if p.kind == "grid":
                raise ConfigError(
                    f"tune.search_space.{p.key}{where} is a grid (plain list), which search_alg optuna cannot take; "
                    "write {choice: [...]}."
                )

    data_params = tuple(p for p in params if p.changes_data)
    for p in data_params:
        if not p.finite:
            raise ConfigError(
                f"tune.search_space.{p.key}{where} changes the prepared data, so it must be a list or choice "
                "(each value is prepared once, before the trials)."
            )

    grid = math.prod(len(p.values) for p in params if p.kind == "grid")
    return SweepPlan(
        params=params,
        metric=t.metric,
        mode=t.mode,
        alpha_rule=t.alpha_rule,
        num_trials=grid * t.num_samples,
        data_params=data_params,
    )


def _parse_param(cfg: Config, base: dict[str, Any], key: str, spec: Any, where: str) -> Param:
    name = f"tune.search_space.{key}"
    if key.startswith(FIXED_SECTIONS):
        raise ConfigError(f"{name}{where} cannot be searched: run, tune and scaling settings are fixed for a sweep.")
    try:
        current = get_dotted(base, key)
    except KeyError:
        raise ConfigError(
            f"{name}{where} is not a config field (keys are dotted paths such as lora.r or train.lr)."
        ) from None
    if isinstance(current, dict):
        raise ConfigError(
            f"{name}{where} is a config section, not a field; "
            f"name one of its fields, e.g. {key}.{next(iter(current), 'x')}."
        )
    integer = _is_int_field(key)

    if isinstance(spec, list):
        param = Param(key, "grid", tuple(spec), integer=integer)
        if not spec:
            raise ConfigError(f"{name}{where} is an empty list; give at least one value.")
    elif isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS:
        kind, arg = next(iter(spec.items()))
        if kind == "choice":
            if not isinstance(arg, list) or not arg:
                raise ConfigError(f"{name}{where} has an empty choice list; give at least one value.")
            param = Param(key, "choice", tuple(arg), integer=integer)
        else:
            ok = (
                isinstance(arg, list)
                and len(arg) == 2
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in arg)
            )
            if not ok or not arg[0] < arg[1] or (kind == "loguniform" and arg[0] <= 0):
                need = "0 < lo < hi" if kind == "loguniform" else "lo < hi"
                raise ConfigError(f"{name}{where} must be {{{kind}: [lo, hi]}} with numbers {need}, not {arg!r}.")
            param = Param(key, kind, low=float(arg[0]), high=float(arg[1]), integer=integer)
            if integer and (arg[0] != int(arg[0]) or arg[1] != int(arg[1])):
                raise ConfigError(
                    f"{name}{where} is an integer field, so its {kind} bounds must be whole numbers, not {arg!r}."
                )
    elif isinstance(spec, dict):
        raise ConfigError(
            f"{name}{where} must be a list (grid), {{choice: [...]}}, {{loguniform: [lo, hi]}} "
            f"or {{uniform: [lo, hi]}}, not {spec!r}."
        )
    else:
        param = Param(key, "constant", (spec,), integer=integer)

    # Every value (or both range ends) must be accepted by the field itself.
    for value in param.values if param.finite else (param.low, param.high):
        value = int(value) if integer and not param.finite else value
        try:
            cfg.with_overrides({key: value})
        except ConfigError as exc:
            raise ConfigError(
                f"{name}{where} has value {value!r} that the field rejects ({str(exc).rstrip('.')})."
            ) from None
    return param


def _is_int_field(key: str) -> bool:
    """Whether the schema types this dotted field as an int (so ranges draw whole numbers)."""
    model: Any = Config
    for part in key.split("."):
        info = model.model_fields[part]
        model = info.annotation
    args = get_args(model) if get_origin(model) is not None else (model,)
    return int in args and float not in args


def _plain(value: Any) -> Any:
    """numpy scalars (as Tune samples them) -> Python numbers, so pydantic and YAML take them."""
    item = getattr(value, "item", None)
    return item() if callable(item) and not isinstance(value, (list, dict, str)) else value
