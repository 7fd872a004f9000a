"""Search spaces written in the Hydra sweeper syntax, mapped to Optuna distributions, and trial
parameters mapped back to Hydra overrides.

The values of a study file's ``space`` are parsed by Hydra's own override grammar, so the forms users
already write for ``hydra-optuna-sweeper`` port over unchanged:

=====================================  ==================================================
``choice(a, b, null)`` / ``a,b,c``     ``CategoricalDistribution`` (values keep their types)
YAML list ``[a, b]``                   the same as ``choice(a, b)``
``range(start, stop, step=s)``         ``IntDistribution(start, last value, step)`` for ints,
                                       ``FloatDistribution(.., step=s)`` otherwise
``interval(a, b)``                     ``FloatDistribution(a, b)``; ``IntDistribution`` if both ints
``tag(log, interval(a, b))``           the same with ``log=True`` (also ``tag(log, range(a, b))``)
a plain value (``0``, ``topk``, ...)   fixed: becomes a base override, not searched
=====================================  ==================================================

Two deliberate extensions of Hydra's grammar, both registered as grammar functions (the parser is
still Hydra's): ``choice()`` accepts ``null`` (Hydra's own ``choice`` rejects it, but "no limit"
values such as ``memory.size=null`` are a natural search option), and ``interval()`` keeps integer
bounds as ints (Hydra casts them to float, which would lose the int/float distinction the
distribution mapping needs).
"""
# No `from __future__ import annotations` here: Hydra type-checks grammar-function arguments against
# the real annotation objects of _choice/_interval, which postponed (string) annotations would break.
import functools
import math
import numbers
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Dict, List, Mapping, Optional, Union

import numpy as np
from hydra._internal.grammar import grammar_functions
from hydra.core.override_parser.overrides_parser import OverridesParser, create_functions
from hydra.core.override_parser.types import (
    ChoiceSweep,
    IntervalSweep,
    Override,
    OverrideType,
    RangeSweep,
    Sweep,
)
from hydra.errors import HydraException
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from ickd.errors import ConfigError

__all__ = [
    "SpecError",
    "Dimension",
    "parse_space",
    "parse_dimension",
    "params_to_overrides",
    "format_value",
    "grid_values",
]

RawValue = Union[str, int, float, bool, None, list]
CATEGORICAL_TYPES = (type(None), bool, int, float, str)
VALID_TAGS = ("log",)


class SpecError(ConfigError):
    """A study file (or one of its values) is invalid; the message names the key and the fix."""


# --------------------------------------------------------------------------------------------------
# Hydra's grammar, with choice(null) and integer intervals


def _choice(
    *args: Union[None, str, int, float, bool, Dict[Any, Any], List[Any], ChoiceSweep]
) -> ChoiceSweep:
    """Hydra's ``choice`` whose signature also admits ``null`` (the type check reads the annotation)."""
    if not args:
        raise ValueError("empty choice: list at least one value, e.g. choice(4, 8, 16)")
    return grammar_functions.choice(*args)


def _interval(start: Union[int, float], end: Union[int, float]) -> IntervalSweep:
    """Hydra's ``interval`` without the float cast, so ``interval(1, 10)`` can map to an int dimension."""
    return IntervalSweep(start=start, end=end)


@functools.lru_cache(maxsize=1)
def _space_parser() -> OverridesParser:
    functions = create_functions()
    for name, func in (("choice", _choice), ("interval", _interval)):
        del functions.definitions[name], functions.functions[name]
        functions.register(name=name, func=func)
    return OverridesParser(functions=functions)


@functools.lru_cache(maxsize=1)
def _hydra_parser() -> OverridesParser:
    """Hydra's unmodified parser: what ``ickd train`` / ``compose`` will see."""
    return OverridesParser.create()


