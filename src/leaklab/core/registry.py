"""One registry type for attacks, defenses and threat settings.

An :class:`Entry` is name → (implementation, config class, kind, supported settings, help). A :class:`Registry`
refuses duplicate names, imports its built-ins explicitly (a tuple of module names, imported on first lookup, so
the modules that register can import the registry without an import cycle; no package scans)
and, for third-party code, the Python entry point group it names (e.g. ``leaklab.attacks``: each entry point is
a module, or a callable taking the registry, that registers its entries when loaded).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from leaklab.core.config import Config, NoOptions
from leaklab.errors import LeaklabError, UnknownNameError

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered implementation. ``settings`` is None when the entry does not depend on a setting."""

    name: str
    impl: T
    config: type[Config]
    kind: str
    help: str = ""
    settings: tuple[str, ...] | None = None
    hidden: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def options(self, values: Any = None) -> Config:
        """``values`` (a dict of options, k=v strings, or a config of this entry's class) as this entry's config."""
        if isinstance(values, self.config):
            return values
        if isinstance(values, Config):
            raise LeaklabError(f"{self.kind} '{self.name}' takes {self.config.__name__}, got {type(values).__name__}")
        if isinstance(values, list | tuple):
            return self.config.from_pairs(values, f"{self.kind} '{self.name}'")
        return self.config.from_dict(values or {}, f"{self.kind} '{self.name}'")

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "help": self.help,
            "settings": list(self.settings) if self.settings is not None else None,
            "options": self.config.describe(),
        }


_PLUGINS_LOADED: set[str] = set()


def load_plugins(group: str) -> None:
    """Load each entry point of ``group`` once: a module (importing it registers its entries) or a callable
    called with no argument. A plug-in that fails to load is logged and skipped."""
    if group in _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED.add(group)
    from importlib.metadata import entry_points

    for ep in entry_points(group=group):
        try:
            obj = ep.load()
            if callable(obj) and not isinstance(obj, type):
                obj()
        except Exception as exc:  # a broken plug-in must not take the built-ins down with it
            log.warning("could not load leaklab plug-in '%s' (%s): %s", ep.name, group, exc)


class Registry(Generic[T]):
    """name → :class:`Entry`; duplicates refused; built-ins and entry points loaded on first lookup."""

    def __init__(
        self,
        kind: str,
        builtins: Mapping[str, str] | tuple[str, ...] | Callable[[], None] | None = None,
        entry_points: str | None = None,
    ):
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}
        self._aliases: dict[str, str] = {}
        self._builtins = builtins
        self._entry_points = entry_points
        self._loaded = False
        self._loading = False

    def register(
        self,
        name: str,
        impl: T | None = None,
        *,
        config: type[Config] = NoOptions,
        help: str = "",
        settings: tuple[str, ...] | None = None,
        hidden: bool = False,
        aliases: tuple[str, ...] = (),
        **extra: Any,
    ) -> Any:
        """Register ``impl`` under ``name`` (or use as a decorator). A name already taken is an error."""

        def add(obj: T) -> T:
            for n in (name, *aliases):
                if n in self._entries or n in self._aliases:
                    raise LeaklabError(f"{self.kind} '{n}' is already registered")
            doc = help or (obj.__doc__ or "").strip().split("\n")[0]
            self._entries[name] = Entry(name, obj, config, self.kind, doc, settings, hidden, dict(extra))
            for a in aliases:
                self._aliases[a] = name
            return obj

        return add if impl is None else add(impl)

    def _load(self) -> None:
        if self._loaded or self._loading:
            return
        self._loading = True
        try:
            if callable(self._builtins):
                self._builtins()
            else:  # module names: importing each registers its entries (no import edge back to the registry)
                modules = self._builtins.values() if isinstance(self._builtins, Mapping) else self._builtins or ()
                for module in dict.fromkeys(modules):
                    importlib.import_module(module)
                missing = (
                    sorted(set(self._builtins) - set(self._entries)) if isinstance(self._builtins, Mapping) else []
                )
                if missing:
                    raise LeaklabError(f"built-in {self.kind} {missing} declared but not registered by its module")
            if self._entry_points:
                self._load_entry_points()
            self._loaded = True
        finally:
            self._loading = False

    def _load_entry_points(self) -> None:
        load_plugins(self._entry_points)

    def get(self, name: str) -> Entry[T]:
        self._load()
        name = self._aliases.get(name, name)
        if name not in self._entries:
            raise UnknownNameError(self.kind, name, self.names())
        return self._entries[name]

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._entries or name in self._aliases

    def names(self, hidden: bool = False) -> list[str]:
        self._load()
        return sorted(n for n, e in self._entries.items() if hidden or not e.hidden)

    def entries(self, hidden: bool = False) -> Iterator[Entry[T]]:
        for n in self.names(hidden):
            yield self._entries[n]

    def declared_names(self) -> list[str]:
        """The names known without importing any implementation: built-ins declared as ``{name: module}`` and
        the entry points' names (for help texts at CLI start-up; :meth:`names` loads everything)."""
        if self._loaded or not isinstance(self._builtins, Mapping):
            return self.names()
        from importlib.metadata import entry_points

        plugins = [ep.name for ep in entry_points(group=self._entry_points)] if self._entry_points else []
        return sorted({*self._builtins, *self._entries, *plugins} - set(self._aliases))

    def help_names(self) -> str:
        """``"a, b or c"`` for CLI help texts (from :meth:`declared_names`: nothing is imported)."""
        names = self.declared_names()
        return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
