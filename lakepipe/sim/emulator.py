"""Loopback archive emulator: the virtual survey served through the real archives' APIs.

:class:`ArchiveEmulator` is a :class:`~http.server.ThreadingHTTPServer` on 127.0.0.1
that answers, from a survey archive (the virtual survey's ``SimArchive``):

=====================================================  ====================================
``GET /ibe/search/ztf/products/sci?POS=&SIZE=&...``    IRSA IBE metadata search; ``ct=csv``
                                                       with the real ZTF column names
``GET /ibe/data/ztf/products/sci/YYYY/MMDD/ffffff/``   the science image (FITS; ``Range``
``ztf_<filefracday>_<field>_<filt>_c<cc>_o_q<q>_``     honoured), or with ``center=RA,DEC``
``sciimg.fits``                                        and ``size=N[arcsec]`` a cutout;
                                                       HTTP 400 when it misses the image
``POST /xmatch/api/v1/sync``                           CDS XMatch against the survey's
                                                       reference catalog (CSV)
``GET /viz-bin/asu-tsv?-source=&-c=&-c.rs=&...``       VizieR cone search (ASU TSV)
=====================================================  ====================================

Formats follow the archives' documentation: IBE (irsa.ipac.caltech.edu/docs/
program_interface/ztf_api.html, ztf_metadata.html, ibe/cutouts.html), CDS XMatch
(cdsxmatch.u-strasbg.fr/xmatch/doc/API-calls.html) and VizieR ASU
(vizier.cds.unistra.fr/doc/asu-summary.htx).

Faults (:class:`Faults`, seeded) make it a hostile archive: 503 bursts, 429 with
``Retry-After`` (random bursts, and for clients faster than ``max_rate_per_s``), slow
responses, connections dropped mid-body, truncated and corrupt FITS. Every request is
logged (:attr:`ArchiveEmulator.log` of :class:`LogEntry`: time, method, path, query,
status, bytes, fault, Range, Basic-auth user name — never a password) so tests can
assert on what clients did; ``log_file`` also appends each entry as a JSON line as it
happens. ``serve()`` runs it in the foreground for ``lakepipe sim serve``.
"""

from __future__ import annotations

import base64
import binascii
import csv
import datetime as dt
import io
import json
import logging
import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any, Protocol
from urllib.parse import parse_qs, urlsplit

import duckdb
import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from lakepipe.archives.cds import VIZIER_COLUMNS
from lakepipe.errors import UserError

log = logging.getLogger("lakepipe.sim.emulator")

JD_MJD_OFFSET = 2400000.5  # JD = MJD + 2400000.5
FILTER_IDS = {"zg": 1, "zr": 2, "zi": 3}  # ZTF fid
ZTF_NIGHT0_MJD = 58119.0  # 2018-01-01: origin of the emulated nid (ZTF night index)

#: Column order of IBE ``ztf/products/sci`` CSV answers (ZTF science-exposure metadata,
#: IRSA ztf_metadata.html). The real table has no photometric zeropoint: clients read it
#: from the image header's MAGZP card.
IBE_SCI_COLUMNS = (
    "ra", "dec", "infobits", "field", "ccdid", "qid", "rcid", "fid", "filtercode", "pid",
    "nid", "expid", "itid", "imgtype", "imgtypecode", "obsdate", "obsjd", "exptime",
    "filefracday", "seeing", "airmass", "moonillf", "moonesb", "maglimit",
    "crpix1", "crpix2", "crval1", "crval2", "cd11", "cd12", "cd21", "cd22",
    "ra1", "dec1", "ra2", "dec2", "ra3", "dec3", "ra4", "dec4", "ipac_pub_date", "ipac_gid",
)  # fmt: skip

#: VizieR names of Gaia DR3 (I/355/gaiadr3) columns ↔ the reference-catalog shape.
GAIA_VIZIER_COLUMNS = VIZIER_COLUMNS["I/355/gaiadr3"]

_PRODUCT_RE = re.compile(
    r"^/ibe/data/ztf/products/sci/(?P<y>\d{4})/(?P<md>\d{4})/(?P<frac>\d{6})/"
    r"ztf_(?P<ffd>\d{14})_(?P<field>\d{6})_(?P<filt>z[gri])_c(?P<ccd>\d{2})_"
    r"(?P<itc>[a-z])_q(?P<qid>\d)_sciimg\.fits$"
)