def parse_override(text: str, *, where: str = "", hydra_only: bool = False) -> Override:
    """Parse one ``key=value`` override; raise SpecError (prefixed by ``where``) with Hydra's
    explanation on bad syntax."""
    parser = _hydra_parser() if hydra_only else _space_parser()
    try:
        return parser.parse_overrides([text])[0]
    except HydraException as exc:
        # Hydra's message repeats the override on its first line and ends with a docs link: keep the reason.
        lines = [ln.strip() for ln in str(exc).split("\nSee https://", 1)[0].splitlines() if ln.strip()]
        detail = "; ".join(ln for ln in lines if not ln.startswith("Error parsing override")) or "syntax error"
        raise SpecError(
            f"{where + ': ' if where else ''}{text!r} is not a valid Hydra override: {detail}. Fix its syntax "
            "(https://hydra.cc/docs/advanced/override_grammar/extended/)"
        ) from None


# --------------------------------------------------------------------------------------------------
# space entry -> distribution


@dataclass(frozen=True)
class Dimension:
    """One parsed ``space`` entry: searched (``distribution`` set) or fixed (``fixed_override`` set)."""

    key: str
    raw: str  # the entry as a sweeper string, e.g. "choice(4, 8)" or "0.5"
    distribution: Optional[BaseDistribution] = None
    fixed_override: Optional[str] = None  # "key=value" for a plain value

    @property
    def searched(self) -> bool:
        return self.distribution is not None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_tags(key: str, sweep: Sweep, allowed: tuple[str, ...], form: str) -> bool:
    """Return whether ``log`` is set; reject tags that mean nothing here."""
    unknown = sorted(set(sweep.tags) - set(allowed))
    if unknown:
        where = f"on {form}" if allowed else f"on {form} (tags apply to interval/range only)"
        raise SpecError(
            f"space.{key}: tag {', '.join(unknown)} is not supported {where}; the only tag is "
            f"'log' (tag(log, interval(a, b))). Remove it"
        )
    return "log" in sweep.tags


def _categorical(key: str, values: list, raw: str) -> CategoricalDistribution:
    if not values:
        raise SpecError(f"space.{key}: {raw} has no values; list at least one choice, e.g. choice(4, 8, 16)")
    bad = [v for v in values if not isinstance(v, CATEGORICAL_TYPES)]
    if bad:
        raise SpecError(
            f"space.{key}: choice values must be null, bool, int, float or str (Optuna stores nothing else), "
            f"got {bad[0]!r}; search a scalar key instead, or a config group (e.g. student: choice(resnet8, resnet20))"
        )
    seen: set = set()
    for v in values:
        tag = (type(v), v)
        if tag in seen:
            raise SpecError(f"space.{key}: {raw} lists {format_value(v)} twice; remove the duplicate")
        seen.add(tag)
    return CategoricalDistribution(values)


def _range(key: str, sweep: RangeSweep, raw: str) -> BaseDistribution:
    log = _check_tags(key, sweep, VALID_TAGS, "range()")
    start, stop, step = sweep.start, sweep.stop, sweep.step
    if not all(_is_number(x) for x in (start, stop, step)):
        raise SpecError(f"space.{key}: {raw} needs numeric start, stop and step, e.g. range(2, 10, step=2)")
    if step == 0:
        raise SpecError(f"space.{key}: {raw} has step 0; use a non-zero step, e.g. range(2, 10, step=2)")
    # Hydra's own semantics decide which values the range holds (stop excluded).
    count = len(range(start, stop, step)) if all(_is_int(x) for x in (start, stop, step)) else len(list(sweep.range()))
    if count == 0:
        raise SpecError(
            f"space.{key}: {raw} has no values (Hydra's range excludes stop, and stop must lie beyond start in the "
            f"direction of step); e.g. range(2, 10, step=2) is 2, 4, 6, 8"
        )
    if all(_is_int(x) for x in (start, stop, step)):
        last = start + (count - 1) * step
        low, high = min(start, last), max(start, last)
        if log and (abs(step) != 1 or low <= 0):
            raise SpecError(
                f"space.{key}: {raw} needs step 1 and a start > 0 (Optuna's log int distribution); "
                "drop the log tag or use tag(log, range(1, N))"
            )
        return IntDistribution(low, high, log=log, step=1 if log else abs(step))
    if log:
        raise SpecError(
            f"space.{key}: {raw} is a log float range with a step, which Optuna cannot sample; "
            "use tag(log, interval(a, b)) or drop the log tag"
        )
    # Decimal arithmetic on the written values keeps the bounds clean (0.1 + 4*0.2 is 0.9, not 0.9000000000000001),
    # so Optuna sees a high that is exactly low + n*step.
    d_start, d_step = Decimal(repr(float(start))), Decimal(repr(float(step)))
    d_last = d_start + (count - 1) * d_step
    low, high = float(min(d_start, d_last)), float(max(d_start, d_last))
    return FloatDistribution(low, high, step=float(abs(d_step)))


