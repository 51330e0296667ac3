"""The one polite HTTP layer every archive client goes through.

:class:`HttpClient` wraps an injected :class:`requests.Session` and adds what a good
citizen of a public archive does:

- a User-Agent naming lakepipe and a contact address;
- connect and read timeouts on every request, and an overall budget per call;
- a token-bucket rate limit per host (GCRA, "generic cell rate algorithm", ITU-T I.371:
  each request reserves the next slot ``1/rate`` seconds after the previous one, up to
  ``burst`` at once) shared by every thread and, with ``rate_limit_scope="machine"``, by
  every process on the machine through a locked state file;
- a cap on concurrent requests per host (lock-file slots, so it also holds across the
  runner's worker processes);
- retries with exponential backoff and jitter on connection errors, timeouts, dropped
  bodies, 429 and every status >= 500, honouring ``Retry-After`` (RFC 9110 §10.2.3);
  never on other 4xx;
- a circuit breaker per host: after ``breaker_after`` consecutive requests that used up
  their retries on a 5xx, a timeout or a connection error, the host "appears down" and
  further requests fail at once for ``breaker_cooldown_s``, then one trial request is
  let through (half-open) and a success closes the breaker again (the pattern of
  M. Nygard, *Release It!*, 2nd ed., ch. 5). Its state lives in the client, so it is
  per process: each runner worker (a separate process) learns of an outage by itself;
- body checks: ``Content-Length`` must match, and a format hook (``check_fits``) must
  accept the payload, else the attempt counts as failed and is retried;
- streaming downloads to ``<dest>.part`` with resume by HTTP ``Range`` (RFC 9110 §14)
  and an atomic rename once complete and checked;
- a response cache keyed by method, URL, parameters and body that only ever stores
  complete, checked 200 answers;
- credentials from ``<PREFIX>_USER``/``<PREFIX>_PASSWORD`` (sent only to the origin
  they belong to) or ``~/.netrc`` (read here, per host, only when ``netrc`` is on: the
  session's own ``trust_env`` netrc lookup is switched off, proxies and CA bundles from
  the environment are still honoured); HTTP Basic never goes over plain ``http`` except
  to loopback, a ``user:password@`` inside a URL is refused, and nothing is logged;
- request ids, payload size and ``Server-Timing`` at debug level.

Every failure is an :class:`lakepipe.errors.ArchiveError` with the URL, status, number
of attempts and elapsed time. All knobs live in :class:`HttpParams`, which archive
``Params`` embed as ``http:`` so a spec can set them.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import io
import json
import logging
import netrc
import os
import random
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlencode, urlsplit, urlunsplit

import requests
import urllib3
from pydantic import BaseModel, ConfigDict, Field

from lakepipe import __version__
from lakepipe.errors import ArchiveError

try:  # POSIX file locks for machine-wide limits; elsewhere limits are per process
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("lakepipe.archives.http")

CACHE_ENV = "LAKEPIPE_HTTP_CACHE"
CONTACT_ENV = "LAKEPIPE_CONTACT"
#: Retried besides every status >= 500 (server errors, RFC 9110 §15.6).
RETRY_STATUSES = frozenset({429})
_LOOPBACK_HOSTS = frozenset({"localhost", "::1"})
_REQUEST_ID_HEADERS = ("x-request-id", "x-amzn-requestid", "x-correlation-id", "request-id")

Params = Mapping[str, Any] | Sequence[tuple[str, Any]] | None
BodyCheck = Callable[[bytes], None]


class HttpParams(BaseModel):
    """Every knob of the polite HTTP layer, with its default (settable in a spec)."""

    model_config = ConfigDict(extra="forbid")

    contact: str | None = Field(
        None,
        description="Contact address put in the User-Agent (default: $LAKEPIPE_CONTACT)",
    )
    user_agent: str | None = Field(
        None, description="Full User-Agent override (default: lakepipe/<version> (contact))"
    )
    connect_timeout_s: float = Field(10.0, gt=0, description="TCP connect timeout")
    read_timeout_s: float = Field(60.0, gt=0, description="Timeout between received bytes")
    total_timeout_s: float = Field(
        900.0, gt=0, description="Budget for one call, retries and waits included"
    )
    rate_limit_per_s: float = Field(5.0, gt=0, description="Requests per second per host")
    burst: int = Field(1, ge=1, description="Requests allowed at once before the rate applies")
    rate_limit_scope: Literal["machine", "process"] = Field(
        "machine", description="Share the rate limit and concurrency cap across processes"
    )
    max_concurrency_per_host: int = Field(4, ge=1, description="Requests in flight per host")
    max_retries: int = Field(6, ge=0, description="Retries after the first attempt")
    backoff_base_s: float = Field(0.5, ge=0, description="First backoff delay")
    backoff_max_s: float = Field(60.0, ge=0, description="Largest backoff delay")
    jitter: float = Field(0.5, ge=0, le=1, description="Random fraction taken off each delay")
    retry_after_max_s: float = Field(
        300.0, ge=0, description="Longest Retry-After honoured; longer waits are capped"
    )
    breaker_after: int = Field(
        3,
        ge=0,
        description="Consecutive requests to a host failing after all retries (5xx, timeout, "
        "connection error) before it counts as down and requests fail at once (0: never)",
    )
    breaker_cooldown_s: float = Field(
        60.0,
        ge=0,
        description="How long requests to a down host fail at once before one trial request "
        "is let through",
    )
    cache_dir: str | None = Field(
        None,
        description="Response/download cache folder (default: $LAKEPIPE_HTTP_CACHE, else none)",
    )
    cache: bool = Field(True, description="Use the response cache when a cache_dir is set")
    netrc: bool = Field(True, description="Read credentials from ~/.netrc for the archive host")


@dataclass(frozen=True)
class HttpResponse:
    """A complete, checked answer."""

    url: str
    status: int
    headers: Mapping[str, str]
    content: bytes
    attempts: int = 1
    elapsed_s: float = 0.0
    from_cache: bool = False

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")


@dataclass
class HttpStats:
    """Counters of one client (thread-safe updates through ``add``)."""

    requests: int = 0
    retries: int = 0
    bytes: int = 0
    cache_hits: int = 0
    downloads_resumed: int = 0
    rate_wait_s: float = 0.0
    failed_fast: int = 0  # requests not sent: their host appeared down (circuit breaker)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **deltas: float) -> None:
        with self._lock:
            for k, v in deltas.items():
                setattr(self, k, getattr(self, k) + v)

    def counters(self) -> dict[str, float]:
        """The counters as a dict, as archives report them in ``_runs.archive_stats``
        (``failed_fast``: requests not sent because their host appeared down)."""
        with self._lock:
            return {
                "requests": self.requests,
                "retries": self.retries,
                "bytes": self.bytes,
                "cache_hits": self.cache_hits,
                "downloads_resumed": self.downloads_resumed,
                "rate_wait_s": round(self.rate_wait_s, 3),
                "failed_fast": self.failed_fast,
            }


class BodyError(Exception):
    """A body failed a check (length, format); the attempt is retried."""


# -- helpers --------------------------------------------------------------------------------


def redact(url: str) -> str:
    """``url`` without any ``user:password@`` part (safe for logs and errors)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def full_url(url: str, params: Params = None) -> str:
    """URL with its query parameters encoded (for logs, errors and cache keys)."""
    if not params:
        return url
    items = list(params.items()) if isinstance(params, Mapping) else list(params)
    sep = "&" if urlsplit(url).query else "?"
    return url + sep + urlencode(items)


