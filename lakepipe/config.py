"""Where settings come from, in one place.

Precedence (lowest first): built-in defaults < spec file < ``LAKEPIPE_*`` environment
(deployment knobs only) < command-line flags and ``--set``.

The lake root of a command is, first match wins:

1. ``--lake PATH``;
2. the ``lake:`` the spec names (the spec being run, or ``--pipeline NAME``'s) — a
   pipeline that names its lake keeps it, whatever the environment says;
3. ``$LAKEPIPE_LAKE``;
4. the built-in default: ``lake/<name>`` for a spec without ``lake:``, else ``./lake``.

Relative lake paths are relative to the current directory, so ``lakepipe run demo``
writes ``./lake/demo`` wherever it runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

LAKE_ENV = "LAKEPIPE_LAKE"
WORKERS_ENV = "LAKEPIPE_WORKERS"
DEFAULT_LAKE = "lake"


def resolve_lake(cli_lake: str | Path | None = None, model: Any = None) -> Path:
    """The lake root for a command (see the module docstring)."""
    if cli_lake:
        return Path(cli_lake).expanduser()
    if model is not None and model.lake:
        return Path(model.lake).expanduser()
    env = os.environ.get(LAKE_ENV)
    if env:
        return Path(env).expanduser()
    if model is not None:
        return Path(DEFAULT_LAKE) / model.name
    return Path(DEFAULT_LAKE)


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS has one, e.g. under
    ``taskset`` or a container's cpuset), else every core of the machine."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def default_workers() -> int:
    """Worker processes for a run: ``$LAKEPIPE_WORKERS``, else one per usable core."""
    env = os.environ.get(WORKERS_ENV)
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    return usable_cores()
