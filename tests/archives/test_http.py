"""The polite HTTP layer against real HTTP servers on 127.0.0.1 (ephemeral ports)."""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
import requests
from astropy.io import fits

from lakepipe.archives.http import (
    BodyError,
    HttpClient,
    HttpParams,
    RateLimiter,
    check_fits,
    parse_retry_after,
    redact,
)
from lakepipe.errors import ArchiveError


def _fits_bytes(n: int = 64, seed: int = 1) -> bytes:
    data = np.random.default_rng(seed).normal(100.0, 5.0, (n, n)).astype(np.float32)
    hdu = fits.PrimaryHDU(data)
    hdu.header["EXPTIME"] = 30.0
    buf = io.BytesIO()
    hdu.writeto(buf)
    return buf.getvalue()


FITS = _fits_bytes()
BIG = bytes(range(256)) * 400  # 102400 bytes, for Range tests


class State:
    """What the test server does next and what it saw."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.log: list[dict] = []
        self.fail_next = 0  # answer this many requests with fail_status first
        self.fail_status = 503
        self.retry_after: str | None = None
        self.drop_next = 0  # drop the connection mid-body this many times
        self.truncate_next = 0  # valid HTTP, but a truncated FITS body
        self.delay_s = 0.0
        self.inflight = 0
        self.max_inflight = 0

    def record(self, handler: BaseHTTPRequestHandler) -> None:
        with self.lock:
            self.log.append(
                {
                    "t": time.time(),
                    "path": handler.path,
                    "method": handler.command,
                    "ua": handler.headers.get("User-Agent", ""),
                    "range": handler.headers.get("Range"),
                    "auth": handler.headers.get("Authorization"),
                }
            )

    def take(self, name: str) -> bool:
        with self.lock:
            if getattr(self, name) > 0:
                setattr(self, name, getattr(self, name) - 1)
                return True
            return False


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: State

    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        st = self.state
        st.record(self)
        if self.command == "POST":
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with st.lock:
            st.inflight += 1
            st.max_inflight = max(st.max_inflight, st.inflight)
        try:
            if st.delay_s:
                time.sleep(st.delay_s)
            path = urlsplit(self.path).path
            query = parse_qs(urlsplit(self.path).query)
            if path != "/range" and st.take("fail_next"):
                headers = {"Retry-After": st.retry_after} if st.retry_after else {}
                self._send(st.fail_status, b"busy", headers)
                return
            if path == "/echo":
                self._send(200, repr(sorted(query.items())).encode(), {"X-Request-Id": "r-1"})
            elif path == "/post":
                self._send(200, body)
            elif path == "/missing":
                self._send(404, b"no such thing")
            elif path == "/fits":
                if st.take("drop_next"):
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(FITS)))
                    self.end_headers()
                    self.wfile.write(FITS[:5000])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if st.take("truncate_next"):
                    self._send(200, FITS[:5760])
                    return
                self._send(200, FITS)
            elif path == "/range":
                self._range()
            elif path == "/trickle":
                self._trickle()
            else:
                self._send(404, b"unknown")
        finally:
            with st.lock:
                st.inflight -= 1

    def _trickle(self) -> None:
        """BIG in 20 slow pieces (Range honoured): a download that can be killed midway."""
        rng = self.headers.get("Range")
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        body = BIG[start:]
        self.send_response(206 if rng else 200)
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(BIG) - 1}/{len(BIG)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        step = len(BIG) // 20
        try:
            for i in range(0, len(body), step):
                self.wfile.write(body[i : i + step])
                self.wfile.flush()
                time.sleep(0 if rng else 0.1)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _range(self) -> None:
        st = self.state
        rng = self.headers.get("Range")
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        body = BIG[start:]
        if st.take("drop_next"):  # send half of what is asked, then hang up
            self.send_response(206 if rng else 200)
            if rng:
                self.send_header("Content-Range", f"bytes {start}-{len(BIG) - 1}/{len(BIG)}")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        if rng:
            self._send(206, body, {"Content-Range": f"bytes {start}-{len(BIG) - 1}/{len(BIG)}"})
        else:
            self._send(200, body)


@pytest.fixture
def server() -> Iterator[tuple[str, State]]:
    state = State()
    handler = type("BoundHandler", (Handler,), {"state": state})
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    srv.daemon_threads = True
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", state
    finally:
        srv.shutdown()
        srv.server_close()


def fast(**kw: object) -> HttpParams:
    """Small delays so retry tests stay fast (knobs, not monkeypatching)."""
    base = {
        "backoff_base_s": 0.01,
        "backoff_max_s": 0.05,
        "rate_limit_per_s": 1000.0,
        "connect_timeout_s": 2.0,
        "read_timeout_s": 2.0,
        "rate_limit_scope": "process",
        "netrc": False,
    }
    base.update(kw)
    return HttpParams(**base)


@pytest.fixture
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        yield s


def test_params_go_as_dict_and_user_agent_has_contact(server, session) -> None:
    url, state = server
    client = HttpClient(fast(contact="ops@example.org"), session=session)
    resp = client.get(url + "/echo", {"POS": "150.0,2.2", "WHERE": "obsjd > 1 AND x = 'a b'"})
    # truth: the server decoded exactly the parameters we passed
    assert resp.text == repr([("POS", ["150.0,2.2"]), ("WHERE", ["obsjd > 1 AND x = 'a b'"])])
    assert resp.attempts == 1
    assert "lakepipe/" in state.log[0]["ua"] and "contact: ops@example.org" in state.log[0]["ua"]


def test_retries_503_then_succeeds(server, session) -> None:
    url, state = server
    state.fail_next = 3
    resp = HttpClient(fast(), session=session).get(url + "/echo")
    assert resp.status == 200
    assert resp.attempts == 4  # truth: 3 failures served, then the answer
    assert len(state.log) == 4


def test_429_retry_after_is_honoured(server, session) -> None:
    url, state = server
    state.fail_next, state.fail_status, state.retry_after = 1, 429, "1"
    client = HttpClient(fast(), session=session)
    resp = client.get(url + "/echo")
    gap = state.log[1]["t"] - state.log[0]["t"]
    assert resp.attempts == 2
    assert gap >= 0.95, f"retried after {gap:.3f}s despite Retry-After: 1"


def test_retry_after_capped_and_http_date() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert parse_retry_after("soon") is None
    client = HttpClient(fast(retry_after_max_s=2.0, jitter=0.0))
    assert client.backoff_s(1, retry_after=3600.0) == 2.0
    # truth: exponential 0.01 * 2^(n-1), capped at backoff_max_s = 0.05
    assert [client.backoff_s(n) for n in (1, 2, 3, 4)] == [0.01, 0.02, 0.04, 0.05]


def test_backoff_jitter_stays_within_bounds() -> None:
    client = HttpClient(fast(jitter=0.5, backoff_base_s=1.0, backoff_max_s=100.0), seed=3)
    delays = np.array([client.backoff_s(3) for _ in range(200)])
    assert delays.min() >= 2.0 and delays.max() <= 4.0  # 4 s minus up to 50 %
    assert delays.std() > 0.2  # jittered, not constant


def test_other_4xx_is_not_retried(server, session) -> None:
    url, state = server
    with pytest.raises(ArchiveError) as err:
        HttpClient(fast(), session=session).get(url + "/missing", {"q": 1})
    e = err.value
    assert (e.status, e.attempts) == (404, 1)
    assert e.url == url + "/missing?q=1"
    assert "no such thing" in str(e) and "attempts=1" in str(e)
    assert len(state.log) == 1


@pytest.mark.parametrize("status", [429, 500, 501, 502, 503, 504, 507, 520, 599])
def test_429_and_every_5xx_are_retried(server, session, status) -> None:
    """Issue 7: retry on 429 and 5xx (any status >= 500, not only 500/502/503/504)."""
    url, state = server
    state.fail_next, state.fail_status = 2, status
    resp = HttpClient(fast(), session=session).get(url + "/echo")
    assert (resp.status, resp.attempts) == (200, 3)  # truth: two failures, then the answer
    assert len(state.log) == 3


@pytest.mark.parametrize("status", [400, 401, 403, 404, 405, 409, 410, 418, 422, 451, 499])
def test_4xx_other_than_429_fails_at_once(server, session, status) -> None:
    url, state = server
    state.fail_next, state.fail_status = 5, status
    with pytest.raises(ArchiveError) as err:
        HttpClient(fast(), session=session).get(url + "/echo")
    assert (err.value.status, err.value.attempts) == (status, 1)
    assert len(state.log) == 1  # truth: the server saw exactly one request


def test_gives_up_with_archive_error(server, session) -> None:
    url, state = server
    state.fail_next = 100
    with pytest.raises(ArchiveError) as err:
        HttpClient(fast(max_retries=2), session=session).get(url + "/echo")
    assert (err.value.status, err.value.attempts) == (503, 3)
    assert err.value.elapsed_s > 0
    assert len(state.log) == 3


def test_connection_refused_is_archive_error(session) -> None:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port = srv.server_address[1]
    srv.server_close()  # nothing listens there any more
    with pytest.raises(ArchiveError) as err:
        HttpClient(fast(max_retries=1), session=session).get(f"http://127.0.0.1:{port}/x")
    assert err.value.attempts == 2 and err.value.status is None
    assert "ConnectionError" in str(err.value)


def test_read_timeout_is_retried_then_fails(server, session) -> None:
    url, state = server
    state.delay_s = 0.5
    params = fast(read_timeout_s=0.1, max_retries=1)
    with pytest.raises(ArchiveError) as err:
        HttpClient(params, session=session).get(url + "/echo")
    assert "Timeout" in str(err.value) and err.value.attempts == 2


def test_dropped_and_truncated_bodies_are_retried(server, session) -> None:
    url, state = server
    state.drop_next, state.truncate_next = 2, 1
    client = HttpClient(fast(), session=session)
    resp = client.get(url + "/fits", check=check_fits)
    assert resp.content == FITS  # truth: the exact bytes served
    assert resp.attempts == 4  # two drops, one truncated FITS, then the file


def test_check_fits_accepts_good_rejects_damaged() -> None:
    check_fits(FITS)
    with pytest.raises(BodyError):
        check_fits(FITS[:5760])  # block-aligned but data cut off
    with pytest.raises(BodyError):
        check_fits(b"\0" * len(FITS))
    bad = bytearray(FITS)
    bad[:6] = b"XIMPLE"
    with pytest.raises(BodyError):
        check_fits(bytes(bad))
    # a CHECKSUM/DATASUM mismatch is detected too
    buf = io.BytesIO()
    fits.PrimaryHDU(np.arange(100, dtype=np.float32).reshape(10, 10)).writeto(buf, checksum=True)
    raw = bytearray(buf.getvalue())
    check_fits(bytes(raw))
    raw[2880 + 8] ^= 0xFF
    with pytest.raises(BodyError):
        check_fits(bytes(raw))


def test_cache_stores_only_good_answers(server, session, tmp_path) -> None:
    url, state = server
    client = HttpClient(fast(cache_dir=str(tmp_path)), session=session)
    state.fail_next = 100
    with pytest.raises(ArchiveError):
        HttpClient(fast(cache_dir=str(tmp_path), max_retries=0), session=session).get(
            url + "/echo", {"a": 1}
        )
    assert not list(tmp_path.rglob("*")) or not list((tmp_path / "responses").rglob("*"))
    state.fail_next = 0
    state.truncate_next = 1
    first = client.get(url + "/fits", check=check_fits)
    assert first.attempts == 2  # the truncated answer was retried, never stored
    n = len(state.log)
    again = client.get(url + "/fits", check=check_fits)
    assert again.from_cache and again.content == FITS and len(state.log) == n
    # different parameters are a different key
    client.get(url + "/echo", {"a": 2})
    assert len(state.log) == n + 1
    assert client.stats.cache_hits == 1


def test_post_multipart_upload(server, session) -> None:
    url, _ = server
    client = HttpClient(fast(), session=session)
    resp = client.post(
        url + "/post",
        {"request": "xmatch"},
        files={"cat1": ("cat1.csv", b"ra,dec\n1,2\n", "text/csv")},
    )
    assert b'name="request"' in resp.content and b"ra,dec\n1,2\n" in resp.content


def test_download_resumes_by_range(server, session, tmp_path) -> None:
    url, state = server
    dest = tmp_path / "big.bin"
    state.drop_next = 2
    client = HttpClient(fast(), session=session)
    out = client.download(url + "/range", dest)
    assert out.read_bytes() == BIG  # truth: byte-identical to the served file
    ranges = [r["range"] for r in state.log]
    # first attempt gets 51200 bytes, the resume asks from there and gets half the rest
    assert ranges == [None, "bytes=51200-", "bytes=76800-"]
    assert client.stats.downloads_resumed == 2
    assert not dest.with_name("big.bin.part").exists()
    client.download(url + "/range", dest)
    assert len(state.log) == 3  # complete file: nothing fetched again


def test_download_resumes_a_part_left_by_a_killed_run(server, session, tmp_path) -> None:
    url, state = server
    dest = tmp_path / "big.bin"
    dest.with_name("big.bin.part").write_bytes(BIG[:30000])  # what a killed run left
    HttpClient(fast(), session=session).download(url + "/range", dest)
    assert dest.read_bytes() == BIG
    assert [r["range"] for r in state.log] == ["bytes=30000-"]


def test_download_checks_format_and_leaves_no_partial(server, session, tmp_path) -> None:
    url, state = server
    state.truncate_next = 100
    dest = tmp_path / "img.fits"
    with pytest.raises(ArchiveError) as err:
        HttpClient(fast(max_retries=1), session=session).download(
            url + "/fits", dest, check=check_fits
        )
    assert "FITS" in str(err.value)
    assert not dest.exists() and not dest.with_name("img.fits.part").exists()


def _parallel(client: HttpClient, url: str, n: int) -> None:
    threads = [threading.Thread(target=client.get, args=(url, {"i": i})) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_rate_limit_spacing(server, session) -> None:
    url, state = server
    client = HttpClient(fast(rate_limit_per_s=20.0, max_concurrency_per_host=8), session=session)
    _parallel(client, url + "/echo", 12)
    times = np.sort([r["t"] for r in state.log])
    assert len(times) == 12
    # truth: GCRA with burst 1 reserves slots 1/rate = 50 ms apart, so 12 requests span
    # 550 ms; arrivals at the server jitter with thread scheduling (tens of ms on a busy
    # machine), so windows get 60 ms of slack. Without the limiter all 12 arrive within
    # a few ms.
    assert times[-1] - times[0] >= 0.55 - 0.06
    for k in range(3, 12):
        span = (times[k:] - times[:-k]).min()
        assert span >= k * 0.05 - 0.06, (k, span)


def test_machine_wide_rate_limit_shared_between_limiters(tmp_path) -> None:
    state = tmp_path / "host.rate"
    a, b = RateLimiter(10.0, 1, state), RateLimiter(10.0, 1, state)
    t0 = time.time()
    for limiter in (a, b, a, b, a):
        limiter.acquire()
    # truth: five reservations from one shared bucket at 10/s take >= 4 intervals
    assert time.time() - t0 >= 0.39


def test_concurrency_cap(server, session) -> None:
    url, state = server
    state.delay_s = 0.1
    params = fast(max_concurrency_per_host=2, rate_limit_scope="machine")
    _parallel(HttpClient(params, session=session), url + "/echo", 6)
    assert len(state.log) == 6
    assert state.max_inflight == 2


def test_credentials_from_env_and_netrc_never_logged(
    server, session, tmp_path, monkeypatch, caplog
) -> None:
    url, state = server
    monkeypatch.setenv("LPTEST_USER", "alice")
    monkeypatch.setenv("LPTEST_PASSWORD", "s3cret-pw")
    with caplog.at_level(logging.DEBUG, logger="lakepipe.archives.http"):
        HttpClient(fast(), session=session, credentials_env="LPTEST", credentials_url=url).get(
            url + "/echo"
        )
    assert state.log[0]["auth"] == "Basic YWxpY2U6czNjcmV0LXB3"  # base64("alice:s3cret-pw")
    assert "s3cret-pw" not in caplog.text and "alice" not in caplog.text
    assert "request-id r-1" in caplog.text and "bytes" in caplog.text

    monkeypatch.delenv("LPTEST_USER")
    rc = tmp_path / "netrc"
    rc.write_text("machine 127.0.0.1 login bob password hunter2\n")
    rc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(rc))
    params = fast(netrc=True)
    HttpClient(params, session=session, credentials_env="LPTEST", credentials_url=url).get(
        url + "/echo"
    )
    assert state.log[1]["auth"] == "Basic Ym9iOmh1bnRlcjI="  # base64("bob:hunter2")


def _netrc(tmp_path, monkeypatch, host: str) -> None:
    rc = tmp_path / "netrc"
    rc.write_text(f"machine {host} login bob password hunter2\n")
    rc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(rc))


def test_netrc_false_sends_no_login(server, session, tmp_path, monkeypatch) -> None:
    """``netrc: false`` must also stop requests' own netrc lookup (session.trust_env)."""
    url, state = server
    _netrc(tmp_path, monkeypatch, "127.0.0.1")
    HttpClient(fast(netrc=False), session=session).get(url + "/echo")
    HttpClient(fast(netrc=True), session=session).get(url + "/echo")
    assert [e["auth"] for e in state.log] == [None, "Basic Ym9iOmh1bnRlcjI="]


