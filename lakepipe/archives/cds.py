"""CDS services: VizieR cone searches and the XMatch service, as Arrow tables.

**VizieR cone** — the ASU service ``GET {vizier_url}/viz-bin/asu-tsv`` (VizieR ASU
summary, vizier.cds.unistra.fr/doc/asu-summary.htx) with ``-source`` (table),
``-c`` (``"ra +dec"``, deg), ``-c.rs`` (radius, arcsec), ``-out`` (columns) and
``-out.max`` (row cap; VizieR's default is only 50 rows). Chosen over TAP because its
parameters are plain key/values (no ADQL to build). We ask for ``row_limit + 1`` rows
and treat more than ``row_limit`` rows, or a ``QUERY_STATUS=OVERFLOW`` notice, as a
truncated answer: an :class:`~lakepipe.errors.ArchiveError`, never a short table.

**XMatch** — ``POST {xmatch_url}/xmatch/api/v1/sync`` (CDS XMatch API documentation)
with ``request=xmatch``, ``distMaxArcsec``, ``RESPONSEFORMAT=csv``, ``cat1`` (an
uploaded CSV), ``colRA1``, ``colDec1`` and ``cat2=vizier:<table>``. Uploads are sent in
chunks (``xmatch_chunk_rows``) through the polite HTTP layer; a chunk answering with
``xmatch_max_rows`` rows or more (the service caps results at 2 million) is truncated,
hence an error.

Rows come back in the Gaia-like reference shape the virtual survey's catalog uses —
``source_id, ra, dec, pmra, pmdec, parallax, phot_g_mean_mag, phot_bp_mean_mag,
phot_rp_mean_mag, bp_rp, ref_epoch`` (deg, mas/yr, mas, mag, Julian year) — for tables
in :data:`VIZIER_COLUMNS`; other tables keep their VizieR column names.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import requests
from pydantic import BaseModel, ConfigDict, Field

from lakepipe.archives.http import HttpClient, HttpParams
from lakepipe.errors import ArchiveError

log = logging.getLogger("lakepipe.archives.cds")

#: VizieR column → reference-shape column, per VizieR table; and the table's epoch.
VIZIER_COLUMNS: dict[str, dict[str, str]] = {
    "I/355/gaiadr3": {
        "Source": "source_id",
        "RA_ICRS": "ra",
        "DE_ICRS": "dec",
        "pmRA": "pmra",
        "pmDE": "pmdec",
        "Plx": "parallax",
        "Gmag": "phot_g_mean_mag",
        "BPmag": "phot_bp_mean_mag",
        "RPmag": "phot_rp_mean_mag",
        "BP-RP": "bp_rp",
    },
}
#: Epoch (Julian year) of the positions of a VizieR table (Gaia DR3: J2016.0).
VIZIER_EPOCH_JYEAR = {"I/355/gaiadr3": 2016.0}
_INT_COLUMNS = {"source_id", "Source"}


class CdsParams(BaseModel):
    """Where the CDS services are and how much to ask of them."""

    model_config = ConfigDict(extra="forbid")

    table: str = Field("I/355/gaiadr3", description="VizieR table (Gaia DR3 by default)")
    vizier_url: str = Field("https://vizier.cds.unistra.fr", description="VizieR root")
    xmatch_url: str = Field("https://cdsxmatch.u-strasbg.fr", description="XMatch root")
    row_limit: int = Field(
        1_000_000, gt=0, description="Most rows a cone may return; more is an error"
    )
    xmatch_chunk_rows: int = Field(50_000, gt=0, description="Upload rows per XMatch request")
    xmatch_max_rows: int = Field(
        2_000_000, gt=0, description="XMatch's result cap: a chunk reaching it is truncated"
    )
    http: HttpParams = Field(default_factory=HttpParams, description="Polite HTTP knobs")


class CdsClient:
    """VizieR cone and XMatch client (see the module docstring)."""

    def __init__(self, params: CdsParams | None = None, *, session: requests.Session | None = None):
        self.params = params or CdsParams()
        self.http = HttpClient(self.params.http, session=session)
        self.query_rows = 0  # rows returned by cone and XMatch queries

    def stats(self) -> dict[str, float]:
        """Cumulative counters, as :meth:`lakepipe.archives.base.Archive.stats` has them:
        HTTP traffic plus rows returned by queries."""
        return {**self.http.stats.counters(), "query_rows": self.query_rows}

    # -- VizieR ---------------------------------------------------------------------------
    def cone_params(self, ra: float, dec: float, radius_arcsec: float) -> dict[str, str]:
        """ASU parameters of a cone search (a dict; requests encodes it)."""
        p = self.params
        cols = list(VIZIER_COLUMNS.get(p.table, {}))
        params = {
            "-source": p.table,
            "-c": f"{ra % 360.0:.8f} {dec:+.8f}",
            "-c.rs": f"{radius_arcsec:.6f}",
            "-out.max": str(p.row_limit + 1),
            "-oc.form": "dec",
        }
        if cols:
            params["-out"] = ",".join(cols)
        return params

    def cone(self, ra: float, dec: float, radius_arcsec: float) -> pa.Table:
        """Catalog rows within ``radius_arcsec`` of (ra, dec) (deg), reference shape."""
        url = self.params.vizier_url.rstrip("/") + "/viz-bin/asu-tsv"
        resp = self.http.get(url, self.cone_params(ra, dec, radius_arcsec))
        table = parse_asu_tsv(resp.content, url=resp.url)
        if table.num_rows > self.params.row_limit:
            raise ArchiveError(
                f"VizieR cone returned more than row_limit={self.params.row_limit} rows: "
                "the answer is truncated; raise row_limit or query a smaller radius",
                url=resp.url,
                status=200,
            )
        self.query_rows += table.num_rows
        log.info("VizieR cone %s returned %d rows", resp.url, table.num_rows)
        return to_reference_shape(table, self.params.table)

    # -- XMatch ---------------------------------------------------------------------------
    def xmatch(
        self,
        positions: pa.Table,
        radius_arcsec: float,
        *,
        ra: str = "ra",
        dec: str = "dec",
    ) -> pa.Table:
        """Every catalog source within ``radius_arcsec`` of each uploaded position.

        Returns ``row_index`` (row of ``positions``), ``dist_arcsec`` and the catalog's
        columns in reference shape; one row per (position, match) pair.
        """
        p = self.params
        url = p.xmatch_url.rstrip("/") + "/xmatch/api/v1/sync"
        ras = pc.cast(positions.column(ra), pa.float64()).to_numpy(zero_copy_only=False)
        decs = pc.cast(positions.column(dec), pa.float64()).to_numpy(zero_copy_only=False)
        parts: list[pa.Table] = []
        n = positions.num_rows
        for start in range(0, n, p.xmatch_chunk_rows):
            stop = min(n, start + p.xmatch_chunk_rows)
            upload = _upload_csv(range(start, stop), ras[start:stop], decs[start:stop])
            form = {
                "request": "xmatch",
                "distMaxArcsec": f"{radius_arcsec:g}",
                "RESPONSEFORMAT": "csv",
                "colRA1": "ra",
                "colDec1": "dec",
                "cat2": f"vizier:{p.table}",
            }
            resp = self.http.post(url, form, files={"cat1": ("cat1.csv", upload, "text/csv")})
            chunk = _read_csv(resp.content, url=resp.url)
            if chunk.num_rows >= p.xmatch_max_rows:
                raise ArchiveError(
                    f"XMatch answered {chunk.num_rows} rows for upload rows {start}-{stop - 1}, "
                    f"its cap is {p.xmatch_max_rows}: truncated; lower xmatch_chunk_rows",
                    url=resp.url,
                    status=200,
                )
            self.query_rows += chunk.num_rows
            log.info("XMatch rows %d-%d: %d matches", start, stop - 1, chunk.num_rows)
            parts.append(_xmatch_rows(chunk, p.table))
        if not parts:
            return _xmatch_rows(pa.table({"angDist": [], "row_index": []}), p.table)
        return pa.concat_tables(parts, promote_options="permissive")


def _upload_csv(rows: range, ras: np.ndarray, decs: np.ndarray) -> bytes:
    lines = ["row_index,ra,dec"]
    lines += [f"{i},{r!r},{d!r}" for i, r, d in zip(rows, ras.tolist(), decs.tolist(), strict=True)]
    return ("\n".join(lines) + "\n").encode()


def _read_csv(data: bytes, *, url: str) -> pa.Table:
    if not data.strip():
        return pa.table({})
    opts = pacsv.ConvertOptions(
        column_types={c: pa.int64() for c in (*_INT_COLUMNS, "row_index")},
        strings_can_be_null=True,
    )
    try:
        return pacsv.read_csv(io.BytesIO(data), convert_options=opts)
    except pa.ArrowInvalid as exc:
        raise ArchiveError(f"XMatch answered something that is not CSV: {exc}", url=url) from exc


def _xmatch_rows(chunk: pa.Table, table: str) -> pa.Table:
    names = chunk.column_names
    out = {
        "row_index": pc.cast(chunk.column("row_index"), pa.int64()),
        "dist_arcsec": pc.cast(chunk.column("angDist"), pa.float64()),
    }
    cat_cols = [c for c in names if c not in ("angDist", "row_index", "ra", "dec")]
    ref = to_reference_shape(chunk.select(cat_cols), table)
    for c in ref.column_names:
        out[c] = ref.column(c)
    return pa.table(out)


def parse_asu_tsv(data: bytes, *, url: str = "") -> pa.Table:
    """Rows of a VizieR ``asu-tsv`` answer (names, units and dashes lines, then data).

    ``QUERY_STATUS=OVERFLOW`` (truncated) and ``QUERY_STATUS=ERROR`` notices raise.
    """
    text = data.decode("utf-8", errors="replace")
    body: list[str] = []
    for line in text.splitlines():
        if line.startswith("#"):
            if "QUERY_STATUS=OVERFLOW" in line:
                raise ArchiveError(
                    "VizieR truncated the answer (QUERY_STATUS=OVERFLOW); raise row_limit "
                    "or query a smaller radius",
                    url=url,
                    status=200,
                )
            if "QUERY_STATUS=ERROR" in line:
                raise ArchiveError(f"VizieR refused the query: {line.strip()}", url=url)
            continue
        if line.strip():
            body.append(line)
    if not body:
        return pa.table({})
    names = [n.strip() for n in body[0].split("\t")]
    rows = body[3:]  # after the names, units and dashes lines
    cols: dict[str, list] = {n: [] for n in names}
    for line in rows:
        vals = line.split("\t")
        if len(vals) != len(names):
            raise ArchiveError(f"VizieR row has {len(vals)} fields, expected {len(names)}", url=url)
        for n, v in zip(names, vals, strict=True):
            cols[n].append(v.strip() or None)
    arrays = {}
    for n, vals in cols.items():
        if n in _INT_COLUMNS:
            arrays[n] = pa.array([None if v is None else int(v) for v in vals], pa.int64())
        else:
            try:
                arrays[n] = pa.array([None if v is None else float(v) for v in vals], pa.float64())
            except ValueError:
                arrays[n] = pa.array(vals, pa.string())
    return pa.table(arrays)


def to_reference_shape(table: pa.Table, vizier_table: str) -> pa.Table:
    """Rename VizieR columns to the reference shape and add ``ref_epoch`` when known."""
    mapping = VIZIER_COLUMNS.get(vizier_table, {})
    cols = {mapping.get(c, c): table.column(c) for c in table.column_names}
    if "source_id" in cols:
        cols["source_id"] = pc.cast(cols["source_id"], pa.int64())
    for name, arr in list(cols.items()):
        if name != "source_id" and pa.types.is_integer(arr.type):
            cols[name] = pc.cast(arr, pa.float64())
    epoch = VIZIER_EPOCH_JYEAR.get(vizier_table)
    if epoch is not None:
        cols["ref_epoch"] = pa.array(np.full(table.num_rows, epoch), pa.float64())
    if not table.num_rows and mapping:
        return _empty_reference(mapping, epoch)
    return pa.table(cols)


def _empty_reference(mapping: dict[str, str], epoch: float | None) -> pa.Table:
    fields = [
        pa.field(n, pa.int64() if n == "source_id" else pa.float64()) for n in mapping.values()
    ]
    if epoch is not None:
        fields.append(pa.field("ref_epoch", pa.float64()))
    return pa.schema(fields).empty_table()


def cone_cover(ras: Sequence[float], decs: Sequence[float], pad_arcsec: float) -> tuple:
    """One cone (ra, dec, radius_arcsec) around points: a cheap region for a VizieR query."""
    ra = np.radians(np.asarray(ras, dtype=float))
    dec = np.radians(np.asarray(decs, dtype=float))
    v = np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], 1).mean(0)
    ra0 = math.degrees(math.atan2(v[1], v[0])) % 360.0
    dec0 = math.degrees(math.atan2(v[2], math.hypot(v[0], v[1])))
    c = np.cos(dec) * math.cos(math.radians(dec0)) * np.cos(ra - math.radians(ra0))
    c += np.sin(dec) * math.sin(math.radians(dec0))
    radius = math.degrees(float(np.arccos(np.clip(c, -1, 1)).max())) * 3600.0 + pad_arcsec
    return ra0, dec0, radius


class CdsCatalog:
    """A reference catalog read from VizieR by cone, in :mod:`lakepipe.catalogs`' shape.

    ``read(cones, epoch_mjd)`` returns the reference table (``ref_id, ra, dec, pmra,
    pmdec, epoch_jyear, mag_<band>...``) that file and HATS catalogs return, so the
    crossmatch and calibration stages can use ``I/355/gaiadr3`` directly. Cones are
    widened by the largest proper motion over the epoch difference, queried one by one
    (each answer checked for truncation) and de-duplicated by ``source_id``.
    """

    def __init__(
        self,
        params: CdsParams | None = None,
        columns: object | None = None,
        *,
        max_pm_mas_yr: float = 10500.0,
        session: requests.Session | None = None,
    ) -> None:
        from lakepipe.catalogs.base import ColumnMap, ReadStats

        self.client = CdsClient(params, session=session)
        self.columns = columns or ColumnMap(
            ra="ra",
            dec="dec",
            id="source_id",
            mags={"G": "phot_g_mean_mag"},
            pmra="pmra",
            pmdec="pmdec",
            epoch=VIZIER_EPOCH_JYEAR.get(self.client.params.table),
        )
        self.max_pm_mas_yr = max_pm_mas_yr
        self.stats = ReadStats()

    def traffic(self) -> dict[str, float]:
        """Cumulative HTTP traffic and query rows of this catalog (``stats`` is taken by
        the per-read :class:`~lakepipe.catalogs.base.ReadStats` of every catalog kind)."""
        return self.client.stats()

    def read(self, cones: list, epoch_mjd: float | None = None) -> pa.Table:
        """Reference rows inside the union of ``cones`` at ``epoch_mjd`` (MJD UTC)."""
        from lakepipe.catalogs.base import record_traffic

        before = self.traffic()
        try:
            return self._read(cones, epoch_mjd)
        finally:  # failed reads cost requests too
            after = self.traffic()
            record_traffic(**{k: v - before.get(k, 0) for k, v in after.items()})

    def _read(self, cones: list, epoch_mjd: float | None) -> pa.Table:
        from lakepipe.catalogs.base import ReadStats, reference_schema, to_reference, widen

        self.stats = ReadStats()
        if not cones:
            return reference_schema(self.columns).empty_table()
        epoch = self.columns.epoch if isinstance(self.columns.epoch, int | float) else None
        wide = widen(cones, self.columns, self.max_pm_mas_yr, epoch_mjd, epoch)
        parts = [self.client.cone(c.ra, c.dec, c.radius_deg * 3600.0) for c in wide]
        raw = pa.concat_tables(parts, promote_options="permissive")
        if "source_id" in raw.column_names and raw.num_rows:
            _, first = np.unique(raw.column("source_id").to_numpy(), return_index=True)
            raw = raw.take(pa.array(np.sort(first)))
        self.stats.rows_read = raw.num_rows
        return to_reference(raw, self.columns, cones, epoch_mjd)