class SurveyArchive(Protocol):
    """What the emulator needs from its backing archive (``SimArchive`` provides it)."""

    def exposures(self, where: Any) -> pa.Table: ...

    def image_fits(self, exposure_id: int) -> bytes: ...

    def cutout(self, exposure_id: int, ra: float, dec: float, size_arcsec: float) -> tuple: ...

    def catalog(self) -> pa.Table: ...


class Faults(BaseModel):
    """Fault injection; probabilities are per request and drawn from a seeded generator."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(0, description="Seed of the fault draws")
    error_503_prob: float = Field(0.0, ge=0, le=1, description="Chance a 503 burst starts")
    burst_503_len: int = Field(1, ge=1, description="Requests answered 503 per burst")
    error_429_prob: float = Field(0.0, ge=0, le=1, description="Chance a 429 burst starts")
    burst_429_len: int = Field(1, ge=1, description="Requests answered 429 per burst")
    retry_after_s: int = Field(1, ge=0, description="Retry-After sent with 429 and 503")
    max_rate_per_s: float | None = Field(
        None, gt=0, description="Answer 429 to clients faster than this (1 s window)"
    )
    latency_s: float = Field(0.0, ge=0, description="Added to every response")
    slow_prob: float = Field(0.0, ge=0, le=1, description="Chance of an extra slow_s delay")
    slow_s: float = Field(2.0, ge=0, description="Extra delay of slow responses")
    drop_prob: float = Field(0.0, ge=0, le=1, description="Drop the connection mid-body")
    truncate_prob: float = Field(0.0, ge=0, le=1, description="Serve a truncated FITS")
    corrupt_prob: float = Field(0.0, ge=0, le=1, description="Serve a FITS with a bad header")
    down: bool = Field(False, description="Answer every request with 503 (archive down)")

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        """Unknown fault names get a did-you-mean and the list of every fault."""
        if isinstance(data, dict):
            from lakepipe.registry import did_you_mean

            names = list(cls.model_fields)
            for key in data:
                if key not in cls.model_fields:
                    raise ValueError(
                        f"unknown fault {key!r}.{did_you_mean(str(key), names)} "
                        f"Available: {', '.join(names)}"
                    )
        return data


@dataclass(frozen=True)
class LogEntry:
    """One request as the emulator saw it."""

    t: float
    method: str
    path: str
    query: str
    status: int
    bytes: int
    fault: str
    range: str | None
    user: str | None = None  # HTTP Basic user name the client sent (never the password)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record (one line of ``log_file``, ``lakepipe sim serve --log``).

        Adds the time as ISO 8601 UTC (``time``, and ``timestamp`` to the millisecond);
        ``fault`` is None when the request was answered normally.
        """
        out = asdict(self)
        when = dt.datetime.fromtimestamp(self.t, dt.UTC)
        out["time"] = when.isoformat()
        out["timestamp"] = when.isoformat(timespec="milliseconds")
        out["fault"] = self.fault or None
        return out


# -- IBE metadata from the survey's exposures -----------------------------------------------


def _obsdate(jd: float) -> dt.datetime:
    return dt.datetime(1858, 11, 17, tzinfo=dt.UTC) + dt.timedelta(days=jd - JD_MJD_OFFSET)


def filefracday(obsjd: float) -> str:
    """``YYYYMMDDffffff``: UTC date and fraction of day (6 digits) of exposure start."""
    t = _obsdate(obsjd)
    frac = (t - t.replace(hour=0, minute=0, second=0, microsecond=0)).total_seconds() / 86400.0
    return f"{t:%Y%m%d}{math.floor(frac * 1e6):06d}"


def product_path(row: dict[str, Any]) -> str:
    """Path of a science image from IBE metadata (IRSA ztf_metadata.html rule)."""
    ffd = str(row["filefracday"])
    return (
        f"/ibe/data/ztf/products/sci/{ffd[:4]}/{ffd[4:8]}/{ffd[8:14]}/"
        f"ztf_{ffd}_{int(row['field']):06d}_{row['filtercode']}_c{int(row['ccdid']):02d}_"
        f"{row['imgtypecode']}_q{int(row['qid'])}_sciimg.fits"
    )


