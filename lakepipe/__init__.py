"""lakepipe: YAML pipeline specs to reproducible, partitioned-Parquet astronomy data products."""

from __future__ import annotations

__version__ = "0.1.0"
