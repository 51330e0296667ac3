"""Locate files shipped with lakepipe (named pipelines, schemas).

An installed wheel carries them under ``lakepipe/_data/``. A source checkout (the
package folder next to lakepipe's own ``pyproject.toml``, e.g. an editable install)
uses the top-level ``pipelines/`` and ``schemas/`` folders instead, so edits there take
effect at once. Nothing else is consulted: a stray ``site-packages/pipelines`` package
next to an installed lakepipe cannot shadow the shipped pipelines.
"""

from __future__ import annotations

import functools
from pathlib import Path

_PKG = Path(__file__).resolve().parent


@functools.cache
def _in_checkout() -> bool:
    """Whether the package sits in lakepipe's source checkout."""
    pyproject = _PKG.parent / "pyproject.toml"
    if not pyproject.is_file():
        return False
    import tomllib

    try:
        meta = tomllib.loads(pyproject.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return False
    return meta.get("project", {}).get("name") == "lakepipe"


def data_dir(name: str) -> Path:
    """Directory ``name`` (``pipelines`` or ``schemas``), from the checkout or the wheel."""
    candidates = [_PKG / "_data" / name]
    if _in_checkout():
        candidates.insert(0, _PKG.parent / name)
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"lakepipe data directory {name!r} not found (looked in "
        f"{', '.join(str(c) for c in candidates)}); reinstall lakepipe"
    )


def pipelines_dir() -> Path:
    """Folder of named pipeline specs (``lakepipe run NAME``)."""
    return data_dir("pipelines")


def schemas_dir() -> Path:
    """Folder of table contracts and the pipeline JSON schema."""
    return data_dir("schemas")