def _interval_dist(key: str, sweep: IntervalSweep, raw: str) -> BaseDistribution:
    log = _check_tags(key, sweep, VALID_TAGS, "interval()")
    low, high = sweep.start, sweep.end
    if not (_is_number(low) and _is_number(high)):
        raise SpecError(f"space.{key}: {raw} needs two numbers, e.g. interval(0.1, 4.0)")
    if not low < high:
        raise SpecError(f"space.{key}: {raw} has low >= high; write interval(low, high) with low < high")
    if log and low <= 0:
        raise SpecError(
            f"space.{key}: {raw} needs low > 0 (a log scale has no zero or negatives); "
            "raise the lower bound (e.g. 1e-3) or drop the log tag"
        )
    if _is_int(low) and _is_int(high):
        return IntDistribution(low, high, log=log)
    return FloatDistribution(float(low), float(high), log=log)


def _check_key(key: Any) -> str:
    if not isinstance(key, str) or not key.strip():
        raise SpecError(f"space: key {key!r} is not a config key; write dotted keys such as memory.k")
    return key.strip()


def parse_dimension(key: str, value: RawValue) -> Dimension:
    """Parse one ``space`` entry (a sweeper string, a YAML list = choice, or a plain fixed value)."""
    key = _check_key(key)
    if isinstance(value, (list, tuple)):
        nested = [v for v in value if isinstance(v, (list, tuple, dict))]
        if nested:
            raise SpecError(f"space.{key}: the list shorthand takes scalar choices, got {nested[0]!r}; use scalars")
        raw = "choice(" + ", ".join(format_value(v) for v in value) + ")"
        if not value:
            raise SpecError(f"space.{key}: the list [] has no values; list at least one choice, e.g. [4, 8, 16]")
        return Dimension(key, raw, distribution=_categorical(key, list(value), raw))
    if isinstance(value, dict):
        raise SpecError(
            f"space.{key}: a mapping is not a search dimension; write a sweeper string such as "
            "choice(4, 8), interval(0.1, 1.0) or range(2, 10, step=2)"
        )
    if not isinstance(value, str):
        if value is not None and not isinstance(value, (bool, int, float)):
            raise SpecError(f"space.{key}: unsupported value {value!r}; use a sweeper string or a scalar")
        text = format_value(value)
        return Dimension(key, text, fixed_override=f"{key}={text}")

    raw = value.strip()
    override = parse_override(f"{key}={raw}", where=f"space.{key}")
    if override.type != OverrideType.CHANGE or override.package is not None:
        raise SpecError(
            f"space: {key!r} is not a plain config key; space keys name existing keys (memory.k, distill=...). "
            "Put additions (+key=value) or deletions (~key) in base"
        )
    key = override.key_or_group
    parsed = override.value()
    if isinstance(parsed, ChoiceSweep):
        _check_tags(key, parsed, (), "choice()")
        return Dimension(key, raw, distribution=_categorical(key, list(parsed.list), raw))
    if isinstance(parsed, RangeSweep):
        return Dimension(key, raw, distribution=_range(key, parsed, raw))
    if isinstance(parsed, IntervalSweep):
        return Dimension(key, raw, distribution=_interval_dist(key, parsed, raw))
    if isinstance(parsed, Sweep) or override.is_sweep_override():  # glob(): config-group globbing only
        raise SpecError(f"space.{key}: {raw} cannot be searched by Optuna; list the options with choice(...)")
    # A plain value: fixed. Keep the text as written (it may hold an interpolation).
    return Dimension(key, raw, fixed_override=f"{key}={raw}")


