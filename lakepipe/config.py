"""Where settings come from, in one place.

Precedence (lowest first): built-in defaults < spec file < ``LAKEPIPE_*`` environment
(deployment knobs only) < command-line flags and ``--set``.

The lake root of a command is, first match wins: ``--lake PATH``; the lake of the
pipeline named by ``--pipeline``/the spec being run (its ``lake:``, else
``lake/<name>``); ``$LAKEPIPE_LAKE``; ``./lake``. Relative lake paths are relative to
the current directory, so ``lakepipe run demo`` writes ``./lake/demo`` wherever it runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

LAKE_ENV = "LAKEPIPE_LAKE"
WORKERS_ENV = "LAKEPIPE_WORKERS"
DEFAULT_LAKE = "lake"


def spec_lake(model: Any) -> Path:
    """The lake a spec names (``lake:``), else ``lake/<name>``."""
    return Path(model.lake) if model.lake else Path(DEFAULT_LAKE) / model.name


def resolve_lake(cli_lake: str | Path | None = None, model: Any = None) -> Path:
    """The lake root for a command (see the module docstring)."""
    if cli_lake:
        return Path(cli_lake).expanduser()
    if model is not None:
        return spec_lake(model).expanduser()
    env = os.environ.get(LAKE_ENV)
    if env:
        return Path(env).expanduser()
    return Path(DEFAULT_LAKE)


def default_workers() -> int:
    """Worker processes for a run: ``$LAKEPIPE_WORKERS``, else one per core."""
    env = os.environ.get(WORKERS_ENV)
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    return os.cpu_count() or 1