def test_env_login_goes_only_to_its_origin(server, session, monkeypatch) -> None:
    url, state = server
    monkeypatch.setenv("LPTEST_USER", "alice")
    monkeypatch.setenv("LPTEST_PASSWORD", "s3cret-pw")
    client = HttpClient(fast(), session=session, credentials_env="LPTEST", credentials_url=url)
    client.get(url + "/echo")
    client.get(url.replace("127.0.0.1", "localhost") + "/echo")  # same server, other host
    assert [e["auth"] for e in state.log] == ["Basic YWxpY2U6czNjcmV0LXB3", None]
    with pytest.raises(ValueError, match="credentials_url"):
        HttpClient(fast(), credentials_env="LPTEST")


def test_no_basic_auth_over_plain_http_off_loopback(session, tmp_path, monkeypatch) -> None:
    _netrc(tmp_path, monkeypatch, "irsa.example.invalid")
    client = HttpClient(fast(netrc=True, max_retries=0), session=session)
    with pytest.raises(ArchiveError, match="refusing to send a login over plain http") as err:
        client.get("http://irsa.example.invalid/x")
    assert "hunter2" not in str(err.value) and err.value.attempts == 0


def test_login_inside_url_is_refused(server, session, tmp_path) -> None:
    url, state = server
    bad = url.replace("http://", "http://eve:pw-in-url@") + "/echo"
    client = HttpClient(fast(), session=session)
    for call in (lambda: client.get(bad), lambda: client.download(bad, tmp_path / "x")):
        with pytest.raises(ArchiveError, match="must not carry a login") as err:
            call()
        assert "pw-in-url" not in str(err.value)
    assert state.log == [] and list(tmp_path.iterdir()) == []  # truth: nothing reached the server