def ibe_metadata(exposures: pa.Table) -> pa.Table:
    """IBE ``sci`` metadata rows for exposures in the lake's ``exposures`` shape.

    ``obsjd`` is the Julian date at the *start* of the exposure (ZTF convention), i.e.
    ``mjd - exptime/2`` converted to JD; ``pid`` carries the exposure id.
    """
    e = exposures.to_pydict()
    n = exposures.num_rows
    exptime = np.array([v if v is not None else 0.0 for v in e["exptime_s"]], dtype=float)
    obsjd = np.asarray(e["mjd"], dtype=float) - exptime / 172800.0 + JD_MJD_OFFSET
    ccd = np.asarray(e["ccdid"], dtype=np.int64)
    qid = np.asarray(e["qid"], dtype=np.int64)
    pid = np.asarray(e["exposure_id"], dtype=np.int64)

    def col(name: str) -> list:
        return e[name] if name in e else [None] * n

    cols: dict[str, Any] = {
        "ra": e["ra"],
        "dec": e["dec"],
        "infobits": [0] * n,
        "field": e["field"],
        "ccdid": ccd,
        "qid": qid,
        "rcid": (ccd - 1) * 4 + (qid - 1),
        "fid": [FILTER_IDS.get(f, 0) for f in e["filter"]],
        "filtercode": e["filter"],
        "pid": pid,
        "nid": np.floor(np.asarray(e["mjd"]) - ZTF_NIGHT0_MJD).astype(np.int64),
        "expid": pid // 100,
        "itid": [1] * n,
        "imgtype": ["object"] * n,
        "imgtypecode": ["o"] * n,
        "obsdate": [f"{_obsdate(j):%Y-%m-%d %H:%M:%S.%f}"[:-3] + "+00" for j in obsjd],
        "obsjd": obsjd,
        "exptime": exptime,
        "filefracday": [int(filefracday(j)) for j in obsjd],
        "seeing": col("seeing_fwhm_arcsec"),
        "airmass": col("airmass"),
        "moonillf": [0.0] * n,
        "moonesb": [0.0] * n,
        "maglimit": col("mag_lim"),
    }
    for c in ("crpix1", "crpix2", "crval1", "crval2", "cd11", "cd12", "cd21", "cd22"):
        cols[c] = [None] * n  # WCS lives in the image headers
    for i in range(1, 5):
        cols[f"ra{i}"] = col(f"ra{i}")
        cols[f"dec{i}"] = col(f"dec{i}")
    cols["ipac_pub_date"] = ["2026-01-01 00:00:00+00"] * n
    cols["ipac_gid"] = [1] * n
    return pa.table({c: cols[c] for c in IBE_SCI_COLUMNS})


def _table_csv(table: pa.Table) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(table.column_names)
    cols = [table.column(i).to_pylist() for i in range(table.num_columns)]
    for row in zip(*cols, strict=True):
        w.writerow(["" if v is None else repr(v) if isinstance(v, float) else v for v in row])
    return buf.getvalue().encode()


def _parse_floats(text: str, n: int | None = None) -> list[float]:
    vals = [float(v) for v in text.replace(" ", "").split(",") if v]
    if n is not None and len(vals) != n:
        raise ValueError(f"expected {n} comma-separated numbers, got {text!r}")
    return vals


def _angle_deg(text: str) -> list[float]:
    """``x[,y][unit]`` of IBE ``size=`` in degrees (arcsec, arcmin, deg; default deg)."""
    m = re.match(r"^\s*([-+0-9.eE,\s]+?)\s*(arcsec|arcmin|deg|rad)?\s*$", text)
    if not m:
        raise ValueError(f"cannot parse size {text!r}")
    scale = {"arcsec": 1 / 3600, "arcmin": 1 / 60, "deg": 1.0, "rad": 180 / math.pi, None: 1.0}
    return [v * scale[m.group(2)] for v in _parse_floats(m.group(1))]


