"""Plan and execute a pipeline: fingerprints decide what runs, workers compute, the
parent commits.

For every stage (in dependency order) the runner lists the stage's output partitions,
fingerprints each one — stage kind and code version, params (and the archive for
stages that use one), and the fingerprints of the input partitions it reads — and
compares with the manifest: unchanged partitions are skipped, the rest run in a local
process pool (or in-process with one worker). Workers write uncommitted Parquet files;
the parent makes them visible in batched atomic manifest commits. One failing
partition is logged with its error while the others complete.

Before any partition runs, every stage of the run gets its :meth:`Stage.preflight`
(bad input stops the run with exit 2, lake untouched). The lake's lock is taken only
when the run is about to write (see :class:`_RunLock`), so input that fails preflight or
the first stage's partition listing leaves every lake file, ``_lake/LOCK`` included,
byte-identical (and creates no lake at a new path). A dry run plans downstream stages
against the fingerprints upstream stages would commit (see :class:`_DryRun`).

A partition is skipped only when its fingerprint matches *and* its committed files are
all there at their recorded sizes (and the stage's :meth:`Stage.verify_partition` finds
nothing wrong); a file deleted or truncated behind the lake's back reruns it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import multiprocessing
import time
import traceback
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc

from lakepipe.archives.base import Archive, archives
from lakepipe.config import (
    configure_logging,
    current_log_level,
    default_workers,
    resolve_lake,
)
from lakepipe.errors import ContractError, LakepipeError, SQLError, StageError, UserError
from lakepipe.lake import Commit, Lake, LakeReader, Manifest, PartitionEntry, add_healpix, utcnow
from lakepipe.lake import new_run_id as _new_run_id
from lakepipe.spec import LoadedSpec, load_spec, stage_class, writers
from lakepipe.stages.base import Partition, Stage, StageContext
from lakepipe.stages.base import stages as stages_registry
from lakepipe.tables import get_contract

COMMIT_INTERVAL_S = 1.0
Action = Literal["run", "skip"]


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class PartitionPlan:
    """What the runner will do with one partition, and why."""

    stage: str
    key: str
    action: Action
    reason: str
    fingerprint: str
    code_version: str
    params_hash: str
    inputs_hash: str
    reads: dict[str, list[str]] | None = None


@dataclass
class StageReport:
    """Outcome of one stage in a run."""

    name: str
    kind: str
    plans: list[PartitionPlan] = field(default_factory=list)
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    removed: int = 0
    rows: int = 0
    seconds: float = 0.0
    errors: dict[str, str] = field(default_factory=dict)
    user_errors: dict[str, str] = field(default_factory=dict)  # the failures that were bad input
    note: str = ""  # dry run: why the partition list is provisional, if it is


@dataclass
class RunReport:
    """Outcome of a run: per-stage reports plus where it ran."""

    run_id: str
    pipeline: str
    lake: Path
    dry_run: bool
    stages: list[StageReport] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return sum(s.failed for s in self.stages)

    @property
    def executed(self) -> int:
        return sum(s.ok + s.failed for s in self.stages)

    @property
    def user_errors(self) -> list[str]:
        """Messages of failed partitions that failed on bad input (a UserError)."""
        return [e for s in self.stages for e in s.user_errors.values()]

    @property
    def exit_code(self) -> int:
        """0 success; 2 when every failed partition failed on bad input; else 1."""
        if not self.failed:
            return 0
        return 2 if len(self.user_errors) == self.failed else 1


class RunObserver:
    """Progress callbacks (the CLI draws a progress bar; the library never prints)."""

    def stage_started(self, name: str, plans: list[PartitionPlan]) -> None:
        pass

    def partition_done(self, name: str, key: str, status: str, rows: int, error: str) -> None:
        pass

    def stage_finished(self, report: StageReport) -> None:
        pass


# -- worker side --------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    lake_root: str
    spec_json: str
    spec_dir: str
    stage: str
    key: str
    reads: dict[str, list[str]] | None
    plan: PartitionPlan
    run_id: str
    log_level: str | None = None  # the parent's --log-level / --debug, for the worker


@dataclass
class JobResult:
    stage: str
    key: str
    ok: bool
    entries: dict[str, PartitionEntry]
    rows: int
    seconds: float
    error: str = ""
    user_error: bool = False
    started_at: str = ""
    archive_stats: dict[str, float] | None = None


@functools.lru_cache(maxsize=4)
def _loaded(spec_json: str) -> LoadedSpec:
    return load_spec(json.loads(spec_json))


@functools.lru_cache(maxsize=4)
def _archive(spec_json: str, spec_dir: str, lake_root: str) -> Archive | None:
    model = _loaded(spec_json).model
    if model.archive is None:
        return None
    cls = archives.get(model.archive.kind)
    archive = cls(model.archive, spec_dir=Path(spec_dir))
    archive.use_lake(Path(lake_root))
    return archive


def _make_stage(loaded: LoadedSpec, name: str) -> Stage:
    s = loaded.model.stages[name]
    return stage_class(s)(name, s)


def _require_archive(loaded: LoadedSpec, name: str, stage: Stage) -> None:
    if stage.uses_archive and loaded.model.archive is None:
        raise UserError(
            f"stage {name!r} (kind {stage.kind!r}) needs an archive; add e.g. "
            "`archive: {kind: sim, seed: 7}` to the spec"
        )


def _sql_params(node: Any, path: str) -> Iterable[tuple[str, str]]:
    """``(key.path, sql)`` of every SQL-valued param: fields named ``sql`` or ``*_sql``."""
    if isinstance(node, dict):
        for k, v in node.items():
            sub = f"{path}.{k}"
            if isinstance(v, str) and (k == "sql" or k.endswith("_sql")):
                yield sub, v
            else:
                yield from _sql_params(v, sub)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _sql_params(v, f"{path}.{i}")


def check_sql_syntax(loaded: LoadedSpec, name: str) -> None:
    """Parse (not run) every SQL param of stage ``name`` with DuckDB's parser, so a
    syntax error is bad input before any partition runs (tables are not checked: they
    may not exist yet)."""
    import duckdb

    params = loaded.model.stages[name].model_dump(mode="json", exclude={"inputs"})
    for path, sql in _sql_params(params, f"stages.{name}"):
        try:
            duckdb.extract_statements(sql)
        except duckdb.Error as exc:
            msg = str(exc).strip().splitlines()[0]  # "Parser Error: syntax error at or near …"
            raise SQLError(f"{path}: {msg}; fix the SQL in the spec") from None


def make_context(
    lake: Lake,
    loaded: LoadedSpec,
    name: str,
    spec_json: str | None,
    spec_dir: str,
    manifest: Manifest,
    reader: LakeReader | None = None,
) -> StageContext:
    """What stage ``name`` sees; without ``spec_json`` no archive is built (``validate``
    checks inputs without contacting one; ``archive_type`` still names its class)."""
    stage = _make_stage(loaded, name)  # uses_archive may depend on the params
    _require_archive(loaded, name, stage)
    archive = None
    if stage.uses_archive and spec_json is not None:
        archive = _archive(spec_json, spec_dir, str(lake.root))
    return StageContext(
        stage_name=name,
        lake=reader or LakeReader(lake, manifest),
        files=lake.files,
        archive=archive,
        spec_dir=Path(spec_dir),
        archive_type=_archive_type(loaded),
    )


def _archive_type(loaded: LoadedSpec) -> type[Archive] | None:
    a = loaded.model.archive
    return archives.get(a.kind) if a is not None else None


def _normalise_output(stage: Stage, out: Any) -> dict[str, pa.Table]:
    tables = dict(out) if isinstance(out, dict) else {stage.writes[0]: out}
    result = {}
    for table, value in tables.items():
        if table not in stage.writes:
            raise ContractError(
                f"stage {stage.name!r} returned table {table!r}, but kind {stage.kind!r} "
                f"declares writes={list(stage.writes)}",
                stage=stage.name,
            )
        if value is None:
            continue
        if not isinstance(value, pa.Table):
            to_arrow = getattr(value, "to_arrow", None)
            if to_arrow is None:
                raise ContractError(
                    f"stage {stage.name!r} returned {type(value).__name__} for {table!r}; "
                    "expected a pyarrow.Table or polars.DataFrame",
                    stage=stage.name,
                )
            value = to_arrow()
        result[table] = value
    return result


def prepare_table(stage_name: str, table_name: str, table: pa.Table, key: str) -> pa.Table:
    """Contract-check one output table and bring it to file layout (healpix, no hive cols)."""
    contract = get_contract(table_name)
    needs_hpx = "_healpix_29" in contract.column_names and "_healpix_29" not in table.column_names
    if needs_hpx and {"ra", "dec"} <= set(table.column_names):
        table = add_healpix(table)
    values = dict(p.split("=", 1) for p in key.split("/")) if key else {}
    for name in contract.partition_by:
        if name in table.column_names:
            col = table.column(name)
            if (
                table.num_rows
                and not pc.all(pc.equal(pc.cast(col, pa.string()), values.get(name))).as_py()
            ):
                raise ContractError(
                    f"stage {stage_name!r}, table {table_name!r}, partition {key}: column "
                    f"{name!r} has values other than {values.get(name)!r}",
                    stage=stage_name,
                    partition=key,
                )
            table = table.drop_columns([name])
    return contract.conform(table, stage=stage_name, partition=key)


def execute_job(job: Job) -> JobResult:
    """Run one stage partition and write its (uncommitted) files; never raises."""
    configure_logging(job.log_level)  # a worker process logs like its parent
    started = utcnow()
    t0 = time.perf_counter()
    traffic: dict[str, float] = {}  # this attempt's archive requests, bytes, rows, …
    try:
        loaded = _loaded(job.spec_json)
        lake = Lake(job.lake_root)
        manifest = lake.manifest()
        stage = _make_stage(loaded, job.stage)
        ctx = make_context(lake, loaded, job.stage, job.spec_json, job.spec_dir, manifest)
        archive = ctx.archive
        before = archive.stats() if archive is not None else {}
        # reference-catalog services (CDS) read by the stage; imported here, not at the
        # top: catalogs pulls in astropy.coordinates, healpix and requests, which every
        # CLI command would otherwise pay for at start-up
        from lakepipe.catalogs import catalog_traffic

        cat_before = catalog_traffic()
        try:
            out = stage.run(ctx, Partition(key=job.key, reads=job.reads))
        finally:
            if archive is not None:
                traffic = {k: v - before.get(k, 0) for k, v in archive.stats().items()}
            traffic.update(
                {
                    f"catalog_{k}": v - cat_before.get(k, 0)
                    for k, v in catalog_traffic().items()
                    if v != cat_before.get(k, 0)
                }
            )
        tables = _normalise_output(stage, out)
        entries: dict[str, PartitionEntry] = {}
        rows = 0
        for table_name in stage.writes:
            contract = get_contract(table_name)
            table = tables.get(table_name)
            if table is None:
                table = contract.empty()
            table = prepare_table(job.stage, table_name, table, job.key)
            files, n = lake.write_partition(contract, job.key, table, job.plan.fingerprint)
            rows += n
            p = job.plan
            entries[table_name] = PartitionEntry(
                files=files,
                rows=n,
                fingerprint=p.fingerprint,
                stage=job.stage,
                code_version=p.code_version,
                params_hash=p.params_hash,
                inputs_hash=p.inputs_hash,
                run_id=job.run_id,
            )
        return JobResult(
            job.stage,
            job.key,
            True,
            entries,
            rows,
            time.perf_counter() - t0,
            started_at=started,
            archive_stats=traffic or None,
        )
    except Exception as exc:
        # Expected errors carry their message; anything else is a bug or a foreign
        # library's error, so keep the traceback in the run log.
        error = f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, LakepipeError):
            error += "\n" + traceback.format_exc(limit=8)
        return JobResult(
            job.stage,
            job.key,
            False,
            {},
            0,
            time.perf_counter() - t0,
            error=error,
            user_error=isinstance(exc, UserError),
            started_at=started,
            archive_stats=traffic or None,
        )


# -- planning -----------------------------------------------------------------------------


def stage_code_version(cls: type[Stage]) -> str:
    """What of the code a partition's fingerprint depends on: the stage kind, its
    ``version`` (bumped when its results change) and the file schema of the tables it
    writes (column names, types and nullability, partition and key columns), so that a
    contract change reruns the stage instead of leaving files that no longer match."""
    schemas = []
    for table in cls.writes:
        c = get_contract(table)
        fields = [[f.name, str(f.type), f.nullable] for f in c.file_schema]
        schemas.append([table, fields, c.partition_by, c.key])
    return f"{cls.kind}:{cls.version}+{_hash(schemas)[:8]}"


BIG_FILE_BYTES = 64 << 20


def files_state(paths: Iterable[Path]) -> list[list[str]]:
    """What identifies the contents of external input files: SHA-256 of files up to
    64 MiB, size and modification time of larger ones; folders by their files' relative
    names. Paths themselves are not included (they are in the params already), so a
    moved but identical file changes nothing."""
    out: list[list[str]] = []
    for path in [Path(p) for p in paths]:
        if path.is_dir():
            files = [(f.relative_to(path).as_posix(), f) for f in sorted(path.rglob("*"))]
        else:
            files = [("", path)]
        for name, f in files:
            if not f.is_file():
                if name == "":
                    out.append([name, "missing"])
                continue
            st = f.stat()
            if st.st_size <= BIG_FILE_BYTES:
                out.append([name, hashlib.sha256(f.read_bytes()).hexdigest()])
            else:
                out.append([name, f"{st.st_size}:{st.st_mtime_ns}"])
    return out


def _stage_params_hash(
    loaded: LoadedSpec, name: str, spec_json: str, spec_dir: str, lake_root: str
) -> str:
    s = loaded.model.stages[name]
    params = s.model_dump(mode="json", exclude={"inputs", "description"})
    archive_fp = None
    if _make_stage(loaded, name).uses_archive:
        archive = _archive(spec_json, spec_dir, lake_root)
        archive_fp = archive.fingerprint() if archive else None
    return _hash({"params": params, "archive": archive_fp})


def plan_stage(
    loaded: LoadedSpec,
    name: str,
    partitions: Iterable[Partition],
    manifest: Manifest,
    *,
    spec_json: str,
    spec_dir: str,
    lake_root: str,
    force: bool,
    external: list[list[str]] | None = None,
) -> list[PartitionPlan]:
    """Fingerprint each partition and decide run or skip, with the reason."""
    s = loaded.model.stages[name]
    cls = stage_class(s)
    code_version = stage_code_version(cls)
    params_hash = _stage_params_hash(loaded, name, spec_json, spec_dir, lake_root)
    table_writer = writers(loaded.model)
    input_tables = sorted(t for t, w in table_writer.items() if w in s.inputs)
    first_out = cls.writes[0]
    committed = manifest.partitions(first_out)
    failures = manifest.failures.get(name, {})
    plans = []
    for p in partitions:
        reads = {t: list(v) for t, v in p.reads.items()} if p.reads is not None else None
        if reads is None:
            basis = {
                t: {k: e.fingerprint for k, e in manifest.partitions(t).items()}
                for t in input_tables
            }
        else:
            basis = {
                t: {
                    k: (
                        manifest.partitions(t)[k].fingerprint
                        if k in manifest.partitions(t)
                        else "absent"
                    )
                    for k in keys
                }
                for t, keys in reads.items()
            }
        if external:
            basis = {**basis, "_external_files": external}
        inputs_hash = _hash(basis)
        fingerprint = _hash([code_version, params_hash, inputs_hash, p.key])
        entry = committed.get(p.key)
        if force:
            action, reason = "run", "forced"
        elif entry is None:
            action = "run"
            reason = (
                f"retry after failure ({failures[p.key][:120]})" if p.key in failures else "new"
            )
        elif entry.fingerprint == fingerprint:
            action, reason = "skip", "unchanged"
        elif entry.code_version != code_version:
            old_kind = entry.code_version.split("+")[0]
            what = "table contract" if old_kind == code_version.split("+")[0] else "code"
            action, reason = "run", f"{what} changed ({entry.code_version} -> {code_version})"
        elif entry.params_hash != params_hash:
            action, reason = "run", "params changed"
        else:
            action, reason = "run", "input changed"
        plans.append(
            PartitionPlan(
                stage=name,
                key=p.key,
                action=action,
                reason=reason,
                fingerprint=fingerprint,
                code_version=code_version,
                params_hash=params_hash,
                inputs_hash=inputs_hash,
                reads=reads,
            )
        )
    return plans


# -- dry runs ------------------------------------------------------------------------------


class _DryRun:
    """What a dry run assumes the run would have committed so far.

    A real run plans each stage after its upstream stages have committed, against their
    new fingerprints. A dry run computes nothing, so it plans downstream stages against
    an in-memory overlay of the manifest in which every partition planned to run carries
    the fingerprint it would be committed with (and planned removals are gone). That is
    exact for fingerprints, which do not depend on output rows; a partition list that is
    computed from upstream *rows* is not, and :class:`_DryRunReader` notices those.
    """

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = Manifest(
            tables={t: dict(parts) for t, parts in manifest.tables.items()},
            failures=manifest.failures,
        )
        self.committed = manifest
        self.changed: dict[str, str] = {}  # table -> stage that would rewrite it

    def apply(
        self, name: str, writes: Iterable[str], plans: list[PartitionPlan], removals: list
    ) -> None:
        """Record what stage ``name`` would commit."""
        for table in writes:
            parts = self.manifest.tables.setdefault(table, {})
            for p in plans:
                if p.action != "run":
                    continue
                old = parts.get(p.key)
                if old is not None and old.fingerprint == p.fingerprint:
                    continue  # forced, retried or repaired: same inputs, same rows
                self.changed[table] = name
                parts[p.key] = PartitionEntry(
                    files=[],  # rows unknown until it runs; listing-by-rows is flagged
                    rows=0,
                    fingerprint=p.fingerprint,
                    stage=name,
                    code_version=p.code_version,
                    params_hash=p.params_hash,
                    inputs_hash=p.inputs_hash,
                    run_id="(dry run)",
                )
        for table, key in removals:
            self.manifest.tables.get(table, {}).pop(key, None)
            self.changed[table] = name

    def reader(self, lake: Lake) -> _DryRunReader:
        return _DryRunReader(lake, self)


class _DryRunReader(LakeReader):
    """The overlay's partition keys for listing; committed rows for reads, noting every
    read of a table an upstream stage would rewrite (the listing is then provisional)."""

    def __init__(self, lake: Lake, dry: _DryRun) -> None:
        super().__init__(lake, dry.manifest)
        self.dry = dry
        self.rows_read: set[str] = set()

    def read(self, table: str, *args: Any, **kwargs: Any) -> pa.Table:
        if table in self.dry.changed:
            self.rows_read.add(table)
        return LakeReader(self.lake, self.dry.committed).read(table, *args, **kwargs)

    def sql(self, query: str) -> pa.Table:
        from lakepipe.sql import mentions_table  # duckdb: off the start-up path

        for table in self.dry.changed:
            if mentions_table(query, table):
                self.rows_read.add(table)
        return LakeReader(self.lake, self.dry.committed).sql(query)


# -- the run ------------------------------------------------------------------------------


def preload() -> None:
    """Import every plug-in once in the fork server, so workers start warm; also parse
    the Earth-orientation (IERS) table that observer positions need (the sim's
    asteroids, the orbit stages), which each worker would otherwise parse again."""
    from lakepipe.astro.observatories import warm_earth_orientation
    from lakepipe.export.base import formats

    for registry in (stages_registry, archives, formats):
        registry.load()
    warm_earth_orientation()


def _pool(workers: int) -> ProcessPoolExecutor:
    # forkserver: workers fork from a clean single-threaded server that has already
    # imported lakepipe and its plug-ins (plain fork would copy the threads DuckDB, Arrow
    # and polars keep in this process mid-lock; spawn would re-import everything per worker).
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["lakepipe._preload"])
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx)


def run_pipeline(
    spec: str | Path | LoadedSpec,
    *,
    lake: str | Path | None = None,
    overrides: Iterable[str] = (),
    only: Iterable[str] | None = None,
    force: Iterable[str] | bool | None = None,
    dry_run: bool = False,
    workers: int | None = None,
    observer: RunObserver | None = None,
) -> RunReport:
    """Run (or with ``dry_run`` plan) a pipeline against its lake; see the module docstring."""
    loaded = spec if isinstance(spec, LoadedSpec) else load_spec(spec, tuple(overrides))
    model = loaded.model
    observer = observer or RunObserver()
    workers = workers or default_workers()
    lake_obj = Lake(resolve_lake(lake, model))
    only_set = set(only or ())
    unknown = only_set - set(model.stages)
    force_set = set(model.stages) if force is True else set(force or ())
    unknown |= force_set - set(model.stages)
    if unknown:
        raise UserError(
            f"unknown stage(s) {', '.join(sorted(unknown))}; stages in {model.name}: "
            f"{', '.join(model.stages)}"
        )
    spec_json = json.dumps(loaded.raw, sort_keys=True, default=str)
    spec_dir = str(loaded.spec_dir.resolve())
    run_id = _new_run_id()
    report = RunReport(run_id=run_id, pipeline=model.name, lake=lake_obj.root, dry_run=dry_run)
    order = loaded.stage_order()
    pools = _PoolHolder(workers)
    runlog = _RunLog(lake_obj, run_id, loaded.resolved_yaml())
    selected = [n for n in order if not only_set or n in only_set]
    # bad input stops here, before the lock: the lake (LOCK included) stays untouched
    preflight(lake_obj, loaded, selected, spec_json=spec_json, spec_dir=spec_dir)
    lock = _RunLock(lake_obj)
    try:
        dry = _DryRun(lake_obj.manifest()) if dry_run else None
        try:
            for name in selected:
                sreport = _run_stage(
                    lake_obj,
                    loaded,
                    name,
                    spec_json=spec_json,
                    spec_dir=spec_dir,
                    run_id=run_id,
                    force=name in force_set,
                    dry=dry,
                    pools=pools,
                    observer=observer,
                    log=runlog,
                    lock=lock,
                )
                report.stages.append(sreport)
        finally:
            pools.shutdown()
    finally:
        lock.release()
    return report


def preflight(
    lake: Lake,
    loaded: LoadedSpec,
    names: Iterable[str],
    *,
    spec_json: str | None = None,
    spec_dir: str | None = None,
) -> None:
    """Call every stage's :meth:`Stage.preflight` before any partition runs.

    A bad input (an unparsable astrometry file, SQL that does not parse) then stops the
    run with its :class:`UserError` (exit 2) and the lake untouched, instead of failing
    every partition one by one. Stages see the lake as committed before the run; without
    ``spec_json`` (``lakepipe validate``) they get no archive, only its class, so only
    what needs none (files, SQL syntax, filter codes) is checked.
    """
    manifest = lake.manifest()
    folder = spec_dir or str(loaded.spec_dir.resolve())
    for name in names:
        check_sql_syntax(loaded, name)
        ctx = make_context(lake, loaded, name, spec_json, folder, manifest)
        _make_stage(loaded, name).preflight(ctx)


def preflight_spec(loaded: LoadedSpec, lake: str | Path | None = None) -> None:
    """``lakepipe validate``'s input check: :func:`preflight` of every stage against the
    spec's lake as committed (empty if it does not exist yet), with no archive."""
    preflight(Lake(resolve_lake(lake, loaded.model)), loaded, loaded.stage_order())


