"""Typed, range-checked recipes: each field's type comes from its dataclass hint, its range from ``RULES``.

``coerce(value, hint, key)`` turns a YAML value into the hinted type (``int``, ``float``, ``str``, ``bool``,
``list``/``list[T]``, ``dict``, ``tuple[T, ...]``, ``X | None``) or raises one :class:`ToolkitError` line
naming the key, the value and what is allowed. ``check_fields(obj, where)`` applies the range and choice
rules of ``obj``'s dataclass (looked up by class name along the MRO, so ``ESDConfig`` inherits
``DMD2Config``'s rules); :func:`distill.config.from_dict` calls both, so method sections
(:func:`distill.build.method_config`) are checked like the rest. ``check_config`` holds the rules that
span fields. The per-process batch rule needs the world size and stays in the Trainer.

A new field needs no entry here to be type-checked; add a rule when it has a range or a set of values.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Callable

from distill.models.errors import ToolkitError


# ---------------------------------------------------------------------- types
def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fail(key: str, value, allowed: str) -> ToolkitError:
    return ToolkitError(f"{key}={value!r} is not allowed: expected {allowed}")


def _type_name(hint) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in typing.get_args(hint) if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in typing.get_args(hint) else "")
    if origin in (list, tuple):
        args = typing.get_args(hint)
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} {_type_name(args[0])}s"
        return f"a list of {_type_name(args[0])}s" if args else "a list"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a mapping",
            list: "a list"}.get(hint, getattr(hint, "__name__", str(hint)))


def coerce(value: Any, hint, key: str):
    """``value`` as the type ``hint`` describes; ToolkitError naming ``key`` when it is not one.

    Integral floats are accepted for ints (YAML reads ``1e3`` as 1000.0) and ints for floats; strings,
    bools and numbers are never converted into each other (``steps: abc`` is an error, not a crash later).
    """
    if hint is Any or hint is object:
        return value
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except ToolkitError:
                continue
        raise _fail(key, value, _type_name(hint))
    if dataclasses.is_dataclass(hint):
        return value  # sections are built by from_dict
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and math.isfinite(value) and value == int(value):
            return int(value)
    elif hint is float:
        if _is_number(value):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif hint is dict or origin is dict:
        if isinstance(value, dict):
            return value
    elif hint is list or origin is list:
        if isinstance(value, (list, tuple)):
            args = typing.get_args(hint)
            return [coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
    elif hint is tuple or origin is tuple:
        args = typing.get_args(hint)
        if isinstance(value, (list, tuple)):
            if not args:
                return tuple(value)
            if args[-1] is Ellipsis:
                return tuple(coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
            if len(value) == len(args):
                return tuple(coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    else:
        return value  # a hint this checker does not know: left to the code that uses it
    raise _fail(key, value, _type_name(hint))


# ---------------------------------------------------------------------- rules
class Rule:
    """A predicate with a description of what it allows (used in the error line)."""

    def __init__(self, ok: Callable[[Any], bool], allowed: str | Callable[[], str]):
        self.ok, self._allowed = ok, allowed

    @property
    def allowed(self) -> str:
        return self._allowed() if callable(self._allowed) else self._allowed

    def check(self, value, key: str) -> None:
        try:
            good = bool(self.ok(value))
        except (TypeError, ValueError):
            good = False
        if not good:
            raise _fail(key, value, self.allowed)


def at_least(lo: float) -> Rule:
    return Rule(lambda v: v >= lo, f"a value >= {lo}")


def above(lo: float) -> Rule:
    return Rule(lambda v: v > lo, f"a value > {lo}")


def between(lo: float, hi: float, hi_open: bool = False) -> Rule:
    if hi_open:
        return Rule(lambda v: lo <= v < hi, f"a value in [{lo}, {hi})")
    return Rule(lambda v: lo <= v <= hi, f"a value in [{lo}, {hi}]")


def one_of(*choices) -> Rule:
    return Rule(lambda v: v in choices, "one of " + ", ".join(str(c) for c in choices))


def each(rule: Rule, length: int | None = None, non_empty: bool = False) -> Rule:
    """Every element of a list satisfies ``rule`` (and the list has ``length`` elements / is not empty)."""
    size = f"{length} values, each " if length else ("a non-empty list of values, each " if non_empty else "values, each ")

    def ok(values) -> bool:
        if length is not None and len(values) != length:
            return False
        if non_empty and not values:
            return False
        return all(rule.ok(v) for v in values)

    return Rule(ok, size + rule.allowed)


def fraction_range() -> Rule:
    """``[lo, hi]`` with ``0 <= lo < hi <= 1``: a range of times as fractions of the schedule."""
    return Rule(lambda v: len(v) == 2 and 0 <= v[0] < v[1] <= 1, "[lo, hi] with 0 <= lo < hi <= 1")


def _gmm_presets() -> dict:
    from distill.models.analytic import PRESETS

    return PRESETS


def _gmm_preset() -> Rule:
    return Rule(lambda v: v in _gmm_presets(), lambda: "one of " + ", ".join(sorted(_gmm_presets())))


#: string aliases YAML 1.1 produces for unquoted words (``mixed_precision: no`` reads as False)
ALIASES = {("TrainConfig", "mixed_precision"): {False: "no"}}

_WEIGHTINGS = ("native", "eps", "v", "flow", "x0", "edm")

def _backbone_kinds() -> tuple[str, ...]:
    """Teacher kinds served by an adapter file in ``distill.models.backbones`` (its module name), found without
    importing the adapters (they import diffusers): a new backbone needs no edit here."""
    import pkgutil

    import distill.models.backbones as backbones

    return tuple(sorted(m.name for m in pkgutil.iter_modules(backbones.__path__)
                        if m.name != "common" and not m.name.startswith("_")))


#: class name -> field -> rule. None values (optional fields left unset) are not checked.
#: Kinds that the build step dispatches on are listed here too: a new backbone or data format adds its name.
RULES: dict[str, dict[str, Rule]] = {
    "NetConfig": {"kind": one_of("mlp", "unet2d"), "hidden": at_least(1), "depth": at_least(1),
                  "channels": each(at_least(1), non_empty=True),
                  "prediction_type": one_of("epsilon", "v_prediction", "sample", "flow", "eps", "v", "x0")},
    "TeacherConfig": {"kind": one_of("gmm", "sdxl", "sd15", "auto", *_backbone_kinds()), "preset": _gmm_preset(),
                      "std": above(0), "stds": each(above(0), non_empty=True), "weights": each(at_least(0)),
                      "dtype": one_of("float32", "fp32", "bfloat16", "bf16", "float16", "fp16"),
                      "resolution": each(at_least(8), length=2), "uncond": one_of("zeros", "empty"),
                      "sample_shape": each(at_least(1), non_empty=True)},
    "LoraConfig": {"rank": at_least(1), "alpha": above(0)},
    "WarmStartConfig": {"steps": at_least(0), "ode_steps": at_least(1), "lr": above(0),
                        "guidance_scale": at_least(0), "pairs": at_least(0)},
    "StudentConfig": {"timesteps": each(at_least(0), non_empty=True), "noise_scale": one_of("unit", "sigma"),
                      "time_cond_proj_dim": at_least(1), "init": one_of("fresh", "teacher")},
    "FakeScoreConfig": {"init": one_of("teacher", "fresh")},
    "DataConfig": {"kind": one_of("toy", "prompts", "labels"), "batch_size": at_least(1),
                   "class_labels": each(at_least(0), non_empty=True)},
    "OptimConfig": {"lr": above(0), "betas": each(between(0, 1, hi_open=True), length=2),
                    "weight_decay": at_least(0), "eps": above(0), "warmup_steps": at_least(0),
                    "grad_clip": at_least(0)},
    "TrainConfig": {"steps": at_least(1), "seed": at_least(0), "grad_accum": at_least(1),
                    "mixed_precision": one_of("no", "fp16", "bf16"), "ema_decay": between(0, 1, hi_open=True),
                    "checkpoint_every": at_least(0), "checkpoint_minutes": at_least(0),
                    "keep_checkpoints": at_least(0), "log_every": at_least(0), "sample_every": at_least(0),
                    "sample_count": at_least(1), "max_nan_steps": at_least(1)},
    # method sections (distill/methods/*): the dataclass named by each method's ``config_class``
    "DMD2Config": {"guidance_scale": at_least(0), "generator_every": at_least(1),
                   "dm_time_range": fraction_range(), "fake_time_range": fraction_range(),
                   "fake_weighting": one_of(*_WEIGHTINGS), "dm_noise_draws": at_least(1),
                   "gan_generator_weight": at_least(0), "gan_discriminator_weight": at_least(0)},
    "ESDConfig": {"entropy_weight": at_least(0)},
    "ScoreImplicitConfig": {"guidance_scale": at_least(0), "fake_guidance_eval": at_least(0),
                            "fake_guidance_train": at_least(0), "time_distribution": one_of("karras", "uniform"),
                            "karras_t_max": Rule(lambda v: 0 < v <= 1, "a value in (0, 1]"),
                            "sigma_min": above(0), "sigma_max": above(0), "rho": above(0),
                            "time_range": fraction_range(),
                            "fake_time_distribution": one_of("lognormal", "generator", "uniform"),
                            "fake_p_std": above(0), "fake_time_range": fraction_range(),
                            "fake_weighting": one_of(*_WEIGHTINGS), "sigma_data": above(0),
                            "normaliser": one_of("sid", "sid_pooled", "none"), "normaliser_pool": at_least(1),
                            "generator_every": at_least(1), "noise_draws": at_least(1)},
    "SiDConfig": {"alpha": at_least(0)},
    "SIMConfig": {"distance": one_of("pseudo_huber", "l2"), "huber_c": above(0), "time_weight": one_of("sigma2", "one")},
    "ConsistencyConfig": {"num_ddim_timesteps": at_least(1), "w_min": at_least(0), "w_max": at_least(0),
                          "sample_w": at_least(0), "timestep_scaling": above(0), "sigma_data": above(0),
                          "target": one_of("auto", "ema", "online"), "ema_decay": between(0, 1, hi_open=True),
                          "loss": one_of("huber", "huber_ict", "l2"), "huber_c": above(0),
                          "index_sampling": one_of("uniform", "lognormal"), "p_std": above(0),
                          "weighting": one_of("none", "ict"), "data_source": one_of("real", "student")},
}


def _rules_for(cls) -> dict[str, Rule]:
    rules: dict[str, Rule] = {}
    for base in reversed(cls.__mro__):  # subclasses override their bases' rules
        rules.update(RULES.get(base.__name__, {}))
    return rules


def alias(cls, name: str, value):
    for base in cls.__mro__:
        table = ALIASES.get((base.__name__, name))
        if table is not None and not isinstance(value, (list, dict)) and value in table \
                and type(value) is type(next(iter(table))):
            return table[value]
    return value


def check_fields(obj, where: str = "") -> None:
    """Apply the range / choice rules of ``obj``'s dataclass to its (already typed) field values."""
    for name, rule in _rules_for(type(obj)).items():
        value = getattr(obj, name, None)
        if value is not None:
            rule.check(value, where + name)


