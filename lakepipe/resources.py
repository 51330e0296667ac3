"""Locate files shipped with lakepipe (named pipelines, schemas).

In a source checkout they are the top-level ``pipelines/`` and ``schemas/`` folders;
in an installed wheel they are packaged under ``lakepipe/_data/``.
"""

from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent


def data_dir(name: str) -> Path:
    """Directory ``name`` (``pipelines`` or ``schemas``), from the checkout or the wheel."""
    for candidate in (_PKG.parent / name, _PKG / "_data" / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"lakepipe data directory {name!r} not found under {_PKG}")


def pipelines_dir() -> Path:
    """Folder of named pipeline specs (``lakepipe run NAME``)."""
    return data_dir("pipelines")


def schemas_dir() -> Path:
    """Folder of table contracts and the pipeline JSON schema."""
    return data_dir("schemas")