def test_proxies_from_environment_still_apply(server, session, monkeypatch) -> None:
    """trust_env is off (netrc), but $http_proxy is still honoured."""
    url, state = server
    for name in ("no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("http_proxy", url)
    resp = HttpClient(fast(), session=session).get("http://archive.example.invalid/echo")
    assert resp.status == 200
    # truth: the request reached our server as a proxy, in absolute form
    assert state.log[0]["path"] == "http://archive.example.invalid/echo"


def test_redact_strips_userinfo() -> None:
    assert redact("https://u:p@irsa.example:8443/a?b=1") == "https://irsa.example:8443/a?b=1"
    assert redact("http://h/x") == "http://h/x"


def test_fetch_uses_download_cache(server, session, tmp_path) -> None:
    url, state = server
    client = HttpClient(fast(cache_dir=str(tmp_path)), session=session)
    a = client.fetch(url + "/fits", {"center": "1,2"}, check=check_fits)
    b = client.fetch(url + "/fits", {"center": "1,2"}, check=check_fits)
    assert a == b == FITS and len(state.log) == 1
    assert isinstance(next((tmp_path / "files").rglob("*")), Path)


def test_concurrent_downloads_of_one_file_fetch_once(server, session, tmp_path) -> None:
    url, state = server
    state.delay_s = 0.05
    client = HttpClient(fast(), session=session)
    dest = tmp_path / "one.bin"
    threads = [
        threading.Thread(target=client.download, args=(url + "/range", dest)) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert dest.read_bytes() == BIG and len(state.log) == 1  # one fetch, three waited


def test_sigkilled_download_resumes_by_range(server, tmp_path) -> None:
    """Issue 7 item 6: a process killed mid-download leaves a .part the next run resumes."""
    import os
    import signal
    import subprocess
    import sys

    url, state = server
    dest = tmp_path / "big.bin"
    part = dest.with_name("big.bin.part")
    code = (
        "from lakepipe.archives.http import HttpClient, HttpParams\n"
        "p = HttpParams(rate_limit_scope='process', netrc=False)\n"
        f"HttpClient(p).download({url + '/trickle'!r}, {str(dest)!r})\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.time() + 30
        while time.time() < deadline and (not part.exists() or part.stat().st_size < 20000):
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    have = part.stat().st_size
    assert 0 < have < len(BIG) and not dest.exists()  # killed midway
    client = HttpClient(fast(), session=requests.Session())
    client.download(url + "/trickle", dest)
    assert dest.read_bytes() == BIG  # truth: byte-identical after the resume
    assert state.log[-1]["range"] == f"bytes={have}-"  # only the missing tail was asked
    client.download(url + "/trickle", dest)
    assert len(state.log) == 2  # complete: nothing fetched again


def test_downloaded_bytes_are_counted(server, session, tmp_path) -> None:
    url, state = server
    state.drop_next = 1  # first answer: half the body, then the connection drops
    client = HttpClient(fast(), session=session)
    client.download(url + "/range", tmp_path / "big.bin")
    # truth: half of BIG on the dropped attempt, the other half on the Range resume
    assert client.stats.bytes == len(BIG) and client.stats.downloads_resumed == 1
    assert (tmp_path / "big.bin").read_bytes() == BIG


# -- circuit breaker: a down host fails fast ------------------------------------------------


def _outcomes(client: HttpClient, url: str, n: int) -> list[str]:
    """For ``n`` GETs: "ok", "failed" (retries used up) or "fast" (not sent: host down)."""
    out = []
    for _ in range(n):
        try:
            client.get(url, cache=False)
            out.append("ok")
        except ArchiveError as exc:
            out.append("fast" if "appears down" in str(exc) else "failed")
    return out


def test_breaker_fails_fast_on_a_down_host_then_lets_a_trial_through(server, session) -> None:
    url, state = server
    state.fail_next = 10_000  # the archive answers 503 to everything
    client = HttpClient(
        fast(max_retries=1, breaker_after=2, breaker_cooldown_s=0.5), session=session
    )
    # truth: two requests use up their 2 attempts each; the other 8 are never sent
    assert _outcomes(client, url + "/echo", 10) == ["failed"] * 2 + ["fast"] * 8
    assert len(state.log) == 4 and client.stats.failed_fast == 8
    with pytest.raises(ArchiveError) as err:
        client.get(url + "/echo", {"q": 1})
    msg = str(err.value)
    assert f"the archive at 127.0.0.1:{url.rsplit(':', 1)[1]} appears down" in msg
    assert "2 consecutive requests failed after all their retries" in msg
    assert "HTTP 503" in msg and " UTC, " in msg and f"url={url}/echo?q=1" in msg
    assert "Rerun later: committed partitions are kept" in msg
    assert err.value.attempts == 0 and err.value.status is None  # nothing was sent
    # cool-down over, archive still down: one trial (2 attempts) fails and reopens
    time.sleep(0.55)
    assert _outcomes(client, url + "/echo", 3) == ["failed", "fast", "fast"]
    assert len(state.log) == 6
    # the archive comes back: after the cool-down the trial succeeds and closes it
    state.fail_next = 0
    time.sleep(0.55)
    assert _outcomes(client, url + "/echo", 3) == ["ok"] * 3
    assert len(state.log) == 9


def test_breaker_counts_only_consecutive_down_failures(server, session) -> None:
    url, state = server
    client = HttpClient(fast(max_retries=0, breaker_after=2), session=session)
    for _ in range(3):  # a 503 failure, then a 404 (the host answered) resets the count
        state.fail_next = 1
        assert _outcomes(client, url + "/echo", 1) == ["failed"]
        assert _outcomes(client, url + "/missing", 1) == ["failed"]
    state.fail_next, state.fail_status = 10, 429  # busy, not down: never opens
    assert _outcomes(client, url + "/echo", 4) == ["failed"] * 4
    assert len(state.log) == 10 and client.stats.failed_fast == 0


def test_breaker_counts_connection_errors_and_can_be_disabled(session) -> None:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port = srv.server_address[1]
    srv.server_close()  # nothing listens there any more
    url = f"http://127.0.0.1:{port}/x"
    on = HttpClient(fast(max_retries=0, breaker_after=3), session=session)
    assert _outcomes(on, url, 5) == ["failed"] * 3 + ["fast"] * 2
    assert on.stats.requests == 3
    off = HttpClient(fast(max_retries=0, breaker_after=0), session=session)
    assert _outcomes(off, url, 5) == ["failed"] * 5
    assert off.stats.requests == 5
