"""lakepipe: YAML pipeline specs to reproducible, partitioned-Parquet astronomy data products.

The public API, importable from the top level (loaded lazily so ``import lakepipe``
stays cheap)::

    from lakepipe import load_spec, run_pipeline, Lake, LakeSQL
    report = run_pipeline("demo", workers=2)
    Lake(report.lake).reader().sql("select count(*) from exposures")
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "run_pipeline": "lakepipe.runner",
    "RunReport": "lakepipe.runner",
    "load_spec": "lakepipe.spec",
    "Lake": "lakepipe.lake",
    "LakeReader": "lakepipe.lake",
    "FileStore": "lakepipe.lake",
    "FileRef": "lakepipe.lake",
    "LakeSQL": "lakepipe.sql",
    "Stage": "lakepipe.stages.base",
    "StageParams": "lakepipe.stages.base",
    "StageContext": "lakepipe.stages.base",
    "Partition": "lakepipe.stages.base",
    "register_stage": "lakepipe.stages.base",
    "Archive": "lakepipe.archives.base",
    "register_archive": "lakepipe.archives.base",
    "register_format": "lakepipe.export.base",
    "Contract": "lakepipe.tables",
    "get_contract": "lakepipe.tables",
    "LakepipeError": "lakepipe.errors",
    "UserError": "lakepipe.errors",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lakepipe' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return __all__
