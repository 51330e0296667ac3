"""The public API is pinned: changing it is a decision, not an accident."""

from __future__ import annotations

import lakepipe

EXPECTED = {
    "__version__",
    "Archive",
    "Contract",
    "FileRef",
    "FileStore",
    "Lake",
    "LakeReader",
    "LakeSQL",
    "LakepipeError",
    "Partition",
    "RunReport",
    "Stage",
    "StageContext",
    "StageParams",
    "UserError",
    "get_contract",
    "load_spec",
    "register_archive",
    "register_format",
    "register_stage",
    "run_pipeline",
}


def test_all_is_pinned_and_importable():
    assert set(lakepipe.__all__) == EXPECTED
    for name in lakepipe.__all__:
        assert getattr(lakepipe, name) is not None, name


def test_error_exit_codes():
    from lakepipe import errors

    assert errors.UserError.exit_code == 2 and errors.SpecError.exit_code == 2
    assert errors.StageError.exit_code == 1 and errors.ArchiveError.exit_code == 1
    e = errors.ArchiveError("down", url="http://x", status=503, attempts=3, elapsed_s=1.5)
    assert str(e) == "down (url=http://x, status=503, attempts=3, elapsed=1.5s)"