def check_world(config, world: int) -> None:
    """The per-process rule, once the number of processes is known: rows split evenly into micro-batches."""
    if world > 1 and config.data.batch_size % (world * config.train.grad_accum):
        raise ToolkitError(f"data.batch_size={config.data.batch_size} must divide by processes x train.grad_accum "
                           f"({world} x {config.train.grad_accum})")


def check_config(config) -> None:
    """Rules across fields of a whole :class:`~distill.config.Config` (fields were checked when built)."""
    data, train = config.data, config.train
    if data.batch_size % train.grad_accum:
        raise ToolkitError(f"data.batch_size={data.batch_size} must divide by train.grad_accum={train.grad_accum} "
                           f"(and by processes x grad_accum when run on several processes)")
    if not isinstance(config.method.get("name"), str):
        raise ToolkitError("the recipe's method section needs a name (dmd2, sid, sim, esd, consistency)")
    from distill.build import method_config  # the method's own dataclass, checked field by field

    mcfg = method_config(config)
    if hasattr(mcfg, "w_min") and hasattr(mcfg, "w_max") and mcfg.w_min > mcfg.w_max:
        raise ToolkitError(f"method.w_min={mcfg.w_min} must not exceed method.w_max={mcfg.w_max}")
    if hasattr(mcfg, "sigma_min") and hasattr(mcfg, "sigma_max") and not mcfg.sigma_min < mcfg.sigma_max:
        raise ToolkitError(f"method.sigma_min={mcfg.sigma_min} must be below method.sigma_max={mcfg.sigma_max}")
