"""The one way a registry entry is added (kinds, strategies, targets): by name, once."""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")


def add(table: dict, name: str, entry: T, what: str) -> T:
    """`table[name] = entry`; a second entry of the same name fails at import, naming both."""
    if name in table:
        raise RuntimeError(f"{what} {name!r} is registered twice")
    table[name] = entry
    return entry


def import_package_modules(package: str, path, first: tuple = ()) -> None:
    """Import every module of a package (each registers itself): a new file is found without
    being named anywhere. `first` only orders how the registry lists them (help, error lines)."""
    import importlib
    import pkgutil

    names = [m.name for m in pkgutil.iter_modules(path) if not m.name.startswith("_")]
    for name in sorted(names, key=lambda n: (first.index(n) if n in first else len(first), n)):
        importlib.import_module(f"{package}.{name}")
