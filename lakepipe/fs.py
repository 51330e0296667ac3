"""The one filesystem abstraction every lake path goes through.

Backed by ``pyarrow.fs`` so an object store (``s3://…``) can back a lake later
without touching the stages; today lakes are local directories. Paths handed to this
class are lake-relative POSIX strings (``exposures/night=2025-01-03/part-….parquet``).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


class LakeFS:
    """File operations relative to a lake root."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self._fs = pafs.LocalFileSystem()

    def abspath(self, rel: str) -> Path:
        """Absolute local path of a lake-relative path."""
        return self.root / rel

    def uri(self, rel: str) -> str:
        """What DuckDB and other readers open for ``rel``."""
        return str(self.abspath(rel))

    def exists(self, rel: str) -> bool:
        return self.abspath(rel).exists()

    def size(self, rel: str) -> int:
        return self.abspath(rel).stat().st_size

    def read_bytes(self, rel: str) -> bytes:
        return self.abspath(rel).read_bytes()

    def _tmp_for(self, rel: str) -> Path:
        final = self.abspath(rel)
        final.parent.mkdir(parents=True, exist_ok=True)
        return final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:12]}")

    def write_bytes_atomic(self, rel: str, data: bytes) -> None:
        """Write ``data`` so that ``rel`` appears whole or not at all (temp + fsync + rename)."""
        tmp = self._tmp_for(rel)
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.abspath(rel))

    def write_parquet_atomic(self, rel: str, table: pa.Table, **kwargs: object) -> int:
        """Write a Parquet file atomically; returns its size in bytes."""
        tmp = self._tmp_for(rel)
        pq.write_table(table, str(tmp), filesystem=self._fs, **kwargs)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self.abspath(rel))
        return self.size(rel)

    def append_line(self, rel: str, line: str) -> None:
        """Append one line and flush it to disk (crash-tolerant logs)."""
        path = self.abspath(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(line.rstrip("\n") + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def delete(self, rel: str) -> None:
        self.abspath(rel).unlink(missing_ok=True)

    def walk_files(self, rel: str = "") -> Iterator[str]:
        """Every file below ``rel`` as lake-relative paths."""
        base = self.abspath(rel)
        if not base.exists():
            return
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                yield Path(dirpath, name).relative_to(self.root).as_posix()

    def remove_empty_dirs(self, rel: str) -> None:
        """Remove empty directories below ``rel`` (after vacuum)."""
        base = self.abspath(rel)
        if not base.exists():
            return
        for dirpath, _dirs, _files in sorted(os.walk(base), key=lambda t: -len(t[0])):
            p = Path(dirpath)
            if p != base and not any(p.iterdir()):
                p.rmdir()
