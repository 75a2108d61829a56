"""Typed options: one frozen dataclass per attack, defense and threat setting.

Fields carry their help text (``option(default, "help")``) and are validated in ``__post_init__``. One parser
(:func:`parse_pairs`) turns ``key=value`` strings into a dict, and :meth:`Config.from_dict` turns a dict into the
config, coercing strings to each field's annotated type. An unknown key is an error listing the owner's keys.
:meth:`Config.to_dict` is what a run's ``config.json`` records.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeVar, get_args, get_origin, get_type_hints

from leaklab.errors import LeaklabError

C = TypeVar("C", bound="Config")

_NONE_WORDS = {"none", "null"}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A config field with its help text (``default`` may be a ``dataclasses.field`` default factory)."""
    if callable(default) and not isinstance(default, type):
        return field(default_factory=default, metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


def parse_pairs(items: Iterable[str] | None, what: str = "option") -> dict[str, str]:
    """``["beam=4", "budget-s=120"]`` → ``{"beam": "4", "budget_s": "120"}``; values stay strings (the config
    coerces them by type). A malformed item or a repeated key is an error."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise LeaklabError(f"{what} '{item}' is not of the form key=value")
        if key in out:
            raise LeaklabError(f"{what} '{key}' is given twice")
        out[key] = value.strip()
    return out


def parse_spec(spec: str, what: str = "option") -> tuple[str, dict[str, str]]:
    """``"dpsgd:clip=1,epsilon=8"`` → ``("dpsgd", {"clip": "1", "epsilon": "8"})``; a bare name has no options."""
    name, sep, rest = spec.partition(":")
    items = [x for x in rest.split(",") if x.strip()] if sep else []
    return name.strip(), parse_pairs(items, what)


@dataclass(frozen=True)
class Config:
    """Base of every options dataclass. Subclasses are ``@dataclass(frozen=True)`` with ``option(...)`` fields
    and validate themselves in ``__post_init__`` (raise :class:`LeaklabError` with the field's name)."""

    owner: ClassVar[str] = "options"

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def describe(cls) -> list[dict[str, Any]]:
        """One row per option: name, type, default and help (for ``list`` commands)."""
        hints = get_type_hints(cls)
        rows = []
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = None
            help_text = f.metadata.get("help", "")
            rows.append({"name": f.name, "type": _type_name(hints[f.name]), "default": default, "help": help_text})
        return rows

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any] | None = None, owner: str | None = None) -> C:
        """The config from ``data`` (strings are coerced to the fields' types); unknown keys are refused."""
        data = dict(data or {})
        who = owner or cls.owner
        valid = cls.keys()
        unknown = sorted(k for k in data if k not in valid)
        if unknown:
            raise LeaklabError(
                f"{who} has no option {', '.join(repr(k) for k in unknown)}; valid: {', '.join(valid) or 'none'}"
            )
        hints = get_type_hints(cls)
        values = {k: coerce(v, hints[k], f"{who} option '{k}'") for k, v in data.items()}
        try:
            return cls(**values)
        except LeaklabError as exc:  # keep the class (e.g. UnknownNameError), name the owner
            exc.args = (f"{who}: {exc}",)
            raise
        except (TypeError, ValueError) as exc:
            raise LeaklabError(f"{who}: bad option ({exc})") from None

    @classmethod
    def from_pairs(cls: type[C], items: Iterable[str] | None, owner: str | None = None) -> C:
        return cls.from_dict(parse_pairs(items), owner)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def require(
        self, positive: Iterable[str] = (), non_negative: Iterable[str] = (), below_one: Iterable[str] = ()
    ) -> None:
        """For ``__post_init__``: the named fields must be > 0 / >= 0 / < 1 (one clear error naming the first)."""
        for name in positive:
            if not getattr(self, name) > 0:
                raise LeaklabError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise LeaklabError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in below_one:
            if not getattr(self, name) < 1:
                raise LeaklabError(f"{name} must be < 1, got {getattr(self, name)}")

    def changed(self) -> dict[str, Any]:
        """The options that differ from their defaults."""
        base = {r["name"]: r["default"] for r in self.describe()}
        return {k: v for k, v in self.to_dict().items() if _plain(base.get(k)) != v}


@dataclass(frozen=True)
class NoOptions(Config):
    """For entries without options: any key is refused."""


def coerce(value: Any, hint: Any, where: str) -> Any:
    """``value`` (a CLI string or a JSON value) as type ``hint``: int, float, bool, str, Literal, X | None,
    tuple[X, ...] (comma-separated), dict (JSON values pass through)."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        is_none = value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS)
        if is_none and type(None) in args:
            return None
        if len(inner) == 1:
            return coerce(value, inner[0], where)
        for a in inner:
            try:
                return coerce(value, a, where)
            except LeaklabError:
                continue
        raise LeaklabError(f"{where}: cannot read {value!r} as {_type_name(hint)}")
    if origin is Literal:
        for a in args:
            if value == a or (isinstance(value, str) and str(a) == value.strip()):
                return a
        raise LeaklabError(f"{where}: {value!r} is not one of {', '.join(str(a) for a in args)}")
    if origin is tuple:
        items = [x for x in value.split(",") if x.strip()] if isinstance(value, str) else list(value)
        elem = args[0] if args else str
        return tuple(coerce(x, elem, where) for x in items)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise LeaklabError(f"{where}: expected true or false, got {value!r}")
    if hint in (int, float):
        wrong = isinstance(value, bool) or (hint is int and isinstance(value, float) and not value.is_integer())
        try:
            if not wrong:
                return hint(value.strip() if isinstance(value, str) else value)
        except (TypeError, ValueError):
            pass
        raise LeaklabError(f"{where}: expected {'an integer' if hint is int else 'a number'}, got {value!r}")
    if hint is str:
        return str(value)
    return value


def _type_name(hint: Any) -> str:
    origin, args = get_origin(hint), get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin is tuple:
        return f"list of {_type_name(args[0]) if args else 'str'}"
    if hint is type(None):
        return "none"
    return getattr(hint, "__name__", str(hint))


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Config):
        return value.to_dict()
    return value