class _Gate:
    """Per-request fault decisions from one seeded generator (thread-safe)."""

    def __init__(self, faults: Faults) -> None:
        self.f = faults
        self.rng = np.random.default_rng(faults.seed)
        self.lock = threading.Lock()
        self.burst: tuple[int, int] = (0, 0)  # (status, requests left)
        self.recent: deque[float] = deque()

    def status_fault(self, now: float) -> int:
        """0, or the status (429/503) to answer instead of the request."""
        f = self.f
        with self.lock:
            if f.down:
                return 503
            if f.max_rate_per_s is not None:
                while self.recent and now - self.recent[0] > 1.0:
                    self.recent.popleft()
                self.recent.append(now)
                if len(self.recent) > f.max_rate_per_s + 1:
                    return 429
            status, left = self.burst
            if left > 0:
                self.burst = (status, left - 1)
                return status
            u503, u429 = self.rng.random(2)
            if u503 < f.error_503_prob:
                self.burst = (503, f.burst_503_len - 1)
                return 503
            if u429 < f.error_429_prob:
                self.burst = (429, f.burst_429_len - 1)
                return 429
        return 0

    def draw(self, prob: float) -> bool:
        if prob <= 0:
            return False
        with self.lock:
            return bool(self.rng.random() < prob)


# -- the server ------------------------------------------------------------------------------


class ArchiveEmulator(ThreadingHTTPServer):
    """HTTP server speaking IBE, XMatch and VizieR for a survey archive.

    Use as a context manager to run it in a background thread::

        with ArchiveEmulator(SimArchive(...), faults=Faults(error_503_prob=0.2)) as emu:
            client.get(emu.url + "/ibe/search/ztf/products/sci", {...})
            emu.log  # what was asked and answered
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        archive: SurveyArchive,
        host: str = "127.0.0.1",
        port: int = 0,
        faults: Faults | None = None,
        *,
        catalog_name: str = "I/355/gaiadr3",
        log_file: str | Path | None = None,
    ) -> None:
        self.archive = archive
        self.faults = faults or Faults()
        self.catalog_name = catalog_name
        self.log: list[LogEntry] = []
        self.log_file = Path(log_file) if log_file is not None else None
        self._log_lock = threading.Lock()
        self._log_fh: IO[str] | None = None
        self._gate = _Gate(self.faults)
        self._meta: pa.Table | None = None
        self._paths: dict[str, int] = {}
        self._meta_lock = threading.Lock()
        self._fits_cache: dict[int, bytes] = {}
        self._vizier: pa.Table | None = None
        self._thread: threading.Thread | None = None
        super().__init__((host, port), _Handler)
        if self.log_file is not None:  # once bound: a busy port leaves no file behind
            try:
                self._log_fh = open(self.log_file, "a", encoding="utf-8")  # noqa: SIM115
            except OSError as exc:
                self.server_close()
                raise UserError(
                    f"cannot write the request log {self.log_file}: {exc.strerror}"
                ) from None

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients hanging up (resets, broken pipes) are normal here: log, don't print."""
        log.debug("connection from %s ended with an error", client_address, exc_info=True)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> ArchiveEmulator:
        """Warm the archive's caches, then serve in a daemon thread."""
        warm_up = getattr(self.archive, "warm_up", None)
        if callable(warm_up):
            warm_up()  # one-off costs must not land inside clients' read timeouts
        self.metadata()
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def server_close(self) -> None:
        super().server_close()
        with self._log_lock:
            if self._log_fh is not None:
                self._log_fh.close()
                self._log_fh = None

    def __enter__(self) -> ArchiveEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- data -----------------------------------------------------------------------------
    def metadata(self) -> pa.Table:
        """IBE metadata of every exposure of the survey (built once)."""
        with self._meta_lock:
            if self._meta is None:
                from lakepipe.archives.query import ExposureQuery

                meta = ibe_metadata(self.archive.exposures(ExposureQuery()))
                self._paths = {
                    product_path(r): int(r["pid"]) for r in meta.select(_PATH_COLS).to_pylist()
                }
                self._meta = meta
            return self._meta

    def exposure_for_path(self, path: str) -> int | None:
        self.metadata()
        return self._paths.get(path)

    def image_bytes(self, exposure_id: int) -> bytes:
        """Full image FITS (kept in memory: Range requests re-read it)."""
        with self._meta_lock:
            cached = self._fits_cache.get(exposure_id)
        if cached is None:
            cached = self.archive.image_fits(exposure_id)
            with self._meta_lock:
                if len(self._fits_cache) > 64:
                    self._fits_cache.pop(next(iter(self._fits_cache)))
                self._fits_cache[exposure_id] = cached
        return cached

    def vizier_catalog(self) -> pa.Table:
        """The survey's reference catalog under VizieR's Gaia DR3 column names (built once)."""
        with self._meta_lock:
            if self._vizier is None:
                cat = self.archive.catalog()
                have = set(cat.column_names)
                self._vizier = pa.table(
                    {v: cat.column(o) for v, o in GAIA_VIZIER_COLUMNS.items() if o in have}
                )
            return self._vizier

    def record(self, entry: LogEntry) -> None:
        with self._log_lock:
            self.log.append(entry)
            if self._log_fh is not None:  # request threads share it: one line at a time
                self._log_fh.write(json.dumps(entry.to_dict()) + "\n")
                self._log_fh.flush()
        log.info(
            "%s %s%s -> %d (%d bytes)%s",
            entry.method,
            entry.path,
            f"?{entry.query}" if entry.query else "",
            entry.status,
            entry.bytes,
            f" [fault: {entry.fault}]" if entry.fault else "",
        )

    def requests_per_window(self, window_s: float = 1.0, path_prefix: str = "") -> int:
        """Most requests that arrived within any ``window_s`` (for rate-limit checks)."""
        times = np.sort([e.t for e in self.log if e.path.startswith(path_prefix)])
        if len(times) == 0:
            return 0
        ends = np.searchsorted(times, times + window_s, side="left")
        return int((ends - np.arange(len(times))).max())


