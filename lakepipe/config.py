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

Logging of the ``lakepipe`` logger goes to stderr at ``--log-level LEVEL`` (``--debug``
means DEBUG), else ``$LAKEPIPE_LOG_LEVEL``, else only warnings (Python's default). The
runner hands the level to its worker processes with every job.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

LAKE_ENV = "LAKEPIPE_LAKE"
WORKERS_ENV = "LAKEPIPE_WORKERS"
LOG_LEVEL_ENV = "LAKEPIPE_LOG_LEVEL"
DEFAULT_LAKE = "lake"
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMAT = "%(asctime)s %(processName)s %(name)s %(levelname)s: %(message)s"


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


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time (test runners swap it)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def log_level(cli_level: str | None = None, debug: bool = False) -> str | None:
    """The log level asked for (``--log-level``, ``--debug``, ``$LAKEPIPE_LOG_LEVEL``), or
    None for Python's default (warnings only)."""
    level = cli_level or ("debug" if debug else None) or os.environ.get(LOG_LEVEL_ENV)
    if not level:
        return None
    if level.lower() not in LOG_LEVELS:
        from lakepipe.errors import UserError

        raise UserError(
            f"log level {level!r} is not one of {', '.join(LOG_LEVELS)} "
            f"(from --log-level or ${LOG_LEVEL_ENV})"
        )
    return level.upper()


def configure_logging(level: str | None) -> None:
    """Send the ``lakepipe`` logger to stderr at ``level``; None undoes an earlier call
    (back to Python's default). Idempotent: at most one handler."""
    logger = logging.getLogger("lakepipe")
    ours = [h for h in logger.handlers if isinstance(h, _StderrHandler)]
    if not level:
        for h in ours:
            logger.removeHandler(h)
        if ours:
            logger.setLevel(logging.NOTSET)
        return
    logger.setLevel(level)
    if not ours:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logger.addHandler(handler)


def current_log_level() -> str | None:
    """The level :func:`configure_logging` set in this process (for worker processes)."""
    logger = logging.getLogger("lakepipe")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        return None
    return logging.getLevelName(logger.level)


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