def parse_dimensions(raw: Mapping[str, RawValue]) -> list[Dimension]:
    if not isinstance(raw, Mapping):
        raise SpecError(f"space must be a mapping of config keys to sweeper strings (e.g. memory.k: choice(4, 8)), got {type(raw).__name__}")
    dims = [parse_dimension(k, v) for k, v in raw.items()]
    keys = [d.key for d in dims]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise SpecError(f"space: key(s) {', '.join(dup)} appear more than once; keep one entry per key")
    return dims


def parse_space(raw: Mapping[str, RawValue]) -> dict[str, BaseDistribution]:
    """The searched dimensions of a ``space`` mapping as Optuna distributions (plain values, which
    are fixed rather than searched, are left out: ``load_spec`` moves them into the base overrides)."""
    return {d.key: d.distribution for d in parse_dimensions(raw) if d.distribution is not None}


def grid_values(key: str, dist: BaseDistribution) -> list:
    """Every value of a discrete distribution (for the grid sampler); SpecError for continuous ones."""
    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    if isinstance(dist, IntDistribution):
        return list(range(dist.low, dist.high + 1, dist.step))
    if isinstance(dist, FloatDistribution) and dist.step is not None:
        low, step = Decimal(repr(dist.low)), Decimal(repr(dist.step))
        n = int(round((dist.high - dist.low) / dist.step)) + 1
        return [float(low + i * step) for i in range(n)]
    raise SpecError(
        f"space.{key}: the grid sampler needs discrete dimensions, but {key} is continuous; "
        "write it as choice(...) or range(a, b, step=s), or use another sampler (tpe, random)"
    )


# --------------------------------------------------------------------------------------------------
# params -> overrides


def _round_trips(text: str, value: Any) -> bool:
    try:
        parsed = _hydra_parser().parse_overrides([f"k={text}"])[0]
    except HydraException:
        return False
    if parsed.is_sweep_override():
        return False
    got = parsed.value()
    return type(got) is type(value) and got == value


def _format_str(s: str) -> str:
    # Hydra's parser is the oracle: plain text when it reads back as the same string, else quoted.
    candidates = [s, f"'{s}'", f'"{s}"']
    for quote in ("'", '"'):
        # Escape the quote and the backslashes that precede a quote or the closing quote.
        body, out, i = s, [], 0
        while i < len(body):
            j = i
            while j < len(body) and body[j] == "\\":
                j += 1
            run = body[i:j]
            if j == len(body) or body[j] == quote:
                out.append(run * 2)
                if j < len(body):
                    out.append("\\" + quote)
                i = j + 1
            else:
                out.append(run + body[j])
                i = j + 1
        candidates.append(quote + "".join(out) + quote)
    for text in candidates:
        if _round_trips(text, s):
            return text
    raise ConfigError(f"cannot write the string {s!r} as a Hydra override value; choose a value without it")


def format_value(value: Any) -> str:
    """One value as Hydra override text that parses back to the same value and type."""
    if value is None:
        return "null"
    if isinstance(value, (bool, np.bool_)):
        return "true" if bool(value) else "false"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        x = float(value)
        if math.isnan(x):
            return "nan"
        return float.__repr__(x)  # shortest exact repr: 0.1 -> "0.1", 1e-05 -> "1e-05", inf -> "inf"
    if isinstance(value, str):
        return _format_str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {format_value(v)}" for k, v in value.items()) + "}"
    raise ConfigError(f"cannot write {value!r} ({type(value).__name__}) as a Hydra override value")


def params_to_overrides(params: Mapping[str, Any]) -> list[str]:
    """Trial parameters as Hydra overrides (``key=value``) that ``compose`` / ``ickd train`` accept."""
    return [f"{key}={format_value(value)}" for key, value in params.items()]