class _RunLog:
    """Appends attempt records; stores the resolved spec with the first one, so a run
    that stops on bad input before doing anything leaves the lake untouched."""

    def __init__(self, lake: Lake, run_id: str, spec_text: str) -> None:
        self.lake = lake
        self.run_id = run_id
        self.spec_text = spec_text
        self.started = False

    def __call__(self, record: dict[str, Any]) -> None:
        if not self.started:
            self.lake.save_run_spec(self.run_id, self.spec_text)
            self.started = True
        self.lake.log_attempt(self.run_id, record)


class _RunLock:
    """The lake's run lock, taken when a run first needs to write.

    Planning the first stage (listing its partitions, maybe asking the archive) needs no
    lock: the manifest is replaced atomically. :meth:`take` locks the lake before
    anything is written and says whether the committed state moved meanwhile (another
    run committed between planning and locking), in which case the stage plans again.
    """

    def __init__(self, lake: Lake) -> None:
        self.lake = lake
        self._cm: contextlib.AbstractContextManager[None] | None = None

    def take(self, planned_on: Manifest) -> bool:
        """Lock (once per run); True when the manifest differs from ``planned_on``."""
        if self._cm is not None:
            return False
        cm = self.lake.lock("run")
        cm.__enter__()
        self._cm = cm
        return self.lake.manifest().to_json() != planned_on.to_json()

    def release(self) -> None:
        if self._cm is not None:
            self._cm.__exit__(None, None, None)
            self._cm = None


