"""One small generic registry: stage kinds, archives and export formats by YAML name.

Plug-in packages (``lakepipe.stages``, ``lakepipe.archives``, ``lakepipe.export``)
import all their modules on first lookup, so registration sits next to the
implementation; third parties add kinds through entry-point groups of the same names
or through ``LAKEPIPE_PLUGINS`` (comma-separated module names). An import error is
fatal: a kind never silently vanishes.
"""

from __future__ import annotations

import difflib
import importlib
import os
import pkgutil
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Generic, TypeVar

from lakepipe.errors import UnknownKindError

T = TypeVar("T")

PLUGINS_ENV = "LAKEPIPE_PLUGINS"


def did_you_mean(name: str, choices: list[str]) -> str:
    """Return ' Did you mean 'x'?' for the closest choice, or ''."""
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def _load_plugins_env() -> None:
    for module in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
        importlib.import_module(module)


class Registry(Generic[T]):
    """Name → object table for one family of plug-ins (e.g. ``stage kind``)."""

    def __init__(self, family: str, package: str, group: str) -> None:
        self.family = family
        self.package = package
        self.group = group
        self._items: dict[str, T] = {}
        self._loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``; a name is registered once."""

        def decorate(obj: T) -> T:
            existing = self._items.get(name)
            if existing is not None and existing is not obj:
                raise ValueError(f"{self.family} {name!r} is already registered by {existing!r}")
            self._items[name] = obj
            return obj

        return decorate

    def load(self) -> None:
        """Import every module of the plug-in package, entry points and env plug-ins."""
        if self._loaded:
            return
        self._loaded = True
        pkg = importlib.import_module(self.package)
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("_") and info.name != "base":
                importlib.import_module(f"{self.package}.{info.name}")
        for ep in entry_points(group=self.group):
            ep.load()
        _load_plugins_env()

    def get(self, name: str) -> T:
        """Look up ``name``; unknown names raise with did-you-mean and what is available."""
        self.load()
        try:
            return self._items[name]
        except KeyError:
            names = self.names()
            raise UnknownKindError(
                f"unknown {self.family} {name!r}.{did_you_mean(name, names)} "
                f"Available: {', '.join(names) or '(none)'}."
            ) from None

    def names(self) -> list[str]:
        """Sorted registered names."""
        self.load()
        return sorted(self._items)

    def items(self) -> Iterator[tuple[str, T]]:
        """(name, object) pairs, sorted by name."""
        self.load()
        for name in sorted(self._items):
            yield name, self._items[name]

    def __contains__(self, name: object) -> bool:
        self.load()
        return name in self._items
