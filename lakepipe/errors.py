"""The one exception tree of lakepipe.

Every error a user can cause or meet is a :class:`LakepipeError`; anything else is a
bug and shows a traceback. Each class carries the CLI exit code it maps to::

    LakepipeError (1)                 runtime failure
    ├── UserError (2)                 bad input: fix the command, spec or file
    │   ├── SpecError                 spec file invalid (file:line: key.path: message)
    │   ├── UnknownKindError          no stage/archive/format registered under a name
    │   ├── SQLError                  SQL refused or invalid
    │   ├── InputNotFoundError        missing file, pipeline, table or partition
    │   ├── ParseError                malformed input data (astrometry lines, FITS, ...)
    │   └── OrbitFitError             observations cannot constrain an orbit
    ├── StageError (1)                a stage failed on a partition
    │   └── ContractError             a stage's output broke its table contract
    ├── ArchiveError (1)              an archive request failed (URL, status, attempts)
    └── LakeError (1)                 the lake itself is unusable (lock held, bad manifest)
"""

from __future__ import annotations


class LakepipeError(Exception):
    """Base of all expected lakepipe errors; ``exit_code`` is what the CLI returns."""

    exit_code: int = 1


class UserError(LakepipeError):
    """Bad input from the user; exit code 2."""

    exit_code = 2


class SpecError(UserError):
    """A pipeline spec failed to parse or validate."""

    def __init__(self, message: str, errors: list[str] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or [message]


class UnknownKindError(UserError):
    """A name was looked up in a registry that does not hold it."""


class SQLError(UserError):
    """A query was refused (writes, files outside the lake) or failed to parse."""


class InputNotFoundError(UserError):
    """A file, pipeline, table or partition named by the user does not exist."""


class ParseError(UserError):
    """Input data (an astrometry file, a FITS image, ...) is malformed."""


class OrbitFitError(UserError):
    """The observations cannot constrain an orbit (too few, too short an arc, singular)."""


class StageError(LakepipeError):
    """A stage failed on one partition; names the stage and partition."""

    def __init__(self, message: str, *, stage: str = "", partition: str = "") -> None:
        super().__init__(message)
        self.stage = stage
        self.partition = partition


class ContractError(StageError):
    """A stage's output does not match its table contract."""


class ArchiveError(LakepipeError):
    """An archive request failed after retries."""

    def __init__(
        self,
        message: str,
        *,
        url: str = "",
        status: int | None = None,
        attempts: int = 0,
        elapsed_s: float = 0.0,
    ) -> None:
        detail = []
        if url:
            detail.append(f"url={url}")
        if status is not None:
            detail.append(f"status={status}")
        if attempts:
            detail.append(f"attempts={attempts}")
        if elapsed_s:
            detail.append(f"elapsed={elapsed_s:.1f}s")
        super().__init__(message + (f" ({', '.join(detail)})" if detail else ""))
        self.url = url
        self.status = status
        self.attempts = attempts
        self.elapsed_s = elapsed_s


class LakeError(LakepipeError):
    """The lake cannot be used as asked (lock held, manifest unreadable)."""