class _PoolHolder:
    """Lazily created process pool shared by the stages of one run."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.pool: ProcessPoolExecutor | None = None

    def get(self) -> ProcessPoolExecutor:
        if self.pool is None:
            self.pool = _pool(self.workers)
        return self.pool

    def shutdown(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
            self.pool = None


def _run_stage(
    lake: Lake,
    loaded: LoadedSpec,
    name: str,
    *,
    spec_json: str,
    spec_dir: str,
    run_id: str,
    force: bool,
    dry: _DryRun | None,
    pools: _PoolHolder,
    observer: RunObserver,
    log: _RunLog,
    lock: _RunLock,
) -> StageReport:
    s = loaded.model.stages[name]
    cls = stage_class(s)
    report = StageReport(name=name, kind=cls.kind)
    dry_run = dry is not None
    stage = _make_stage(loaded, name)
    t_stage = time.perf_counter()
    while True:
        manifest = dry.manifest if dry is not None else lake.manifest()
        reader = dry.reader(lake) if dry is not None else None
        ctx = make_context(lake, loaded, name, spec_json, spec_dir, manifest, reader)
        listing_error = ""
        try:
            partitions = list(stage.partitions(ctx))
        except UserError:
            raise  # bad input: nothing written yet in this stage, the run stops (exit 2)
        except Exception as exc:
            listing_error = f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, LakepipeError):
                listing_error += "\n" + traceback.format_exc(limit=8)
        if dry_run or not lock.take(manifest):
            break  # else another run committed while this one listed: list again, locked
    if listing_error:
        msg = listing_error
        report.failed = 1
        report.errors["*"] = msg
        if not dry_run:
            log(
                _record(
                    run_id, loaded, name, cls, "*", "failed", "listing partitions failed", error=msg
                ),
            )
            lake.record_failures(name, {"*": msg})
        observer.stage_started(name, [])
        observer.stage_finished(report)
        return report
    keys = [p.key for p in partitions]
    if len(set(keys)) != len(keys):
        raise StageError(f"stage {name!r} listed duplicate partitions", stage=name)
    plans = plan_stage(
        loaded,
        name,
        partitions,
        manifest,
        spec_json=spec_json,
        spec_dir=spec_dir,
        lake_root=str(lake.root),
        force=force,
        external=files_state(stage.input_files(ctx)),
    )
    by_part = {p.key: p for p in partitions}
    for plan in plans:
        if plan.action == "skip":
            damaged = _damaged_output(lake, manifest, cls.writes, plan.key)
            damaged = damaged or stage.verify_partition(ctx, by_part[plan.key])
            if damaged:
                plan.action, plan.reason = "run", f"output damaged: {damaged}"
    report.plans = plans
    listed = set(keys)
    removals = [
        (t, k)
        for t in cls.writes
        for k, e in manifest.partitions(t).items()
        if k not in listed and e.stage == name
    ]
    report.removed = len({k for _t, k in removals})
    todo = [p for p in plans if p.action == "run"]
    report.skipped = len(plans) - len(todo)
    observer.stage_started(name, plans)
    if dry is not None:
        if reader is not None and reader.rows_read:
            tables = sorted(reader.rows_read)
            writers_ = sorted({dry.changed[t] for t in tables})
            report.note = (
                f"partition list not known until {', '.join(writers_)} run(s): it is computed "
                f"from the rows of {', '.join(tables)}; listed here from the committed rows"
            )
        dry.apply(name, cls.writes, plans, removals)
        observer.stage_finished(report)
        return report
    for p in plans:
        if p.action == "skip":
            log(
                _record(
                    run_id, loaded, name, cls, p.key, "skipped", p.reason, fingerprint=p.fingerprint
                ),
            )
    for _t, k in sorted(set(removals)):
        log(
            _record(run_id, loaded, name, cls, k, "removed", "no longer listed by the stage"),
        )
    level = current_log_level()
    jobs = [
        Job(str(lake.root), spec_json, spec_dir, name, p.key, p.reads, p, run_id, level)
        for p in todo
    ]
    pending_commits: list[Commit] = []
    last_commit = time.perf_counter()
    failed: dict[str, str] = {}

    def handle(res: JobResult, plan: PartitionPlan) -> None:
        nonlocal last_commit
        status = "ok" if res.ok else "failed"
        log(
            _record(
                run_id,
                loaded,
                name,
                cls,
                res.key,
                status,
                plan.reason,
                rows=res.rows,
                seconds=res.seconds,
                error=res.error,
                fingerprint=plan.fingerprint,
                started_at=res.started_at,
                archive_stats=res.archive_stats,
            ),
        )
        if res.ok:
            report.ok += 1
            report.rows += res.rows
            pending_commits.append(Commit(stage=name, partition=res.key, entries=res.entries))
        else:
            report.failed += 1
            report.errors[res.key] = res.error
            if res.user_error:
                report.user_errors[res.key] = f"stage {name!r}, partition {res.key}: {res.error}"
            failed[res.key] = res.error.splitlines()[0] if res.error else "failed"
        observer.partition_done(name, res.key, status, res.rows, res.error)
        if time.perf_counter() - last_commit >= COMMIT_INTERVAL_S:
            lake.commit(pending_commits)
            pending_commits.clear()
            last_commit = time.perf_counter()

    by_key = {p.key: p for p in todo}
    if pools.workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            handle(execute_job(job), by_key[job.key])
    else:
        pool = pools.get()
        futures: dict[Future[JobResult], str] = {pool.submit(execute_job, j): j.key for j in jobs}
        not_done = set(futures)
        while not_done:
            done, not_done = wait(not_done, timeout=COMMIT_INTERVAL_S, return_when=FIRST_COMPLETED)
            for f in done:
                handle(f.result(), by_key[futures[f]])
    lake.commit(pending_commits, removals)
    lake.record_failures(name, failed)
    report.seconds = time.perf_counter() - t_stage
    observer.stage_finished(report)
    return report


def _damaged_output(lake: Lake, manifest: Manifest, writes: Iterable[str], key: str) -> str | None:
    """Why partition ``key``'s committed Parquet files cannot be trusted, or None: a
    file missing or not its recorded size (deleted or truncated behind the lake's back)."""
    bad = [
        d
        for table in writes
        if (entry := manifest.partitions(table).get(key)) is not None
        for d in lake.damaged_files(entry)
    ]
    if not bad:
        return None
    if len(bad) == 1:
        return f"file {bad[0]}"
    return f"{len(bad)} files missing or truncated, e.g. {bad[0]}"


def _record(
    run_id: str,
    loaded: LoadedSpec,
    stage: str,
    cls: type[Stage],
    key: str,
    status: str,
    reason: str,
    *,
    rows: int = 0,
    seconds: float = 0.0,
    error: str = "",
    fingerprint: str = "",
    started_at: str = "",
    archive_stats: dict[str, float] | None = None,
) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "pipeline": loaded.name,
        "stage": stage,
        "kind": cls.kind,
        "partition": key,
        "status": status,
        "reason": reason,
        "rows": rows,
        "seconds": round(seconds, 6),
        "error": error or None,
        "fingerprint": fingerprint or None,
        "started_at": started_at or None,
        "finished_at": utcnow(),
        "archive_stats": archive_stats or None,
    }
