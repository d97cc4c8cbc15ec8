"""One validation layer for every configuration value: env kwargs, `TrainConfig`, algorithm configs, flags.

A config is a dataclass. Its annotations give each field's type (int, float, bool, str, Literal,
Optional, sequences, dict, Any) and its field metadata the rest, declared once next to the field:

    group_size: int = field(default=8, metadata=bounds(ge=1))
    device: str = field(default="cpu", metadata=checked(check_device))

`validate_fields(cfg)` checks (and normalises: int → float, numpy scalars → Python) every field of an
instance; `parse_text` turns command-line text into a value of the field's type (strict booleans:
true/false/1/0/yes/no/on/off); `flag_type` makes an argparse `type=` from a field. Every message names
the key, the value and what was expected: `lr=abc: expected a float > 0`.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Literal, Union

import numpy as np

TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")
#: the seeds torch generators and numpy both accept (the trainer adds small per-rank offsets)
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class Range:
    """Closed/open bounds of a number; `finite=False` also admits ±inf (e.g. "no bound")."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    finite: bool = True

    def contains(self, v: float) -> bool:
        if math.isnan(v) or (self.finite and math.isinf(v)):
            return False
        return ((self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
                and (self.le is None or v <= self.le) and (self.lt is None or v < self.lt))

    def __str__(self) -> str:
        """'>= 1', '> 0', 'in [0, 1]', 'in [0, 2**63 - 1]' (+ ' (inf allowed)')."""
        lo = f"[{_num(self.ge)}" if self.ge is not None else f"({_num(self.gt)}" if self.gt is not None else ""
        hi = f"{_num(self.le)}]" if self.le is not None else f"{_num(self.lt)})" if self.lt is not None else ""
        if lo and hi:
            text = f"in {lo}, {hi}"
        else:
            ops = ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
            text = " and ".join(f"{op} {_num(v)}" for op, v in ops if v is not None)
        return text if self.finite else f"{text} (inf allowed)".strip()


def _num(x: float) -> str:
    return "2**63 - 1" if x == MAX_SEED else f"{x:g}" if isinstance(x, float) else str(x)


def bounds(ge=None, gt=None, le=None, lt=None, finite: bool = True) -> dict:
    """Field metadata declaring a numeric range, e.g. `field(default=8, metadata=bounds(ge=1))`."""
    return {"range": Range(ge, gt, le, lt, finite)}


def checked(check: Callable[[Any], Any], expected: str | None = None) -> dict:
    """Field metadata with a custom check: `check(value)` returns the normalised value or raises ValueError."""
    return {"check": check, "expected": expected}


SEED = bounds(ge=0, le=MAX_SEED)


def check_seed(seed: Any, key: str = "seed") -> int:
    """A seed passed at run time (`reset(seed=...)`): an int in SEED's range, else TypeError/ValueError naming `key`."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"{key}={seed!r} is a {type(seed).__name__}; expected an int {SEED['range']}")
    if not SEED["range"].contains(int(seed)):
        raise ValueError(f"{key}={seed}: expected an int {SEED['range']}")
    return int(seed)


# ---------------------------------------------------------------------- types from annotations
def _args(tp) -> tuple:
    return typing.get_args(tp)


def _is_union(tp) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _is_sequence(tp) -> bool:
    origin = typing.get_origin(tp)
    return tp in (list, tuple) or origin in (list, tuple, Sequence, typing.Sequence)


def describe(tp, rng: Range | None = None, text: bool = False) -> str:
    """'an int >= 1', 'a float > 0', 'a bool', "one of ('a', 'b')", '... or None'; `text`: as typed on a
    command line (booleans list the words `parse_bool` takes)."""
    suffix = f" {rng}" if rng else ""
    if _is_union(tp):
        parts = [describe(a, rng, text) for a in _args(tp) if a is not type(None)]
        return " or ".join(dict.fromkeys(parts)) + (" or None" if type(None) in _args(tp) else "")
    if typing.get_origin(tp) is Literal:
        return f"one of {_args(tp)}"
    if tp is bool:
        return f"a bool ({'/'.join(TRUE_WORDS)} or {'/'.join(FALSE_WORDS)})" if text else "a bool (True or False)"
    if tp is int:
        return "an int" + suffix
    if tp is float:
        return "a float" + suffix
    if tp is str:
        return "a string"
    if tp is dict or typing.get_origin(tp) is dict:
        return "a dict"
    if _is_sequence(tp):
        inner = _args(tp)[0] if _args(tp) and _args(tp)[0] is not Ellipsis else Any
        return f"a list of {_plural(inner)}" + suffix
    return "a value"


def _plural(tp) -> str:
    if _is_union(tp):
        return " or ".join(_plural(a) for a in _args(tp) if a is not type(None))
    return {int: "ints", float: "floats", str: "strings", bool: "bools"}.get(tp, "values")


def _check_type(value, tp, rng: Range | None):
    """The value converted to `tp`, or raise TypeError (wrong type) / ValueError (out of range)."""
    if tp is Any:
        return value
    if _is_union(tp):
        if value is None and type(None) in _args(tp):
            return None
        errors = []
        for alt in (a for a in _args(tp) if a is not type(None)):
            try:
                return _check_type(value, alt, rng)
            except (TypeError, ValueError) as e:
                errors.append(e)
        raise next((e for e in errors if not isinstance(e, TypeError)), errors[0])  # "out of range" wins
    if typing.get_origin(tp) is Literal:  # True must not pass for 1, nor 1 for True
        if value not in _args(tp) or isinstance(value, bool) != any(isinstance(a, bool) for a in _args(tp)):
            raise ValueError
        return value
    if _is_sequence(tp):
        if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
            raise TypeError
        inner = _args(tp)[0] if _args(tp) and _args(tp)[0] is not Ellipsis else Any
        items = [_check_type(v.item() if hasattr(v, "item") else v, inner, rng) for v in value]  # numpy/torch
        return tuple(items) if tp is tuple or typing.get_origin(tp) is tuple else items
    return _check_scalar(value, tp, rng)


def _check_scalar(value, tp, rng: Range | None):
    if tp is bool:
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError
        return bool(value)
    if tp in (int, float):
        ok = (int, np.integer) if tp is int else (int, float, np.integer, np.floating)
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, ok):
            raise TypeError
        value = tp(value)
        if not (rng or Range()).contains(value):  # floats are finite unless the range admits inf
            raise ValueError
        return value
    if tp is dict or typing.get_origin(tp) is dict:
        tp = dict
    if isinstance(tp, type) and not isinstance(value, tp):
        raise TypeError
    return value


@lru_cache(maxsize=None)
def field_specs(cls) -> dict[str, tuple[Any, dict]]:
    """name → (resolved annotation, metadata merged along the MRO). A subclass that only changes a
    default (`group_size: int = 2`) keeps the base class's range; one that declares metadata overrides it."""
    hints = typing.get_type_hints(cls)
    meta: dict[str, dict] = {}
    for klass in reversed(cls.__mro__):
        for f in getattr(klass, "__dataclass_fields__", {}).values():
            meta[f.name] = {**meta.get(f.name, {}), **f.metadata}
    return {f.name: (hints.get(f.name, Any), meta.get(f.name, {})) for f in dataclasses.fields(cls)}


@lru_cache(maxsize=None)
def field_docs(cls) -> dict[str, str]:
    """name → the field's docstring (the string literal right under it, as CleanRL's `Args` and Sphinx read it),
    along the MRO (a subclass's own docstring wins); one line, whitespace collapsed."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        except (OSError, TypeError):  # no source (e.g. built in a REPL): no docs
            continue
        for stmt, after in zip(body, body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                docs[stmt.target.id] = " ".join(after.value.value.split())
    return docs


def expectation(cls, name: str, text: bool = False) -> str:
    tp, meta = field_specs(cls)[name]
    return meta.get("expected") or describe(tp, meta.get("range"), text)


def _error(kind: type, shown: str, reason: str) -> Exception:
    e = kind(f"{shown}: {reason}")
    e.reason = reason  # what `flag_type` shows after argparse's own "argument --flag:"
    return e


def check_value(cls, name: str, value, label: str | None = None, text: bool = False):
    """`value` for field `name` of config class `cls`, normalised, or a TypeError/ValueError naming it
    (`label`: how the value is shown, e.g. '--set lr=abc'; `text`: it came from a command line)."""
    tp, meta = field_specs(cls)[name]
    shown = label if label is not None else f"{name}={value!r}"
    try:
        value = _check_type(value, tp, meta.get("range"))
    except TypeError:  # text that does not parse as the type is a bad value, not a programming error
        raise _error(ValueError if text else TypeError, shown, f"expected {expectation(cls, name, text)}") from None
    except ValueError:
        raise _error(ValueError, shown, f"expected {expectation(cls, name, text)}") from None
    if "check" in meta and value is not None:
        try:
            value = meta["check"](value)
        except ValueError as e:
            raise _error(ValueError, shown, str(e)) from None
    return value


def validate_fields(cfg, names: Sequence[str] | None = None) -> None:
    """Check and normalise (in place) every field of a config dataclass instance (or just `names`)."""
    for name in names or [f.name for f in dataclasses.fields(cfg)]:
        setattr(cfg, name, check_value(type(cfg), name, getattr(cfg, name)))


# ---------------------------------------------------------------------- text from the command line
def parse_bool(text: str) -> bool:
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError(f"expected a bool ({'/'.join(TRUE_WORDS)} or {'/'.join(FALSE_WORDS)}), got {text!r}")


def _from_text(text: str, tp):
    """Best-effort conversion of `text` to `tp`; the type check that follows has the last word."""
    if _is_union(tp):
        if text.strip().lower() == "none" and type(None) in _args(tp):
            return None
        for alt in _args(tp):
            if alt is type(None):
                continue
            try:
                return _check_type(_from_text(text, alt), alt, None)
            except (TypeError, ValueError):
                continue
        return text
    if typing.get_origin(tp) is Literal:
        return next((a for a in _args(tp) if str(a) == text.strip()), text)
    if tp is bool:
        try:
            return parse_bool(text)
        except ValueError:
            return text
    for kind in (int, float):
        if tp is kind:
            try:
                return kind(text.strip())
            except ValueError:
                return text
    if tp is str:
        return text
    if _is_sequence(tp):
        inner = _args(tp)[0] if _args(tp) else Any
        if text.strip()[:1] in "[(":
            return _literal(text)
        return [_from_text(t, inner) for t in text.replace(",", " ").split()]
    return _literal(text)


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_text(cls, name: str, text: str, label: str | None = None):
    """The value of field `name` of `cls` written as command-line text, checked like any other value."""
    tp, _ = field_specs(cls)[name]
    return check_value(cls, name, _from_text(text, tp), label=label if label is not None else f"{name}={text}",
                       text=True)


def parse_assignments(cls, pairs: Sequence[str], flag: str = "--set", owner: str = "") -> dict[str, Any]:
    """`["lr=1e-4", "group_size=4"]` → `{"lr": 0.0001, "group_size": 4}`, typed and range-checked."""
    names = [f.name for f in dataclasses.fields(cls)]
    out = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"{flag} {pair}: expected KEY=VALUE (e.g. lr=1e-4)")
        if key not in names:
            raise ValueError(f"{flag} {pair}: unknown {owner + ' ' if owner else ''}option {key!r}; "
                             f"expected one of {names}")
        out[key] = parse_text(cls, key, text, label=f"{flag} {key}={text}")
    return out


def flag_type(cls, name: str, each: bool = False) -> Callable[[str], Any]:
    """An argparse `type=` for a flag that sets field `name` of `cls`: argparse then prints
    'argument --grid-every: expected an int >= 0, got -1' and exits 2. `each`: the field is a list and the flag
    takes its items one per word (`nargs="+"`), each checked against the field's item type and range."""
    def convert(text: str):
        try:
            value = parse_text(cls, name, text)
            if each:
                if len(value) != 1:
                    raise ValueError(f"expected one item per word, got {text!r}")
                return value[0]
            return value
        except (TypeError, ValueError) as e:
            reason = getattr(e, "reason", str(e))
            if each and reason.startswith("expected"):  # one word is one item: say what an item must be
                tp, meta = field_specs(cls)[name]
                item = next(typing.get_args(a)[0] for a in (tp, *typing.get_args(tp)) if _is_sequence(a))
                reason = f"expected {describe(item, meta.get('range'), text=True)}"
            raise argparse.ArgumentTypeError(f"{reason}, got {text!r}" if reason.startswith("expected")
                                             else f"{text!r}: {reason}") from None

    convert.__name__ = f"{cls.__name__}.{name}"
    return convert


def number_type(kind: type, **rng) -> Callable[[str], Any]:
    """An argparse `type=` for a number flag that is no config field (e.g. `--n`): `number_type(int, ge=1)`."""
    r = Range(**rng)

    def convert(text: str):
        try:
            return _check_type(_from_text(text, kind), kind, r)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {describe(kind, r, text=True)}, got {text!r}") from None

    convert.__name__ = kind.__name__
    return convert


# ---------------------------------------------------------------------- devices
def check_device(device):
    """A torch device string/object that exists here, else ValueError saying why (e.g. no CUDA build)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError("not a torch device; expected 'cpu', 'cuda', 'cuda:N' or 'mps'") from None
    if dev.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            raise ValueError(f"CUDA is not available in this torch build (torch {torch.__version__} is CPU-only); "
                             f"use the cpu device or install a CUDA build of torch")
        if not torch.cuda.is_available():
            raise ValueError("CUDA is not available: no GPU is visible to torch (driver, CUDA_VISIBLE_DEVICES?)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"no GPU {dev.index}: torch sees {torch.cuda.device_count()} GPU(s)")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError("MPS is not available in this torch build or on this machine")
    elif dev.type not in ("cpu", "cuda", "mps", "xpu"):  # (not 'meta': tensors without values cannot be sampled)
        raise ValueError(f"unsupported device type {dev.type!r}; expected 'cpu', 'cuda', 'cuda:N' or 'mps'")
    return device


DEVICE = checked(check_device, "a torch device: 'cpu', 'cuda', 'cuda:N' or 'mps'")