def host_key(url: str) -> str:
    """``host:port`` a limit applies to (the host and port of :func:`origin`)."""
    _, host, port = origin(url)
    return f"{host}:{port}"


def is_retryable_status(status: int) -> bool:
    """Whether an HTTP status is worth a retry: 429 and any 5xx, never another 4xx."""
    return status in RETRY_STATUSES or status >= 500


def origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of a URL: the unit credentials are scoped to (RFC 6454)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or (443 if scheme == "https" else 80)
    return scheme, (parts.hostname or "").lower(), port


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine (127.0.0.0/8, ::1, localhost)."""
    host = host.lower().strip("[]")
    return host in _LOOPBACK_HOSTS or host.startswith("127.")


def reject_userinfo(url: str, what: str = "URL") -> None:
    """Raise ``ValueError`` when ``url`` carries ``user:password@`` (it would be logged,
    fingerprinted and written to the lake with the spec)."""
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            f"{what} {redact(url)!r} must not carry a login (user:password@); put it in "
            "the archive's credentials environment variables or in ~/.netrc"
        )


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta-seconds or HTTP-date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def check_fits(data: bytes) -> None:
    """Raise :class:`BodyError` unless ``data`` is a complete FITS file.

    Checks the 2880-byte block structure (FITS Standard 4.0 §3.1), that every HDU's data
    lies inside the file, and any ``CHECKSUM``/``DATASUM`` present.
    """
    from astropy.io import fits

    if len(data) < 2880 or len(data) % 2880 or not data.startswith(b"SIMPLE  ="):
        raise BodyError(f"not a complete FITS file ({len(data)} bytes)")
    try:
        # Escalate astropy's truncation/checksum warnings for this one call only: here
        # they mean a damaged download, which we must reject, not merely report.
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with fits.open(io.BytesIO(data), checksum=True, lazy_load_hdus=False) as hdul:
                for hdu in hdul:
                    info = hdu.fileinfo()
                    if info["datLoc"] + info["datSpan"] > len(data):
                        raise BodyError("FITS data extends past the end of the file")
    except BodyError:
        raise
    except Exception as exc:  # astropy raises OSError, ValueError, warnings-as-errors
        raise BodyError(f"FITS does not open: {exc}") from exc


def _credentials(prefix: str | None, host: str, use_netrc: bool) -> tuple[str, str] | None:
    if prefix:
        user = os.environ.get(f"{prefix}_USER")
        password = os.environ.get(f"{prefix}_PASSWORD")
        if user and password:
            log.debug("credentials for %s from $%s_USER/$%s_PASSWORD", host, prefix, prefix)
            return user, password
    if use_netrc:
        path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
        if path.is_file():
            try:
                entry = netrc.netrc(str(path)).authenticators(host)
            except (netrc.NetrcParseError, OSError) as exc:
                log.warning("ignoring unreadable %s: %s", path, type(exc).__name__)
                return None
            if entry and entry[0] and entry[2]:
                log.debug("credentials for %s from %s", host, path)
                return entry[0], entry[2]
    return None


# -- limits -------------------------------------------------------------------------------


def _state_dir() -> Path:
    d = Path(tempfile.gettempdir()) / f"lakepipe-http-{os.getuid() if hasattr(os, 'getuid') else 0}"
    d.mkdir(mode=0o700, exist_ok=True)
    return d


def _state_name(host: str) -> str:
    return hashlib.sha256(host.encode()).hexdigest()[:16]


class RateLimiter:
    """GCRA token bucket: ``rate`` requests/s, ``burst`` at once; optionally machine-wide.

    ``acquire`` reserves the next slot under a lock and sleeps outside it, so concurrent
    callers are staggered rather than serialised.
    """

    def __init__(self, rate_per_s: float, burst: int = 1, state_file: Path | None = None):
        self.interval_s = 1.0 / rate_per_s
        self.tolerance_s = (burst - 1) * self.interval_s
        self.state_file = state_file if fcntl is not None else None
        self._lock = threading.Lock()
        self._tat = 0.0  # theoretical arrival time of the next request (epoch seconds)

    def _reserve(self, tat: float, now: float) -> tuple[float, float]:
        tat = max(tat, now)
        return tat - self.tolerance_s, tat + self.interval_s

    def acquire(self) -> float:
        """Wait for a slot; returns the seconds waited."""
        with self._lock:
            now = time.time()
            if self.state_file is None:
                allowed_at, self._tat = self._reserve(self._tat, now)
            else:
                fd = os.open(self.state_file, os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    raw = os.pread(fd, 32, 0)
                    try:
                        tat = float(raw.decode() or 0.0)
                    except ValueError:
                        tat = 0.0
                    now = time.time()
                    allowed_at, new_tat = self._reserve(tat, now)
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, repr(new_tat).encode(), 0)
                finally:
                    os.close(fd)  # closing releases the flock
        wait = allowed_at - now
        if wait > 0:
            time.sleep(wait)
        return max(wait, 0.0)


class ConcurrencyCap:
    """At most ``limit`` holders at once; lock-file slots make it machine-wide."""

    def __init__(self, limit: int, slot_prefix: Path | None = None) -> None:
        self.limit = limit
        self.slot_prefix = slot_prefix if fcntl is not None else None
        self._sem = threading.BoundedSemaphore(limit)

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        with self._sem:
            if self.slot_prefix is None:
                yield
                return
            fd = self._take_slot()
            try:
                yield
            finally:
                os.close(fd)

    def _take_slot(self) -> int:
        delay = 0.002
        while True:
            for i in range(self.limit):
                fd = os.open(f"{self.slot_prefix}.slot{i}", os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return fd
                except OSError:
                    os.close(fd)
            time.sleep(delay)
            delay = min(delay * 2, 0.05)


class CircuitBreaker:
    """Fail fast on a host that appears down (see the module docstring).

    Closed: requests go through; each one that ends in a "down" failure (retries used up
    on a 5xx, a timeout or a connection error) adds one to a count, and any other ending
    (a 200, a 4xx, a bad body: the host answered) resets it. Open, once the count reaches
    ``after``: :meth:`allow` raises :class:`ArchiveError` for ``cooldown_s`` after the
    last failure. Half-open, after that: one trial request is let through (others still
    fail at once); its failure opens the breaker again, its success closes it.

    The state is held in this object (thread-safe), i.e. per client and so per process:
    the runner's workers are separate processes and each counts failures on its own.
    ``after=0`` disables the breaker.
    """

    def __init__(self, host: str, after: int, cooldown_s: float) -> None:
        self.host = host
        self.after = after
        self.cooldown_s = cooldown_s
        self.failures = 0
        self.last_reason = ""
        self._last_failure_wall = 0.0  # epoch seconds, for messages
        self._last_failure_mono = 0.0
        self._trial = False
        self._lock = threading.Lock()

    @property
    def is_open(self) -> bool:
        return self.after > 0 and self.failures >= self.after

    def allow(self, method: str, shown: str) -> None:
        """Return if a request may be sent now, else raise the "appears down" error."""
        with self._lock:
            if not self.is_open:
                return
            since = time.monotonic() - self._last_failure_mono
            if since >= self.cooldown_s and not self._trial:
                self._trial = True
                log.info("%s: cool-down over; sending one trial request", self.host)
                return
            wait = max(0.0, self.cooldown_s - since)
            when = time.strftime("%H:%M:%S UTC", time.gmtime(self._last_failure_wall))
            retry = (
                f"for another {wait:.1f} s"
                if wait > 0
                else "until the trial request in flight ends"
            )
            raise ArchiveError(
                f"{method} not sent: the archive at {self.host} appears down: {self.failures} "
                f"consecutive requests failed after all their retries (the last at {when}, "
                f"{since:.0f} s ago: {self.last_reason}); requests to it fail at once {retry} "
                f"(http.breaker_cooldown_s={self.cooldown_s:g}, http.breaker_after="
                f"{self.after}). Rerun later: committed partitions are kept and the rerun "
                "retries only what failed",
                url=shown,
            )

    def settle(self, down: bool | None, reason: str = "") -> None:
        """Record how a sent request ended: ``True`` a down failure, ``False`` the host
        answered, ``None`` unknown (e.g. interrupted: the count is left as it is)."""
        with self._lock:
            self._trial = False
            if down is None or self.after == 0:
                return
            if not down:
                if self.failures >= self.after:
                    log.info("%s answers again; circuit breaker closed", self.host)
                self.failures = 0
                return
            self.failures += 1
            self.last_reason = reason if len(reason) <= 200 else reason[:197] + "..."
            self._last_failure_wall = time.time()
            self._last_failure_mono = time.monotonic()
            if self.failures == self.after:
                log.warning(
                    "%s appears down after %d consecutive failed requests (%s); requests to "
                    "it fail at once for %g s",
                    self.host,
                    self.failures,
                    reason,
                    self.cooldown_s,
                )


# -- the client ---------------------------------------------------------------------------


class HttpClient:
    """Polite HTTP for one archive; see the module docstring.

    Parameters
    ----------
    params
        The knobs (defaults when omitted).
    session
        The :class:`requests.Session` to use (injected; a new one when omitted).
    credentials_env
        Prefix of the environment variables holding a login (``LAKEPIPE_IRSA`` reads
        ``LAKEPIPE_IRSA_USER`` and ``LAKEPIPE_IRSA_PASSWORD``); ``~/.netrc`` is the fallback.
    credentials_url
        The archive root the login belongs to: it is sent only to that origin (scheme,
        host, port), never to another host. Required with ``credentials_env``.
    seed
        Seed of the backoff jitter (delays only; never changes results).
    """

    def __init__(
        self,
        params: HttpParams | None = None,
        *,
        session: requests.Session | None = None,
        credentials_env: str | None = None,
        credentials_url: str | None = None,
        seed: int | None = None,
    ) -> None:
        if credentials_env and not credentials_url:
            raise ValueError("credentials_env needs credentials_url (the origin they are for)")
        self.params = params or HttpParams()
        self.session = session or requests.Session()
        # requests would otherwise read ~/.netrc for every host on its own (also after
        # redirects), whatever ``netrc`` says; credentials are handled in _auth_for, and
        # proxies and CA bundles from the environment are passed explicitly instead.
        self.session.trust_env = False
        self.credentials_env = credentials_env
        self.credentials_origin = origin(credentials_url) if credentials_url else None
        self.stats = HttpStats()
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self._limits_lock = threading.Lock()
        self._rate: dict[str, RateLimiter] = {}
        self._caps: dict[str, ConcurrencyCap] = {}
        self._breakers: dict[str, CircuitBreaker] = {}
        self._auth: dict[str, tuple[str, str] | None] = {}
        cache = self.params.cache_dir or os.environ.get(CACHE_ENV)
        self.cache_dir = Path(cache).expanduser() if cache else None

    # -- configuration ------------------------------------------------------------------
    @property
    def user_agent(self) -> str:
        if self.params.user_agent:
            return self.params.user_agent
        contact = self.params.contact or os.environ.get(CONTACT_ENV)
        extra = f"; contact: {contact}" if contact else ""
        return (
            f"lakepipe/{__version__} (+https://github.com/lakepipe/lakepipe{extra}) "
            f"python-requests/{requests.__version__}"
        )

    def _limits(self, url: str) -> tuple[RateLimiter, ConcurrencyCap]:
        host = host_key(url)
        with self._limits_lock:
            if host not in self._rate:
                shared = self.params.rate_limit_scope == "machine"
                base = _state_dir() / _state_name(host) if shared else None
                self._rate[host] = RateLimiter(
                    self.params.rate_limit_per_s,
                    self.params.burst,
                    base.with_suffix(".rate") if base else None,
                )
                self._caps[host] = ConcurrencyCap(self.params.max_concurrency_per_host, base)
            return self._rate[host], self._caps[host]

    def _breaker(self, url: str) -> CircuitBreaker:
        host = host_key(url)
        with self._limits_lock:
            if host not in self._breakers:
                p = self.params
                self._breakers[host] = CircuitBreaker(host, p.breaker_after, p.breaker_cooldown_s)
            return self._breakers[host]

    def _auth_for(self, url: str) -> tuple[str, str] | None:
        """The login for ``url``: environment credentials only for their own origin,
        ``~/.netrc`` by host when enabled; never Basic over plain http off loopback."""
        scheme, host, port = key = origin(url)
        if key not in self._auth:
            env = self.credentials_env if key == self.credentials_origin else None
            self._auth[key] = _credentials(env, host, self.params.netrc)
        auth = self._auth[key]
        if auth is not None and scheme != "https" and not is_loopback(host):
            raise ArchiveError(
                f"refusing to send a login over plain {scheme} to {host}:{port} (it would "
                "travel in clear text); use an https:// base_url",
                url=redact(url),
            )
        return auth

    def _env_settings(self, url: str) -> dict[str, Any]:
        """Proxies and CA bundle from the environment (what ``trust_env`` gave, minus
        its netrc lookup)."""
        out: dict[str, Any] = {"proxies": requests.utils.get_environ_proxies(url)}
        bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
        if bundle and self.session.verify is True:
            out["verify"] = bundle
        return out

    def _check_url(self, url: str) -> None:
        try:
            reject_userinfo(url)
        except ValueError as exc:
            raise ArchiveError(str(exc), url=redact(url)) from None

    # -- public API -----------------------------------------------------------------------
    def get(
        self,
        url: str,
        params: Params = None,
        *,
        check: BodyCheck | None = None,
        cache: bool = True,
    ) -> HttpResponse:
        """GET ``url`` with query ``params``; complete, checked body or ArchiveError."""
        return self.request("GET", url, params=params, check=check, cache=cache)

    def get_range(self, url: str, start: int, end: int, params: Params = None) -> HttpResponse:
        """Bytes ``start..end`` (inclusive) of a resource (e.g. a FITS header)."""
        return self.request(
            "GET", url, params=params, headers={"Range": f"bytes={start}-{end}"}, cache=True
        )

    def post(
        self,
        url: str,
        data: Params = None,
        *,
        files: Mapping[str, tuple[str, bytes, str]] | None = None,
        check: BodyCheck | None = None,
        cache: bool = True,
    ) -> HttpResponse:
        """POST form ``data`` (and multipart ``files``: name → (filename, bytes, type))."""
        return self.request("POST", url, data=data, files=files, check=check, cache=cache)

    def request(
        self,
        method: str,
        url: str,
        *,
        params: Params = None,
        data: Params = None,
        files: Mapping[str, tuple[str, bytes, str]] | None = None,
        headers: Mapping[str, str] | None = None,
        check: BodyCheck | None = None,
        cache: bool = True,
    ) -> HttpResponse:
        """One logical request with limits, retries, checks and the response cache.

        A ``Range`` in ``headers`` makes 206 (and a whole-resource 200) acceptable.
        """
        self._check_url(url)
        shown = redact(full_url(url, params))
        key = self._cache_key(method, url, params, data, files, headers)
        ok = (200, 206) if headers and "Range" in headers else (200,)
        cached = self._cache_read(key) if cache else None
        if cached is not None:
            self.stats.add(cache_hits=1)
            log.debug("cache hit %s %s (%d bytes)", method, shown, len(cached.content))
            return cached

        def attempt(timeout: tuple[float, float]) -> HttpResponse:
            resp = self.session.request(
                method,
                url,
                params=params,
                data=data,
                files=files,
                headers={**(headers or {}), "User-Agent": self.user_agent},
                auth=self._auth_for(url),
                timeout=timeout,
                stream=True,
                **self._env_settings(url),
            )
            with resp:
                if resp.status_code not in ok:
                    snippet = next(resp.iter_content(500), b"") if resp.status_code < 500 else b""
                    return HttpResponse(shown, resp.status_code, dict(resp.headers), snippet)
                body = b"".join(resp.iter_content(1 << 16))
                _check_length(resp, len(body))
                self._log_response(method, shown, resp, len(body))
            if check is not None:
                check(body)
            return HttpResponse(shown, 200, dict(resp.headers), body)

        result = self._with_retries(method, shown, url, attempt)
        if cache:
            self._cache_write(key, result)
        return result

    def download(
        self,
        url: str,
        dest: str | Path,
        params: Params = None,
        *,
        check: BodyCheck | None = None,
    ) -> Path:
        """Stream ``url`` to ``dest`` atomically, resuming ``dest.part`` by HTTP Range.

        An existing ``dest`` is trusted (it was checked before its rename) and nothing
        is fetched. The ``.part`` file survives failures so the next call resumes it.
        A lock file serialises threads and processes downloading the same ``dest``.
        """
        self._check_url(url)
        dest = Path(dest)
        if dest.exists():
            self.stats.add(cache_hits=1)
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(dest.with_name(dest.name + ".lock")):
            if dest.exists():  # another worker finished it while we waited
                self.stats.add(cache_hits=1)
                return dest
            return self._download(url, dest, params, check)

    def _download(self, url: str, dest: Path, params: Params, check: BodyCheck | None) -> Path:
        part = dest.with_name(dest.name + ".part")
        shown = redact(full_url(url, params))

        def attempt(timeout: tuple[float, float]) -> HttpResponse:
            have = part.stat().st_size if part.exists() else 0
            headers = {"User-Agent": self.user_agent, "Accept-Encoding": "identity"}
            if have:
                headers["Range"] = f"bytes={have}-"
            resp = self.session.get(
                url,
                params=params,
                headers=headers,
                auth=self._auth_for(url),
                timeout=timeout,
                stream=True,
                **self._env_settings(url),
            )
            with resp:
                if resp.status_code == 416 and have:
                    part.unlink()  # our partial file is no prefix of this resource: restart
                    raise BodyError("server refused the resume range; restarting from 0")
                if resp.status_code not in (200, 206):
                    return HttpResponse(shown, resp.status_code, dict(resp.headers), b"")
                total = _total_size(resp)
                if resp.status_code == 206:
                    start = _range_start(resp)
                    if start != have:
                        part.unlink()
                        raise BodyError(f"server resumed at byte {start}, we have {have}")
                    self.stats.add(downloads_resumed=1)
                    log.debug("resuming %s at byte %d", shown, have)
                    mode = "ab"
                else:
                    have, mode = 0, "wb"
                received = 0
                with open(part, mode) as fh:
                    try:
                        # read1 hands over whatever has arrived, so bytes received before
                        # a dropped connection reach the .part file and can be resumed
                        while chunk := resp.raw.read1(1 << 16):
                            fh.write(chunk)
                            received += len(chunk)
                    finally:
                        fh.flush()
                        os.fsync(fh.fileno())
                        self.stats.add(bytes=received)  # on the wire, kept for resume
                _check_length(resp, received)
                self._log_response("GET", shown, resp, received)
            size = part.stat().st_size
            if total is not None and size != total:
                raise BodyError(f"download has {size} bytes, expected {total}")
            if check is not None:
                try:
                    check(part.read_bytes())
                except BodyError:
                    part.unlink()  # complete but bad: start over next attempt
                    raise
            os.replace(part, dest)
            return HttpResponse(shown, 200, dict(resp.headers), b"")

        self._with_retries("GET", shown, url, attempt)
        return dest

    def fetch(self, url: str, params: Params = None, *, check: BodyCheck | None = None) -> bytes:
        """Bytes of a product: through the download cache when there is one."""
        if self.cache_dir is None:
            return self.get(url, params, check=check, cache=False).content
        key = hashlib.sha256(full_url(url, params).encode()).hexdigest()
        dest = self.cache_dir / "files" / key[:2] / key
        return self.download(url, dest, params, check=check).read_bytes()

    # -- retries ------------------------------------------------------------------------
    def backoff_s(self, attempt: int, retry_after: float | None = None) -> float:
        """Delay before retry number ``attempt`` (1-based): exponential with jitter."""
        p = self.params
        delay = min(p.backoff_max_s, p.backoff_base_s * 2 ** (attempt - 1))
        with self._rng_lock:
            delay *= 1.0 - p.jitter * self._rng.random()
        if retry_after is not None:
            delay = max(delay, min(retry_after, p.retry_after_max_s))
        return delay

    def _with_retries(
        self,
        method: str,
        shown: str,
        url: str,
        attempt: Callable[[tuple[float, float]], HttpResponse],
    ) -> HttpResponse:
        p = self.params
        breaker = self._breaker(url)
        try:
            breaker.allow(method, shown)
        except ArchiveError:
            self.stats.add(failed_fast=1)
            raise
        rate, cap = self._limits(url)
        t0 = time.monotonic()
        timeout = (p.connect_timeout_s, p.read_timeout_s)
        last_status: int | None = None
        last_reason = ""
        down: bool | None = None  # how this request ends, for the circuit breaker
        try:
            for n in range(1, p.max_retries + 2):
                retry_after: float | None = None
                with cap.hold():
                    waited = rate.acquire()
                    self.stats.add(requests=1, rate_wait_s=waited, retries=int(n > 1))
                    try:
                        result = attempt(timeout)
                    except (requests.ConnectionError, requests.Timeout) as exc:
                        last_status, last_reason = None, f"{type(exc).__name__}: {exc}"
                    except (
                        requests.exceptions.ChunkedEncodingError,
                        urllib3.exceptions.ProtocolError,
                        urllib3.exceptions.ReadTimeoutError,
                    ) as exc:
                        last_status, last_reason = 200, f"connection dropped mid-body: {exc}"
                    except BodyError as exc:
                        last_status, last_reason = 200, str(exc)
                    except requests.RequestException as exc:  # invalid URL, too many redirects
                        raise ArchiveError(
                            f"{method} failed: {exc}",
                            url=shown,
                            attempts=n,
                            elapsed_s=time.monotonic() - t0,
                        ) from exc
                    else:
                        if result.status == 200:
                            down = False
                            self.stats.add(bytes=len(result.content))
                            return HttpResponse(
                                result.url,
                                200,
                                result.headers,
                                result.content,
                                attempts=n,
                                elapsed_s=time.monotonic() - t0,
                            )
                        last_status = result.status
                        if not is_retryable_status(result.status):
                            down = False  # the host answered
                            said = result.text.strip().replace("\n", " ")[:200]
                            raise ArchiveError(
                                f"{method} refused with HTTP {result.status}"
                                + _hint_for(result.status)
                                + (f"; the archive said: {said}" if said else ""),
                                url=shown,
                                status=result.status,
                                attempts=n,
                                elapsed_s=time.monotonic() - t0,
                            )
                        last_reason = f"HTTP {result.status}"
                        retry_after = parse_retry_after(result.headers.get("Retry-After"))
                elapsed = time.monotonic() - t0
                if n > p.max_retries:
                    break
                delay = self.backoff_s(n, retry_after)
                if elapsed + delay > p.total_timeout_s:
                    last_reason += f"; next retry would exceed total_timeout_s={p.total_timeout_s}"
                    break
                log.info(
                    "retry %d/%d of %s in %.2fs (%s)", n, p.max_retries, shown, delay, last_reason
                )
                time.sleep(delay)
            # retries used up: a 5xx or no answer at all counts towards "appears down"
            down = last_status is None or last_status >= 500
            raise ArchiveError(
                f"{method} failed after retries: {last_reason}",
                url=shown,
                status=last_status,
                attempts=n,
                elapsed_s=time.monotonic() - t0,
            )
        finally:
            breaker.settle(down, last_reason)

    # -- logging ------------------------------------------------------------------------
    def _log_response(self, method: str, shown: str, resp: requests.Response, size: int) -> None:
        if not log.isEnabledFor(logging.DEBUG):
            return
        rid = next((resp.headers[h] for h in _REQUEST_ID_HEADERS if h in resp.headers), "-")
        log.debug(
            "%s %s -> %d, %d bytes, request-id %s, server-timing %s",
            method,
            shown,
            resp.status_code,
            size,
            rid,
            resp.headers.get("Server-Timing", "-"),
        )

    # -- response cache -----------------------------------------------------------------
    def _cache_key(
        self,
        method: str,
        url: str,
        params: Params,
        data: Params,
        files: Mapping[str, tuple[str, bytes, str]] | None,
        headers: Mapping[str, str] | None = None,
    ) -> str:
        h = hashlib.sha256()
        h.update(method.encode() + b" " + full_url(url, params).encode())
        if headers and "Range" in headers:
            h.update(b"\0range " + headers["Range"].encode())
        if data:
            items = sorted(data.items()) if isinstance(data, Mapping) else list(data)
            h.update(b"\0data" + json.dumps(items, default=str).encode())
        for name, (fname, blob, ctype) in sorted((files or {}).items()):
            h.update(f"\0file {name} {fname} {ctype} ".encode())
            h.update(hashlib.sha256(blob).digest())
        return h.hexdigest()

    def _cache_path(self, key: str) -> Path | None:
        if self.cache_dir is None or not self.params.cache:
            return None
        return self.cache_dir / "responses" / key[:2] / key

    def _cache_read(self, key: str) -> HttpResponse | None:
        path = self._cache_path(key)
        if path is None or not path.exists():
            return None
        meta = json.loads(path.with_suffix(".json").read_text())
        content = path.read_bytes()
        if hashlib.sha256(content).hexdigest() != meta["sha256"]:
            return None
        return HttpResponse(meta["url"], 200, meta["headers"], content, 0, 0.0, True)

    def _cache_write(self, key: str, result: HttpResponse) -> None:
        path = self._cache_path(key)
        if path is None or result.status != 200:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        keep = {k: v for k, v in result.headers.items() if k.lower() == "content-type"}
        meta = {
            "url": result.url,
            "headers": keep,
            "sha256": hashlib.sha256(result.content).hexdigest(),
        }
        _write_atomic(path.with_suffix(".json"), json.dumps(meta).encode())
        _write_atomic(path, result.content)


_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock on ``path`` across threads (a lock per path) and processes (flock)."""
    with _THREAD_LOCKS_GUARD:
        tlock = _THREAD_LOCKS.setdefault(str(path), threading.Lock())
    with tlock:
        if fcntl is None:  # pragma: no cover - Windows: threads only
            yield
            return
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _check_length(resp: requests.Response, received: int) -> None:
    """A body shorter or longer than its Content-Length is a failed attempt."""
    declared = resp.headers.get("Content-Length")
    if declared is None or resp.headers.get("Content-Encoding"):
        return  # chunked, or decoded size differs from the wire size
    if received != int(declared):
        raise BodyError(f"body has {received} bytes, Content-Length says {declared}")


def _total_size(resp: requests.Response) -> int | None:
    if resp.status_code == 206:
        cr = resp.headers.get("Content-Range", "")
        total = cr.rsplit("/", 1)[-1]
        return int(total) if total.isdigit() else None
    if resp.headers.get("Content-Encoding"):
        return None
    cl = resp.headers.get("Content-Length")
    return int(cl) if cl is not None else None


def _range_start(resp: requests.Response) -> int:
    cr = resp.headers.get("Content-Range", "")  # "bytes 100-999/1000"
    try:
        return int(cr.split()[1].split("-")[0])
    except (IndexError, ValueError):
        raise BodyError(f"unparseable Content-Range {cr!r}") from None


def _hint_for(status: int) -> str:
    if status in (401, 403):
        return (
            "; the archive wants a login: set the archive's credentials environment "
            "variables or add the host to ~/.netrc"
        )
    if status == 404:
        return "; the archive has no such resource"
    if status == 400:
        return "; the archive rejected the query parameters"
    return ""