_PATH_COLS = ["filefracday", "field", "filtercode", "ccdid", "imgtypecode", "qid", "pid"]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ArchiveEmulator
    server_version = "lakepipe-emulator"

    def log_message(self, fmt: str, *args: object) -> None:
        log.debug("%s " + fmt, self.address_string(), *args)

    # -- plumbing -------------------------------------------------------------------------
    def _finish(self, status: int, nbytes: int, fault: str = "") -> None:
        parts = urlsplit(self.path)
        self.server.record(
            LogEntry(
                self._t0,
                self.command,
                parts.path,
                parts.query,
                status,
                nbytes,
                fault,
                self.headers.get("Range"),
                _basic_user(self.headers.get("Authorization")),
            )
        )

    def _send(
        self,
        status: int,
        body: bytes,
        ctype: str = "text/plain; charset=utf-8",
        headers: dict[str, str] | None = None,
        fault: str = "",
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Server-Timing", f"app;dur={1000 * (time.time() - self._t0):.1f}")
        self.send_header("X-Request-Id", f"emu-{id(self):x}-{self._t0:.6f}")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self._finish(status, len(body), fault)  # before the body: clients may act on it
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_body(self, body: bytes, ctype: str, *, fits: bool, ranged: bool = False) -> None:
        """200/206 with the body faults: drop mid-body, truncated or corrupt FITS."""
        gate = self.server._gate
        f = self.server.faults
        status, headers = 200, {"Accept-Ranges": "bytes"} if ranged else {}
        if ranged and (rng := self.headers.get("Range")):
            m = re.match(r"bytes=(\d+)-(\d*)$", rng.strip())
            if not m or int(m.group(1)) >= len(body):
                self._send(416, b"", headers={"Content-Range": f"bytes */{len(body)}"})
                return
            start = int(m.group(1))
            end = int(m.group(2)) if m.group(2) else len(body) - 1
            end = min(end, len(body) - 1)
            headers["Content-Range"] = f"bytes {start}-{end}/{len(body)}"
            body, status = body[start : end + 1], 206
        if gate.draw(f.drop_prob) and len(body) > 1:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self._finish(status, len(body) // 2, "drop")
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        fault = ""
        if fits and status == 200:
            if gate.draw(f.truncate_prob):
                body, fault = body[: max(2880, (len(body) // 2) // 2880 * 2880)], "truncate"
            elif gate.draw(f.corrupt_prob):
                body, fault = b"CORRUPT!" + body[8:], "corrupt"
        self._send(status, body, ctype, headers, fault)

    def _fault_gate(self) -> bool:
        """Apply latency and status faults; True when the request was answered."""
        f = self.server.faults
        delay = f.latency_s + (f.slow_s if self.server._gate.draw(f.slow_prob) else 0.0)
        status = self.server._gate.status_fault(self._t0)
        if delay:
            time.sleep(delay)
        if status:
            msg = b"Service Unavailable" if status == 503 else b"Too Many Requests"
            self._send(status, msg, headers={"Retry-After": str(f.retry_after_s)}, fault="status")
            return True
        return False

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        self._t0 = time.time()
        length = int(self.headers.get("Content-Length") or 0)
        self._body = self.rfile.read(length) if length else b""
        if self._fault_gate():
            return
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        try:
            if parts.path == "/ibe/search/ztf/products/sci":
                self._ibe_search(query)
            elif parts.path.startswith("/ibe/data/ztf/products/sci/"):
                self._ibe_product(parts.path, query)
            elif parts.path == "/xmatch/api/v1/sync" and self.command == "POST":
                self._xmatch()
            elif parts.path == "/viz-bin/asu-tsv":
                self._vizier(query)
            else:
                self._send(404, f"no such endpoint: {parts.path}\n".encode())
        except (ValueError, KeyError, duckdb.Error) as exc:
            self._send(400, f"bad request: {exc}\n".encode())
        except Exception as exc:  # an emulator bug: answer 500 like a real server would
            log.exception("emulator error on %s", self.path)
            self._send(500, f"internal error: {type(exc).__name__}: {exc}\n".encode())

    # -- IBE ------------------------------------------------------------------------------
    def _ibe_search(self, q: dict[str, str]) -> None:
        q = {k.upper(): v for k, v in q.items()}
        meta = self.server.metadata()
        keep = np.ones(meta.num_rows, dtype=bool)
        if "POS" in q:
            ra0, dec0 = _parse_floats(q["POS"], 2)
            keep &= _ibe_region(meta, ra0, dec0, q.get("SIZE"), q.get("INTERSECT", "OVERLAPS"))
        table = meta.filter(pa.array(keep))
        if q.get("WHERE"):
            con = duckdb.connect(config={"enable_external_access": False})
            try:
                con.register("meta", table)
                rel = con.sql(f"SELECT * FROM meta WHERE {q['WHERE']}")
                table = rel.to_arrow_table()
            finally:
                con.close()
        if q.get("CT", "ipac_table").lower() != "csv":
            raise ValueError("the emulator answers ct=csv only")
        if q.get("COLUMNS"):
            table = table.select([c.strip() for c in q["COLUMNS"].split(",")])
        self._send(200, _table_csv(table), "text/csv")

    def _ibe_product(self, path: str, q: dict[str, str]) -> None:
        exposure_id = self.server.exposure_for_path(path)
        if exposure_id is None:
            self._send(404, f"no such product: {path}\n".encode())
            return
        if "center" not in q:
            body = self.server.image_bytes(exposure_id)
            self._send_body(body, "application/fits", fits=True, ranged=True)
            return
        center = q["center"].removesuffix("deg")
        ra, dec = _parse_floats(center, 2)
        size = _angle_deg(q.get("size", "0.1"))
        if q.get("gzip", "true").lower() != "false":
            raise ValueError("the emulator serves gzip=false cutouts only")
        header, data, status = self.server.archive.cutout(exposure_id, ra, dec, size[0] * 3600.0)
        if data is None or np.size(data) == 0:
            self._send(400, f"cutout does not intersect the image ({status})\n".encode())
            return
        from astropy.io import fits

        buf = io.BytesIO()
        fits.PrimaryHDU(np.asarray(data), header=header).writeto(buf)
        self._send_body(buf.getvalue(), "application/fits", fits=True)

    # -- CDS ------------------------------------------------------------------------------
    def _catalog_vizier(self) -> pa.Table:
        return self.server.vizier_catalog()

    def _vizier(self, q: dict[str, str]) -> None:
        if q.get("-source") != self.server.catalog_name:
            self._send(200, b"#INFO\tQUERY_STATUS=ERROR\tunknown catalog\n", "text/plain")
            return
        m = re.match(r"^\s*([0-9.eE+-]+)\s*([+-][0-9.eE+-]+|\s[0-9.eE+-]+)\s*$", q["-c"])
        if not m:
            raise ValueError(f"cannot parse -c={q['-c']!r}")
        ra0, dec0 = float(m.group(1)), float(m.group(2))
        radius_arcsec = float(q.get("-c.rs", "1800"))
        max_rows = int(q.get("-out.max", "50"))  # VizieR's default is 50 rows
        cat = self._catalog_vizier()
        from lakepipe.archives.query import angular_sep_deg

        sep = angular_sep_deg(
            cat.column("RA_ICRS").to_numpy(), cat.column("DE_ICRS").to_numpy(), ra0, dec0
        )
        inside = np.flatnonzero(sep * 3600.0 <= radius_arcsec)
        inside = inside[np.argsort(sep[inside], kind="stable")]
        overflow = len(inside) > max_rows
        inside = inside[:max_rows]
        sel = cat.take(pa.array(inside, pa.int64()))
        wanted = [c for c in q.get("-out", "").split(",") if c and c != "_r"]
        if wanted:
            sel = sel.select([c for c in wanted if c in sel.column_names])
        out = io.StringIO()
        out.write("#\n#   VizieR Astronomical Server (lakepipe emulator)\n#\n")
        out.write(f"#INFO\t-out.max={max_rows}\n")
        if overflow:
            out.write("#INFO\tQUERY_STATUS=OVERFLOW\ttruncated result (maximum size reached)\n")
        out.write(f"#RESOURCE=yCat\n#Table\t{self.server.catalog_name.replace('/', '_')}:\n")
        names = [*sel.column_names, "_r"] if "_r" in q.get("-out", "") else sel.column_names
        out.write("\t".join(names) + "\n")
        out.write("\t".join("deg" if n in ("RA_ICRS", "DE_ICRS") else "" for n in names) + "\n")
        out.write("\t".join("-" * 10 for _ in names) + "\n")
        cols = [sel.column(n).to_pylist() for n in sel.column_names]
        rs = (sep[inside] * 3600.0).tolist()
        for i, row in enumerate(zip(*cols, strict=True)):
            vals = ["" if v is None else repr(v) if isinstance(v, float) else str(v) for v in row]
            if "_r" in names:
                vals.append(repr(rs[i]))
            out.write("\t".join(vals) + "\n")
        self._send(200, out.getvalue().encode(), "text/tab-separated-values")

    def _xmatch(self) -> None:
        import email.parser
        import email.policy

        ctype = self.headers.get("Content-Type", "")
        msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {ctype}\r\n\r\n".encode() + self._body
        )
        form: dict[str, bytes] = {}
        for part in msg.iter_parts():
            name = part.get_param("name", header="content-disposition")
            form[name] = part.get_payload(decode=True)
        get = {k: v.decode() for k, v in form.items() if k != "cat1"}
        if get.get("request") != "xmatch":
            raise ValueError("request must be xmatch")
        if get.get("cat2") != f"vizier:{self.server.catalog_name}":
            raise ValueError(f"unknown cat2 {get.get('cat2')!r}")
        if get.get("RESPONSEFORMAT", "votable").lower() != "csv":
            raise ValueError("the emulator answers RESPONSEFORMAT=csv only")
        radius_arcsec = float(get["distMaxArcsec"])
        rows = list(csv.DictReader(io.StringIO(form["cat1"].decode())))
        ra1 = np.array([float(r[get["colRA1"]]) for r in rows])
        dec1 = np.array([float(r[get["colDec1"]]) for r in rows])
        cat = self._catalog_vizier()
        cra, cdec = cat.column("RA_ICRS").to_numpy(), cat.column("DE_ICRS").to_numpy()
        from lakepipe.archives.query import angular_sep_deg

        out = io.StringIO()
        w = csv.writer(out, lineterminator="\n")
        cat_cols = cat.column_names
        in_cols = list(rows[0].keys()) if rows else [get["colRA1"], get["colDec1"]]
        w.writerow(["angDist", *in_cols, *cat_cols])
        catcols = [cat.column(c).to_numpy(zero_copy_only=False) for c in cat.column_names]
        # coarse Dec prefilter keeps this O(N log M) for big uploads
        order = np.argsort(cdec, kind="stable")
        sdec = cdec[order]
        r_deg = radius_arcsec / 3600.0
        for i, r in enumerate(rows):
            lo, hi = np.searchsorted(sdec, [dec1[i] - r_deg, dec1[i] + r_deg])
            cand = order[lo:hi]
            sep = angular_sep_deg(cra[cand], cdec[cand], ra1[i], dec1[i]) * 3600.0
            for j in cand[np.argsort(sep, kind="stable")]:
                d = float(angular_sep_deg(cra[j], cdec[j], ra1[i], dec1[i]) * 3600.0)
                if d <= radius_arcsec:
                    vals = [col[j].item() for col in catcols]
                    w.writerow([f"{d:.6f}", *[r[c] for c in in_cols], *_csv_vals(vals)])
        self._send(200, out.getvalue().encode(), "text/csv")


def _basic_user(header: str | None) -> str | None:
    """User name of an HTTP Basic ``Authorization`` header (RFC 7617), else None."""
    if not header or not header.lower().startswith("basic "):
        return None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return decoded.split(":", 1)[0]


def _csv_vals(vals: list) -> Iterator[str]:
    for v in vals:
        yield "" if v is None else repr(v) if isinstance(v, float) else str(v)


def _ibe_region(
    meta: pa.Table, ra0: float, dec0: float, size: str | None, intersect: str
) -> np.ndarray:
    """IBE POS/SIZE/INTERSECT on footprints (corners ra1..dec4)."""
    from lakepipe.archives.query import ExposureQuery

    rc = np.stack([meta.column(f"ra{i}").to_numpy(zero_copy_only=False) for i in (1, 2, 3, 4)], 1)
    dc = np.stack([meta.column(f"dec{i}").to_numpy(zero_copy_only=False) for i in (1, 2, 3, 4)], 1)
    ra = meta.column("ra").to_numpy()
    dec = meta.column("dec").to_numpy()
    if not size:  # a point: images containing it
        tiny = ExposureQuery(ra=ra0 % 360.0, dec=dec0, radius_deg=1e-9)
        return tiny.overlaps(rc, dc)
    w, h = (_parse_floats(size) * 2)[:2]
    half_ra = min(180.0, (w / 2.0) / max(math.cos(math.radians(dec0)), 1e-6))
    box = (
        (ra0 - half_ra) % 360.0,
        (ra0 + half_ra) % 360.0,
        max(-90.0, dec0 - h / 2.0),
        min(90.0, dec0 + h / 2.0),
    )
    if half_ra >= 180.0:
        box = (0.0, 360.0, box[2], box[3])
    region = ExposureQuery(box=box)
    mode = intersect.upper()
    if mode == "CENTER":
        return region.contains(ra, dec)
    if mode == "ENCLOSED":
        return np.all(region.contains(rc, dc), axis=1)
    if mode == "COVERS":
        corners = [(box[0], box[2]), (box[1], box[2]), (box[1], box[3]), (box[0], box[3])]
        ok = np.ones(len(ra), dtype=bool)
        for bra, bdec in corners:
            ok &= ExposureQuery(ra=bra, dec=bdec, radius_deg=1e-9).overlaps(rc, dc)
        return ok
    if mode == "OVERLAPS":
        return region.overlaps(rc, dc)
    raise ValueError(f"INTERSECT must be COVERS, ENCLOSED, CENTER or OVERLAPS (got {intersect})")


def serve(
    archive: SurveyArchive,
    host: str = "127.0.0.1",
    port: int = 8765,
    faults: Faults | None = None,
    *,
    ready: Callable[[ArchiveEmulator], None] | None = None,
    stop: threading.Event | None = None,
    log_file: str | Path | None = None,
) -> list[LogEntry]:
    """Run the emulator in the foreground (``lakepipe sim serve``) until Ctrl-C or ``stop``.

    ``ready`` is called with the running server (its ``url`` has the bound port, useful
    with ``port=0``). Each request is logged at INFO on ``lakepipe.sim.emulator`` and,
    with ``log_file``, appended there as a JSON line (:meth:`LogEntry.to_dict`).
    Returns the request log.
    """
    emu = ArchiveEmulator(archive, host, port, faults, log_file=log_file).start()
    log.info("archive emulator listening on %s", emu.url)
    if ready is not None:
        ready(emu)
    try:
        while not (stop is not None and stop.wait(0.1)):
            if stop is None:
                time.sleep(0.1)
    except KeyboardInterrupt:
        pass
    finally:
        emu.stop()
    return emu.log
