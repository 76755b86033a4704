"""Hardening (issue 16), tried as an attacker and as a careless user would: real HTTP on loopback
against ``xreal-engine serve`` subprocesses (a tiny random model), and the real CLI.

- Security: requests from web pages (Origin, Sec-Fetch-Site, simple request shapes), DNS
  rebinding (Host), the token (made up on loopback, never needed on the command line).
- Nothing lost: an unwritable database (``chattr +i``), a full disk (a small tmpfs), a deleted
  data directory, SIGTERM, start-up on an unwritable data directory.
- Input refused cleanly: one line and exit 2 on the CLI with nothing written; 4xx JSON over HTTP;
  control characters escaped and echoes shortened; headers checked before pixels (peak RSS).

The storage tests need root powers that work for root (``chattr``, ``mount -t tmpfs``, bind
mounts); where the sandbox has none of them they skip and say why. Every wait below is a
bounded poll for a state, never a timing window.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from test_server_service import anatomy_array, multipart, png_bytes, raw_request, region_array, tiny_model  # noqa: F401
from test_server_service import start_engine as start_serve
from xreal_engine.client import EngineClient, EngineError, read_token_file

START_TIMEOUT = 180.0
JOB_TIMEOUT = 300.0


# ----------------------------------------------------------------------------- inputs


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(side: int = 20000) -> bytes:
    """A real, decodable grey PNG of side x side zeros (~400 MB of pixels) in a few hundred KB."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (side + 1)
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")


def nifti_with_nan(size: int) -> bytes:
    """A float32 NIfTI-1 label map (written by hand: SimpleITK would read its NaN back as 0)."""
    labels = anatomy_array(size).astype(np.float32)
    labels[size // 2, size // 2] = np.nan
    header = bytearray(348)
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, 2, size, size, 1, 1, 1, 1, 1)
    struct.pack_into("<hh", header, 70, 16, 32)  # datatype FLOAT32, bitpix
    struct.pack_into("<8f", header, 76, 1, 1, 1, 1, 1, 1, 1, 1)  # pixdim
    struct.pack_into("<f", header, 108, 352.0)  # vox_offset
    struct.pack_into("<f", header, 112, 1.0)  # scl_slope
    header[344:348] = b"n+1\x00"
    return bytes(header) + bytes(4) + labels.tobytes()


def gzip_volume_nrrd(width: int = 3000, height: int = 3000, depth: int = 50) -> bytes:
    """A gzip NRRD whose 450 MB of voxels compress to well under a megabyte."""
    compressed = io.BytesIO()
    with gzip.GzipFile(fileobj=compressed, mode="wb", compresslevel=9) as out:
        zeros = bytes(width * height)
        for _ in range(depth):
            out.write(zeros)
    return (f"NRRD0004\ntype: uchar\ndimension: 3\nsizes: {width} {height} {depth}\nencoding: gzip\n\n".encode()
            + compressed.getvalue())


def corrupt_dicom() -> bytes:
    """A DICOM preamble and magic followed by garbage: a damaged file, not a non-image."""
    return bytes(128) + b"DICM" + b"\x02\x00\x10\x00UI\xff\xffgarbage" * 10


# ----------------------------------------------------------------------------- engines


@dataclass
class Engine:
    process: subprocess.Popen
    url: str
    port: int
    token: str | None
    data_dir: Path
    home: Path
    log_path: Path

    def client(self, **kwargs) -> EngineClient:
        return EngineClient(self.url, token=self.token, timeout=60, **kwargs)

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                token: bool = True, send_body: bool = True) -> tuple[int, dict, bytes]:
        return http_request(self.port, method, path, body, headers, self.token if token else None, send_body)

    def memory(self, field: str) -> int:
        """VmRSS (now) or VmHWM (peak) of the engine process, in bytes."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise AssertionError(f"no {field}")

    def reset_peak(self) -> int:
        """Start measuring the peak from now (clear_refs 5 resets VmHWM); returns the resident memory now."""
        with contextlib.suppress(OSError):  # without it the peak since start-up is the base: a weaker test
            Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")
        return self.memory("VmRSS")

    def peak_growth(self, base: int) -> int:
        return self.memory("VmHWM") - base

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def token_file(home: Path, port: int) -> Path:
    return home / ".config" / "xreal-engine" / "tokens" / f"engine-{port}.token"


def engine_env(home: Path, **extra: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HOME=str(home), **extra)
    if "XREAL_ENGINE_TOKEN" not in extra:
        env.pop("XREAL_ENGINE_TOKEN", None)
    return env


def start_engine(model_dir: Path, data_dir: Path, home: Path, *extra: str, env: dict | None = None) -> Engine:
    """``serve --port 0`` in its own HOME; the token is the one it made up (or None if it was given one)."""
    home.mkdir(parents=True, exist_ok=True)
    log_path = home / f"engine-{uuid.uuid4().hex[:8]}.log"  # never on a disk a test fills
    process, url = start_serve(model_dir, data_dir, *extra, env=env or engine_env(home), log_path=log_path)
    port = int(url.rsplit(":", 1)[1])
    path = token_file(home, port)
    token = read_token_file(path) if path.exists() else None
    return Engine(process, url, port, token, data_dir, home, log_path)


@contextlib.contextmanager
def running(engine: Engine):
    """The engine for the ``with`` block; killed (if still running) after it."""
    try:
        yield engine
    finally:
        stop_engine(engine)


def stop_engine(engine: Engine) -> None:
    if engine.process.poll() is None:
        engine.process.kill()
        engine.process.wait(timeout=30)
    engine.process.stdout.close()


def wait_ready(client: EngineClient) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while client.health()["model"] != "ready":
        assert time.monotonic() < deadline, "the model did not load"
        time.sleep(0.2)


def wait_for(condition, what: str, timeout: float = JOB_TIMEOUT, interval: float = 0.2):
    """Poll ``condition()`` until it returns something true (a bound, not a timing window)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)


def http_request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                 token: str | None = None, send_body: bool = True) -> tuple[int, dict, bytes]:
    """One raw request; ``headers`` may override Host. Header names in the answer are lower case."""
    status, answer_headers, answer = raw_request(f"http://127.0.0.1:{port}", method, path, body,
                                                 {"Host": f"127.0.0.1:{port}", **(headers or {})}, token, send_body)
    return status, {key.lower(): value for key, value in answer_headers.items()}, answer


def error_of(status: int, body: bytes, expected_status: int, code: str | None = None) -> dict:
    """The JSON error of a refusal, checked: status, code, no traceback."""
    text = body.decode("utf-8", "replace")
    assert status == expected_status, (status, text[:500])
    error = json.loads(text)["error"]
    assert error["message"] and "Traceback" not in text, error
    if code is not None:
        assert error["code"] == code, error
    return error


def job_count(engine: Engine) -> int:
    return len(engine.client().jobs(limit=1000))


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def size(tiny_model) -> int:
    from xreal_engine.model.info import ModelInfo

    return ModelInfo.load(tiny_model).image_size


@pytest.fixture(scope="module")
def files(size, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("inputs")
    paths = {"anatomy": folder / "anatomy.png", "region": folder / "region.png"}
    paths["anatomy"].write_bytes(png_bytes(anatomy_array(size)))
    paths["region"].write_bytes(png_bytes(region_array(size)))
    return paths


@pytest.fixture(scope="module")
def engine(tiny_model, tmp_path_factory):
    """A loopback engine as the README starts it: no token given, so it makes one up."""
    root = tmp_path_factory.mktemp("engine")
    with running(start_engine(tiny_model, root / "data", root / "home", "--max-upload-bytes", "4000000")) \
            as engine:
        wait_ready(engine.client())
        yield engine


@pytest.fixture(scope="module")
def open_server(tiny_model, tmp_path_factory):
    """The app without a token (only create_app can do that), served by uvicorn on loopback in this process.

    The one way to see the request-shape rule on its own; it also allows one origin and one host name.
    """
    import uvicorn

    from xreal_engine.service.app import create_app
    from xreal_engine.service.settings import ServiceSettings

    settings = ServiceSettings(model=str(tiny_model), device="cpu", data_dir=tmp_path_factory.mktemp("open") / "data",
                               token=None, allowed_hosts=("xreal.test",),
                               allowed_origins=("https://Viewer.Example/",))  # as a user may type it
    app = create_app(settings)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, log_level="warning"))
    app.state.request_shutdown = lambda: setattr(server, "should_exit", True)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    port = sock.getsockname()[1]
    try:
        wait_for(lambda: server.started, "the in-process server", START_TIMEOUT)
        client = EngineClient(f"http://127.0.0.1:{port}", token=None, timeout=60)
        wait_ready(client)
        yield {"port": port, "client": client}
    finally:
        server.should_exit = True
        thread.join(60)


def can_chattr(folder: Path) -> str | None:
    """None if ``chattr +i`` stops root here, else why not."""
    probe = folder / "chattr-probe"
    probe.write_bytes(b"x")
    try:
        if subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode != 0:
            return "chattr +i is not supported on this file system"
        try:
            with open(probe, "ab") as handle:
                handle.write(b"y")
            return "chattr +i does not stop root here"
        except OSError:
            return None
    except FileNotFoundError:
        return "chattr is not installed"
    finally:
        subprocess.run(["chattr", "-i", str(probe)], capture_output=True)
        probe.unlink(missing_ok=True)


@contextlib.contextmanager
def immutable(*paths: Path):
    """Make files immutable for real (``chattr +i``, which stops root too); undone on exit."""
    subprocess.run(["chattr", "+i", *map(str, paths)], check=True)
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", *map(str, paths)], check=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MiB tmpfs at tmp_path/disk: a disk that really fills up (skips where mount is not allowed)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill a disk for real: {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def fill(disk: Path, leave_bytes: int) -> Path:
    """Fill ``disk`` until about ``leave_bytes`` are free (0: completely)."""
    filler = disk / "filler"
    with open(filler, "ab", buffering=0) as out:
        while (free := shutil.disk_usage(disk).free) > leave_bytes:
            try:
                out.write(bytes(min(free - leave_bytes, 1 << 20) or 4096))
                out.flush()
            except OSError:
                break
    return filler


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder on a read-only bind mount (skips where mount is not allowed)."""
    source, target = tmp_path / "ro-source", tmp_path / "ro"
    source.mkdir()
    target.mkdir()
    bind = subprocess.run(["mount", "--bind", str(source), str(target)], capture_output=True, text=True)
    if bind.returncode != 0:
        pytest.skip(f"cannot make a read-only bind mount: {bind.stderr.strip()}")
    try:
        remount = subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], capture_output=True, text=True)
        if remount.returncode != 0:
            pytest.skip(f"cannot remount read-only: {remount.stderr.strip()}")
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def run_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xreal_engine.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env or dict(os.environ, OMP_NUM_THREADS="1"))


def assert_one_line_refusal(result: subprocess.CompletedProcess, command: str, *needles: str,
                            after_progress: bool = False) -> str:
    """Exit 2 and one error line; ``after_progress``: the work had begun, so progress lines may come first."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    errors = [line for line in lines if line.startswith(f"xreal-engine {command}: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr[-3000:]
    lines = lines if not after_progress else errors
    assert len(lines) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "\x1b" not in result.stderr and "\x07" not in result.stderr
    for needle in needles:
        assert needle.lower() in lines[0].lower(), (needle, lines[0])
    return lines[0]


# ============================================================================= 1. cross-site requests


@pytest.mark.slow
def test_requests_from_web_pages_are_refused_even_with_the_token(engine, files):
    """A page's simple requests (text/plain, multipart forms) carry an Origin: refused before anything runs."""
    before = job_count(engine)
    body, content_type = multipart([("steps", "1")], [("anatomy", "a.png", "image/png", files["anatomy"].read_bytes())])
    attempts = [
        ("POST", "/api/v1/jobs", body, {"Content-Type": content_type, "Origin": "https://evil.example"}),
        ("POST", "/api/v1/shutdown", b"x=1", {"Content-Type": "text/plain", "Origin": "https://evil.example"}),
        ("POST", "/api/v1/shutdown", b"", {"Content-Type": "multipart/form-data; boundary=x", "Origin": "null"}),
        ("POST", "/api/v1/shutdown", b"", {"Sec-Fetch-Site": "cross-site"}),  # a browser that left Origin out
        ("GET", "/api/v1/jobs", None, {"Sec-Fetch-Site": "same-site"}),  # another port of the same host
        ("GET", "/api/v1/health", None, {"Origin": f"http://127.0.0.1:{engine.port + 1}"}),
        ("OPTIONS", "/api/v1/jobs", None, {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}),
    ]
    for with_token in (False, True):
        for method, path, payload, headers in attempts:
            status, answer_headers, answer = engine.request(method, path, payload, headers, token=with_token)
            error_of(status, answer, 403, "cross_origin_refused")
            assert "access-control-allow-origin" not in answer_headers
    assert engine.process.poll() is None, "a cross-site shutdown must not stop the engine"
    assert job_count(engine) == before
    # the engine's own pages (/docs) are same-origin; a user typing the URL sends no Origin at all
    status, _, _ = engine.request("GET", "/api/v1/health", headers={"Origin": engine.url, "Sec-Fetch-Site": "same-origin"})
    assert status == 200
    status, _, _ = engine.request("GET", "/docs", token=False, headers={"Sec-Fetch-Site": "none"})
    assert status == 200


@pytest.mark.slow
def test_state_changing_requests_need_a_shape_no_page_can_send(open_server, files):
    """Without a token (possible only in-process), a plain form POST is refused; the client's header passes."""
    port = open_server["port"]
    body, content_type = multipart([("steps", "1")], [("anatomy", "a.png", "image/png", files["anatomy"].read_bytes())])
    job_id = uuid.uuid4().hex
    for method, path, payload, headers in [
        ("POST", "/api/v1/jobs", body, {"Content-Type": content_type}),
        ("POST", "/api/v1/shutdown", b"go", {"Content-Type": "text/plain"}),
        ("POST", "/api/v1/shutdown", b"a=b", {"Content-Type": "application/x-www-form-urlencoded"}),
        ("POST", f"/api/v1/jobs/{job_id}/cancel", None, {}),
        ("DELETE", f"/api/v1/jobs/{job_id}", None, {}),
    ]:
        status, _, answer = http_request(port, method, path, payload, headers)
        error_of(status, answer, 403, "client_header_required")
    assert open_server["client"].jobs() == []
    # the client's header, or a JSON body, is a request a page cannot send without a (never granted) preflight
    status, _, answer = http_request(port, "POST", "/api/v1/jobs", body, {"Content-Type": content_type,
                                                                          "X-XReal-Client": "1"})
    assert status == 202, answer[:300]
    accepted = json.loads(answer)["id"]
    status, _, answer = http_request(port, "POST", f"/api/v1/jobs/{job_id}/push", b'{"destination": "x"}',
                                     {"Content-Type": "application/json"})
    error_of(status, answer, 404, "job_not_found")
    job = open_server["client"].wait(accepted, poll_interval=0.2, timeout=JOB_TIMEOUT)
    assert job["state"] == "succeeded", job


@pytest.mark.slow
def test_an_allowed_origin_gets_cors_and_others_do_not(open_server):
    port = open_server["port"]
    preflight = {"Origin": "https://viewer.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "x-xreal-client"}
    status, headers, _ = http_request(port, "OPTIONS", "/api/v1/jobs", None, preflight)
    assert status == 200 and headers.get("access-control-allow-origin") == "https://viewer.example"
    status, headers, _ = http_request(port, "GET", "/api/v1/info", None, {"Origin": "https://viewer.example"})
    assert status == 200 and headers.get("access-control-allow-origin") == "https://viewer.example"
    for other in ("https://viewer.example.evil", "https://viewer.example/", "http://viewer.example"):
        # what a browser never sends as this origin is refused by the guard, as JSON (CORS sees only the rest)
        status, headers, answer = http_request(port, "OPTIONS", "/api/v1/jobs", None, {**preflight, "Origin": other})
        error_of(status, answer, 403, "cross_origin_refused")


# ============================================================================= 2. DNS rebinding


@pytest.mark.slow
def test_a_missing_and_a_wrong_token_are_told_apart(engine):
    status, _, answer = engine.request("GET", "/api/v1/jobs", token=False)
    assert "requires an access token" in error_of(status, answer, 401, "unauthorized")["message"]
    status, _, answer = engine.request("GET", "/api/v1/jobs", token=False,
                                       headers={"Authorization": "Bearer not-the-token-0123"})
    assert "The access token sent is not this engine's" in error_of(status, answer, 401, "unauthorized")["message"]


@pytest.mark.slow
def test_a_request_path_cannot_write_escape_sequences_or_forged_lines_into_the_log(engine):
    forged = "/api/v1/jobs/x%0a2026-12-04%2000:00:00%20INFO%20job%20deadbeef%20succeeded%1b%5b2J"
    status, _, answer = engine.request("GET", forged)
    assert status in (400, 404), answer[:200]
    deadline = time.monotonic() + 60
    while "refused GET /api/v1/jobs/x" not in engine.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    logged = [line for line in engine.log().splitlines() if "refused GET /api/v1/jobs/x" in line]
    assert logged and "\x1b" not in engine.log() and "\\x1b" in logged[0], logged
    assert all("job deadbeef succeeded" not in line or "refused" in line for line in engine.log().splitlines())


@pytest.mark.slow
def test_host_names_other_than_the_bound_address_are_refused(engine, open_server):
    for host in ("attacker.example", f"attacker.example:{engine.port}", "127.0.0.1.nip.io", "", "[::1"):
        for path in ("/api/v1/jobs", "/api/v1/health", "/docs", f"/api/v1/jobs/{uuid.uuid4().hex}/result.zip"):
            status, _, answer = engine.request("GET", path, headers={"Host": host})
            error_of(status, answer, 400, "host_not_allowed")
    for host in (f"127.0.0.1:{engine.port}", f"localhost:{engine.port}", f"[::1]:{engine.port}", "LOCALHOST"):
        status, _, answer = engine.request("GET", "/api/v1/jobs", headers={"Host": host})
        assert status == 200, (host, answer[:200])
    # --allow-host adds a name
    status, _, _ = http_request(open_server["port"], "GET", "/api/v1/health", headers={"Host": "xreal.test:1234"})
    assert status == 200


# ============================================================================= 3. the token


@pytest.mark.slow
def test_a_loopback_engine_makes_up_a_token_that_only_local_clients_find(engine, files, tmp_path, monkeypatch):
    path = token_file(engine.home, engine.port)
    assert engine.token and len(engine.token) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert str(path) in engine.log(), "serve says where the token is"
    assert engine.token not in engine.log(), "the token itself is never printed"
    status, headers, answer = engine.request("GET", "/api/v1/jobs", token=False)
    error_of(status, answer, 401, "unauthorized")
    # the same user's client finds it (EngineClient without a token, and the submit command)
    monkeypatch.setenv("HOME", str(engine.home))
    assert EngineClient(engine.url).info()["model_state"] == "ready"
    out_dir = tmp_path / "submitted"
    result = run_cli("submit", "--url", engine.url, "--anatomy", str(files["anatomy"]), "--steps", "1",
                     "--out", str(out_dir), env=engine_env(engine.home))
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out_dir / "sc.dcm").is_file()
    # another user (another HOME) has no token file: refused
    other = run_cli("submit", "--url", engine.url, "--anatomy", str(files["anatomy"]), "--steps", "1",
                    "--out", str(tmp_path / "other"), env=engine_env(tmp_path / "other-home"))
    assert_one_line_refusal(other, "submit", "token")
    assert not (tmp_path / "other").exists()


@pytest.mark.slow
def test_a_token_on_the_command_line_warns_the_file_and_environment_do_not_and_sigterm_exits_0(tiny_model, tmp_path):
    token = "a-token-from-a-file-0123456789"
    secret = tmp_path / "token.txt"
    secret.write_text(token + "\n")
    secret.chmod(0o600)
    ways = [("--token", ("--token", token), {}), ("--token-file", ("--token-file", str(secret)), {}),
            ("environment", (), {"XREAL_ENGINE_TOKEN": token})]
    for name, extra, environment in ways:
        home = tmp_path / f"home-{name}"
        with running(start_engine(tiny_model, tmp_path / f"data-{name}", home, *extra,
                                  env=engine_env(home, **environment))) as engine:
            assert engine.token is None, "an explicit token leaves no token file"
            assert not token_file(home, engine.port).exists()
            engine.token = token
            assert engine.client().info()["engine"] == "xreal-engine"
            warned = "process list" in engine.log() and "XREAL_ENGINE_TOKEN" in engine.log()
            assert warned == (name == "--token"), (name, engine.log()[-1500:])
            engine.process.send_signal(signal.SIGTERM)
            assert engine.process.wait(timeout=120) == 0, engine.log()[-2000:]
    # the made-up token's file goes with a graceful stop
    home = tmp_path / "home-generated"
    with running(start_engine(tiny_model, tmp_path / "data-generated", home)) as engine:
        assert token_file(home, engine.port).exists()
        engine.process.send_signal(signal.SIGTERM)
        assert engine.process.wait(timeout=120) == 0, engine.log()[-2000:]
        assert not token_file(home, engine.port).exists()
        assert "Traceback" not in engine.log()


# ============================================================================= 4. the worker cannot die


@pytest.mark.slow
def test_an_unwritable_database_stops_work_reports_unhealthy_and_loses_nothing(tiny_model, files, tmp_path):
    reason = can_chattr(tmp_path)
    if reason:
        pytest.skip(f"no way to make the database unwritable for root: {reason}")
    with running(start_engine(tiny_model, tmp_path / "data", tmp_path / "home")) as engine:
        client = engine.client()
        wait_ready(client)
        long_job = client.submit(files["anatomy"], [(files["region"], "cardiomegaly")], steps=1000)
        wait_for(lambda: client.status(long_job["id"])["state"] == "running", "the long job to start")
        queued = client.submit(files["anatomy"], [], steps=1)
        database = engine.data_dir / "jobs.sqlite3"
        with immutable(database, database.with_name("jobs.sqlite3-wal")):
            status, _, answer = engine.request("GET", "/api/v1/health", token=False)
            health = json.loads(answer)
            assert status == 503 and health["status"] == "unhealthy" and health["storage_error"], health
            assert "Traceback" not in answer.decode() and str(engine.data_dir) not in answer.decode()
            with pytest.raises(EngineError) as refused:
                client.submit(files["anatomy"], [], steps=1)
            assert refused.value.status == 503 and refused.value.code == "storage_unavailable", refused.value
            assert list((engine.data_dir / "incoming").iterdir()) == []
            # the running job ends (cancelled) while its final state cannot be written; nothing else starts
            client.cancel(long_job["id"])
            wait_for(lambda: "cannot record it" in engine.log(), "the worker to meet the unwritable store")
            assert client.status(queued["id"])["state"] == "queued"
            assert engine.process.poll() is None
        # write access is back: the refused final state is recorded, the queue runs, health recovers
        assert client.wait(long_job["id"], poll_interval=0.2, timeout=JOB_TIMEOUT)["state"] == "cancelled"
        assert client.wait(queued["id"], poll_interval=0.2, timeout=JOB_TIMEOUT)["state"] == "succeeded"
        assert client.health()["status"] == "ok"
        assert client.wait(client.submit(files["anatomy"], [], steps=1)["id"], poll_interval=0.2,
                           timeout=JOB_TIMEOUT)["state"] == "succeeded"
        assert "Traceback" not in engine.log()


# ============================================================================= 5. incomplete requests


@pytest.mark.slow
def test_an_incomplete_or_unknown_form_is_refused_never_run_with_defaults(engine, files, size):
    before = job_count(engine)
    fields = [("finding", "cardiomegaly"), ("steps", "3"), ("seed", "77")]
    uploads = [("anatomy", "anatomy.png", "image/png", files["anatomy"].read_bytes()),
               ("pathology", "region.png", "image/png", files["region"].read_bytes())]
    body, content_type = multipart(fields, uploads)
    # cut at a part boundary (every part before it complete) and anywhere else, Content-Length matching
    boundary_cuts = [body.index(b"--" + content_type.split("=")[1].encode(), 200), len(body) - 10, len(body) // 2]
    for cut in boundary_cuts:
        status, _, answer = engine.request("POST", "/api/v1/jobs", body[:cut], {"Content-Type": content_type})
        assert status == 400, (cut, answer[:300])
        assert json.loads(answer)["error"]["code"] in ("incomplete_body", "http_error"), answer
    # a misspelt setting is refused, not replaced by the model's default
    misspelt, content_type = multipart([("finding", "cardiomegaly"), ("step", "3")], uploads)
    error = error_of(*engine.request("POST", "/api/v1/jobs", misspelt, {"Content-Type": content_type})[::2], 400,
                     "unknown_field")
    assert "'step'" in error["message"]
    assert job_count(engine) == before
    assert list((engine.data_dir / "incoming").iterdir()) == []


@pytest.mark.slow
def test_a_single_valued_job_field_sent_twice_is_refused_and_lists_repeat(open_server, files):
    """FastAPI takes the last of two 'steps' silently (steps=5 and steps=7 ran 7 steps): a 400 naming the field;
    pathology / finding (and control / control_file) are lists and repeat."""
    port, client = open_server["port"], open_server["client"]
    anatomy = ("anatomy", "anatomy.png", "image/png", files["anatomy"].read_bytes())
    region = ("pathology", "region.png", "image/png", files["region"].read_bytes())
    headers = {"X-XReal-Client": "1"}
    before = job_count_of(client)
    for fields, uploads, name in (([("steps", "5"), ("steps", "7")], [anatomy], "steps"),
                                  ([("seed", "1")], [anatomy, anatomy], "anatomy"),
                                  ([("request_id", "a"), ("request_id", "b")], [anatomy], "request_id")):
        body, content_type = multipart(fields, uploads)
        error = error_of(*http_request(port, "POST", "/api/v1/jobs", body, {"Content-Type": content_type, **headers})
                         [::2], 400, "repeated_field")
        assert f"the field '{name}' more than once" in error["message"], error
    assert job_count_of(client) == before
    body, content_type = multipart([("finding", "cardiomegaly"), ("finding", "pneumonia"), ("steps", "1")],
                                   [anatomy, region, region])
    status, _, answer = http_request(port, "POST", "/api/v1/jobs", body, {"Content-Type": content_type, **headers})
    assert status == 202, answer[:300]
    job = client.wait(json.loads(answer)["id"], timeout=300)
    assert job["state"] == "succeeded" and job["findings"] == ["cardiomegaly", "pneumonia"], job


def job_count_of(client: EngineClient) -> int:
    return len(client.jobs(limit=1000))


# ============================================================================= 6. disk, data directory, start-up


@pytest.mark.slow
def test_a_full_disk_fails_the_job_with_the_reason_and_refuses_uploads_cleanly(tiny_model, small_disk, tmp_path):
    with running(start_engine(tiny_model, small_disk / "data", tmp_path / "home",
                              "--max-upload-bytes", "8000000")) as engine:
        client = engine.client()
        wait_ready(client)
        big_grid = tmp_path / "big-anatomy.png"  # a few KB of PNG, a ~10 MB result (2048 x 2048 DICOM pair)
        big_grid.write_bytes(png_bytes(anatomy_array(2048)))
        filler = fill(small_disk, 3 * 1024 * 1024)
        assert client.health()["status"] == "ok"
        job = client.wait(client.submit(big_grid, [], steps=1)["id"], poll_interval=0.2, timeout=JOB_TIMEOUT)
        assert job["state"] == "failed" and job["error"]["code"] == "storage_error", job
        assert "disk is full" in job["error"]["message"] and str(small_disk) not in job["error"]["message"]
        assert list((engine.data_dir / "jobs" / job["id"]).iterdir()) == [], "no partial result is left"
        # an upload larger than the space left: 507 JSON, nothing stored
        too_big = tmp_path / "too-big.png"
        too_big.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(4 * 1024 * 1024))
        with pytest.raises(EngineError) as refused:
            client.submit(too_big, [], steps=1)
        assert refused.value.status == 507 and refused.value.code == "insufficient_storage", refused.value
        assert list((engine.data_dir / "incoming").iterdir()) == []
        # completely full: unhealthy, and new jobs are refused before their uploads are read
        fill(small_disk, 0)
        status, _, answer = engine.request("GET", "/api/v1/health", token=False)
        assert status == 503 and "full" in json.loads(answer)["storage_error"], answer
        with pytest.raises(EngineError) as refused:
            client.submit(big_grid, [], steps=1)
        assert refused.value.status == 507, refused.value
        # space again: healthy, and the same job succeeds
        filler.unlink()
        assert client.health()["status"] == "ok"
        assert client.wait(client.submit(big_grid, [], steps=1)["id"], poll_interval=0.2,
                           timeout=JOB_TIMEOUT)["state"] == "succeeded"
        assert engine.process.poll() is None and "Traceback" not in engine.log()


@pytest.mark.slow
def test_a_full_disk_under_the_cli_is_one_line_and_leaves_nothing(tiny_model, small_disk, tmp_path):
    big_grid = tmp_path / "big-anatomy.png"
    big_grid.write_bytes(png_bytes(anatomy_array(2048)))
    fill(small_disk, 3 * 1024 * 1024)
    result = run_cli("generate", "--model", str(tiny_model), "--anatomy", str(big_grid), "--steps", "1",
                     "--device", "cpu", "--out", str(small_disk / "out" / "result"))
    assert_one_line_refusal(result, "generate", "disk is full", after_progress=True)
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"], "no output, no partial directory"


@pytest.mark.slow
def test_submit_to_a_full_disk_is_one_line_and_leaves_nothing(tiny_model, small_disk, tmp_path):
    """The result is downloaded into a staging folder: a cut-off sc.dcm never lands where the user looks."""
    with running(start_engine(tiny_model, tmp_path / "data", tmp_path / "home")) as engine:
        wait_ready(engine.client())
        big_grid = tmp_path / "big-anatomy.png"  # a ~10 MB result (2048 x 2048 DICOM pair) for 3 MB of space
        big_grid.write_bytes(png_bytes(anatomy_array(2048)))
        fill(small_disk, 3 * 1024 * 1024)
        result = run_cli("submit", "--url", engine.url, "--anatomy", str(big_grid), "--steps", "1",
                         "--out", str(small_disk / "out" / "result"),
                         env=dict(engine_env(engine.home), XREAL_ENGINE_TOKEN=engine.token))
        assert_one_line_refusal(result, "submit", "disk is full", after_progress=True)
        assert sorted(p.name for p in small_disk.iterdir()) == ["filler"], "no output, no partial directory"


@pytest.mark.slow
def test_sigterm_stops_generate_like_ctrl_c_and_leaves_nothing(tiny_model, tmp_path):
    """``kill`` (a scheduler's stop) is handled as Ctrl-C: exit 143, one line, no staging folder left."""
    anatomy = tmp_path / "anatomy.png"
    anatomy.write_bytes(png_bytes(anatomy_array(256)))
    out = tmp_path / "out" / "result"
    process = subprocess.Popen([sys.executable, "-m", "xreal_engine.cli", "generate", "--model", str(tiny_model),
                                "--anatomy", str(anatomy), "--steps", "1000", "--device", "cpu", "--out", str(out)],
                               stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    seen = ""
    while "anatomy" not in seen:  # sampling has begun (the progress bar); no timing window: 1000 steps remain
        character = process.stderr.read(1)
        assert character, f"generate ended before it was stopped: {seen[-2000:]}"
        seen += character
    process.send_signal(signal.SIGTERM)
    rest = process.stderr.read()
    assert process.wait(timeout=120) == 143, rest[-2000:]
    assert "xreal-engine generate: interrupted; nothing was written." in rest and "Traceback" not in rest
    assert not out.exists() and not list(tmp_path.glob("out/.result.partial-*"))


def test_output_paths_that_are_no_new_directory_say_what_they_are(tmp_path, monkeypatch):
    from xreal_engine.errors import InputError
    from xreal_engine.files import check_new_directory, staged_directory

    (tmp_path / "a-file").write_text("mine")
    for path, message in ((tmp_path / "a-file", "is a file"), (Path("/dev/null"), "is not a folder"),
                          (Path(""), "Give the output directory a name"), (Path("."), "Give the output directory")):
        with pytest.raises(InputError, match=message):
            check_new_directory(path)
    assert (tmp_path / "a-file").read_text() == "mine"
    for umask, mode in ((0o022, 0o755), (0o077, 0o700)):  # a result folder gets the user's umask, as mkdir does
        previous = os.umask(umask)
        try:
            with staged_directory(tmp_path / f"result-{umask:o}") as staging:
                (staging / "sc.dcm").write_bytes(b"x")
        finally:
            os.umask(previous)
        assert (tmp_path / f"result-{umask:o}").stat().st_mode & 0o777 == mode


def test_submit_refuses_a_timeout_that_cannot_be_waited(files, tmp_path):
    for value in ("0", "-5"):
        result = run_cli("submit", "--url", "http://127.0.0.1:9", "--anatomy", str(files["anatomy"]),
                         "--timeout", value, "--out", str(tmp_path / "out"))
        assert_one_line_refusal(result, "submit", "--timeout must be more than 0 seconds")


@pytest.mark.slow
def test_submit_that_times_out_cancels_its_job(engine, files, tmp_path):
    """Nobody will fetch the result, so the job must not keep the engine's single worker busy."""
    result = run_cli("submit", "--url", engine.url, "--anatomy", str(files["anatomy"]), "--steps", "1000",
                     "--timeout", "0.5", "--out", str(tmp_path / "out"),
                     env=dict(os.environ, OMP_NUM_THREADS="1", XREAL_ENGINE_TOKEN=engine.token))
    line = assert_one_line_refusal(result, "submit", "did not finish within 0.5 seconds",
                                   "it was cancelled on the engine", after_progress=True)
    job_id = line.split("The job ", 1)[1].split()[0]
    client = engine.client()
    assert wait_for(lambda: client.status(job_id)["state"] == "cancelled", "the job to be cancelled")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_deleted_data_directory_makes_the_engine_unhealthy_and_refuse_jobs(tiny_model, files, tmp_path):
    with running(start_engine(tiny_model, tmp_path / "data", tmp_path / "home")) as engine:
        client = engine.client()
        wait_ready(client)
        shutil.rmtree(engine.data_dir)
        status, _, answer = engine.request("GET", "/api/v1/health", token=False)
        health = json.loads(answer)
        assert status == 503 and health["status"] == "unhealthy" and "deleted" in health["storage_error"], health
        with pytest.raises(EngineError) as refused:
            client.submit(files["anatomy"], [], steps=1)
        assert refused.value.status == 503 and "deleted" in refused.value.message
        assert not engine.data_dir.exists(), "nothing was recreated silently"
        assert engine.process.poll() is None


def test_the_data_directory_is_writable_by_this_user_only_and_must_be_theirs(tmp_path, monkeypatch):
    from xreal_engine.errors import StorageError
    from xreal_engine.service.store import JobStore

    shared = tmp_path / "group-writable"
    shared.mkdir()
    shared.chmod(0o775)  # what a umask of 002 makes
    JobStore(shared).close()
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755  # no one else can rename jobs/ or incoming/ any more
    assert all(stat.S_IMODE((shared / name).stat().st_mode) == 0o700 for name in ("jobs", "incoming", "batches"))
    monkeypatch.setattr(os, "getuid", lambda: shared.stat().st_uid + 1)  # the folder is now another user's
    with pytest.raises(StorageError, match="belongs to another user; give a directory of your own"):
        JobStore(shared)


def test_serve_raises_its_open_file_limit_so_idle_connections_cannot_exhaust_it():
    """Every connection holds a file: at a desktop's soft limit of 1024, another local user's thousand idle
    connections would lock every client out, so serve takes the soft limit up to the hard one."""
    script = ("import resource; soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE); "
              "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)); "
              "from xreal_engine.service.serve import _raise_open_file_limit; _raise_open_file_limit(); "
              "print(*resource.getrlimit(resource.RLIMIT_NOFILE))")
    soft, hard = map(int, subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                         check=True).stdout.split())
    assert soft == (hard if hard != -1 else 1 << 20) and soft > 256


def test_a_token_file_other_users_can_read_is_warned_about(tmp_path):
    from xreal_engine.client import resolve_token

    secret = tmp_path / "token.txt"
    secret.write_text("a-token-from-a-file-0123456789\n")
    secret.chmod(0o600)
    assert resolve_token(None, secret) == ("a-token-from-a-file-0123456789", None)
    secret.chmod(0o644)
    token, warning = resolve_token(None, secret)
    assert token == "a-token-from-a-file-0123456789"
    assert "can be read by other users of this machine (mode 644); make it private with chmod 600" in warning


@pytest.mark.slow
def test_starting_on_an_unwritable_data_directory_is_one_line(tiny_model, tmp_path, read_only_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cases = {"below a regular file": blocker / "data", "on a read-only file system": read_only_dir / "data"}
    if can_chattr(tmp_path) is None:
        locked = tmp_path / "locked"
        locked.mkdir()
        cases["in an immutable folder"] = locked / "data"
        existing = tmp_path / "existing"
        subprocess.run([sys.executable, "-c", "import sys; from xreal_engine.service.store import JobStore; "
                        "JobStore(sys.argv[1]).close()", str(existing)], check=True)
        cases["with an immutable database"] = existing
    if os.getuid() == 0:  # root can give a folder to another user: one that user could swap jobs/ in
        foreign = tmp_path / "foreign"
        foreign.mkdir(mode=0o777)
        os.chown(foreign, 65534, 65534)
        cases["owned by another user"] = foreign
    for name, data_dir in cases.items():
        locks = [locked] if name == "in an immutable folder" else (
            [existing / "jobs.sqlite3"] if name == "with an immutable database" else [])
        with immutable(*locks) if locks else contextlib.nullcontext():
            result = run_cli("serve", "--port", "0", "--model", str(tiny_model), "--data-dir", str(data_dir),
                             env=engine_env(tmp_path / "home"))
        assert result.stdout == "", (name, result.stdout)
        lines = [line for line in result.stderr.splitlines() if line.strip() and "access token in" not in line]
        assert result.returncode == 2 and len(lines) == 1, (name, result.stderr[-2000:])
        assert lines[0].startswith("xreal-engine serve: error: ") and "Traceback" not in result.stderr, lines


# ============================================================================= 7, 8. ranges and tracebacks


@pytest.mark.slow
def test_seeds_work_at_both_ends_and_are_refused_beyond_over_http(engine, files):
    client = engine.client()
    for seed in (0, 2**32 - 1):
        job = client.wait(client.submit(files["anatomy"], [], steps=1, seed=seed)["id"], poll_interval=0.2,
                          timeout=JOB_TIMEOUT)
        assert job["state"] == "succeeded" and job["parameters"]["seed"] == seed, job
    for seed in (-1, 2**32, 2**64, 2**70, 10**40):
        with pytest.raises(EngineError) as refused:
            client.submit(files["anatomy"], [], steps=1, seed=seed)
        assert refused.value.status == 422 and "4294967295" in refused.value.message, refused.value.message


def cli_cases(model: Path, files: dict, size: int, work: Path, read_only: Path) -> list:
    """(name, argv without --out, --out path, words the one error line must hold)."""
    work.mkdir(parents=True, exist_ok=True)
    bomb, nan_nifti, nan_nrrd, corrupt, volume = (work / n for n in (
        "bomb.png", "nan.nii", "nan.nrrd", "corrupt.dcm", "volume.nrrd"))
    bomb.write_bytes(png_bomb())
    nan_nifti.write_bytes(nifti_with_nan(size))
    import SimpleITK as sitk

    labels = anatomy_array(size).astype(np.float32)
    labels[3, 3] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(labels), str(nan_nrrd))
    corrupt.write_bytes(corrupt_dicom())
    volume.write_bytes(gzip_volume_nrrd())
    blocker = work / "a-file"
    blocker.write_text("x")
    base = ["generate", "--model", str(model), "--steps", "1", "--device", "cpu"]
    good = ["--anatomy", str(files["anatomy"])]
    region = ["--pathology-mask", str(files["region"])]
    return [
        ("decompression bomb PNG", base + ["--anatomy", str(bomb)], work / "o1", ["20000 x 20000"]),
        ("3D gzip NRRD", base + ["--anatomy", str(volume)], work / "o2", ["3D volume"]),
        ("NaN in a NIfTI label map", base + ["--anatomy", str(nan_nifti)], work / "o3", ["NaN"]),
        ("NaN in a NRRD label map", base + ["--anatomy", str(nan_nrrd)], work / "o4", ["NaN"]),
        ("corrupt DICOM to edit", base + good + region + ["--finding", "pneumonia", "--image", str(corrupt)],
         work / "o5", ["corrupt"]),
        ("corrupt DICOM as anatomy", base + ["--anatomy", str(corrupt)], work / "o6", ["corrupt"]),
        ("a directory as the anatomy", base + ["--anatomy", str(work)], work / "o7", ["directory"]),
        ("seed beyond 64 bits", base + good + ["--seed", str(2**70)], work / "o8", ["seed", "4294967295"]),
        ("--out below a regular file", base + good, blocker / "out", ["file, not a folder"]),
        ("--out on a read-only file system", base + good, read_only / "out", ["read-only"]),
        ("--out where nothing can be created", base + good, Path("/proc/xreal-out"), ["cannot be written"]),
        ("finding with control characters", base + good + region + ["--finding", "pneu\x1b[2J\x07monia"],
         work / "o9", ["\\x1b"]),
        ("10,000-character finding", base + good + region + ["--finding", "x" * 10_000], work / "o10", ["..."]),
    ]


@pytest.mark.slow
def test_the_cli_refuses_every_bad_input_in_one_line_and_writes_nothing(tiny_model, files, size, tmp_path,
                                                                       read_only_dir):
    failures = []
    for name, argv, out, needles in cli_cases(tiny_model, files, size, tmp_path / "work", read_only_dir):
        result = run_cli(*argv, "--out", str(out))
        try:
            line = assert_one_line_refusal(result, "generate", *needles)
            assert len(line) < 700, f"{len(line)} characters"
            assert not out.exists() and not list(out.parent.glob(f".{out.name}.partial-*")), "something was written"
        except AssertionError as error:
            failures.append(f"{name}: {error}")
    assert not failures, "\n".join(failures)


@pytest.mark.slow
def test_the_cli_checks_the_header_before_decoding(tiny_model, files, tmp_path):
    """Peak memory of the CLI refusing a 20000 x 20000 PNG is that of refusing a missing file."""
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_bomb())

    def peak_kib(anatomy: str) -> int:
        code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], capture_output=True); "
                "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
        result = subprocess.run([sys.executable, "-c", code, sys.executable, "-m", "xreal_engine.cli", "generate",
                                 "--model", str(tiny_model), "--anatomy", anatomy, "--out", str(tmp_path / "x")],
                                capture_output=True, text=True, timeout=300)
        return int(result.stdout.strip())

    baseline, bomb_peak = peak_kib(str(tmp_path / "missing.png")), peak_kib(str(bomb))
    print(f"\nCLI peak RSS: refusing a missing file {baseline / 1024:.0f} MiB, a 20000 x 20000 PNG "
          f"{bomb_peak / 1024:.0f} MiB")
    assert bomb_peak < baseline + 100 * 1024, (baseline, bomb_peak)


# ============================================================================= 9-12. input over HTTP


@pytest.mark.slow
def test_bad_uploads_get_4xx_json_and_are_refused_before_decoding(engine, files, size):
    good = [("anatomy", "anatomy.png", "image/png", files["anatomy"].read_bytes())]
    volume = gzip_volume_nrrd()
    cases = [
        ("NaN NIfTI label map", [("anatomy", "a.nii", "application/octet-stream", nifti_with_nan(size))], [],
         422, "NaN"),
        ("3000x3000x50 gzip NRRD", [("anatomy", "a.nrrd", "application/octet-stream", volume)], [],
         422, "3D volume"),
        ("20000 x 20000 PNG", [("anatomy", "a.png", "image/png", png_bomb())], [], 422, "20000 x 20000"),
        ("corrupt DICOM to edit", good + [("pathology", "r.png", "image/png", files["region"].read_bytes()),
                                          ("image", "x.dcm", "application/dicom", corrupt_dicom())],
         [("finding", "pneumonia")], 422, "corrupt"),
        ("control characters in a finding", good + [("pathology", "r.png", "image/png", files["region"].read_bytes())],
         [("finding", "pneu\x1b[2J\x07monia")], 422, "\\x1b"),
        ("10,000-character finding", good + [("pathology", "r.png", "image/png", files["region"].read_bytes())],
         [("finding", "y" * 10_000)], 422, "..."),
        ("seed beyond 64 bits", good, [("seed", str(2**70))], 422, "4294967295"),
    ]
    before = None
    for _round in ("warm-up: the readers' libraries load once", "measured"):
        for name, uploads, fields, status, needle in cases:
            body, content_type = multipart(fields + [("steps", "1")], uploads)
            got, _, answer = engine.request("POST", "/api/v1/jobs", body, {"Content-Type": content_type})
            error = error_of(got, answer, status)
            assert needle in error["message"] and len(error["message"]) < 500, (name, error)
            assert "\x1b" not in error["message"] and str(engine.data_dir) not in error["message"], (name, error)
        before = before or engine.reset_peak()
    grown = engine.peak_growth(before)
    print(f"\nengine peak RSS grew by {grown / 2**20:.1f} MiB over {len(cases)} refused uploads "
          "(a decoded 3000x3000x50 volume alone is 430 MiB)")
    assert grown < 100 * 2**20
    assert list((engine.data_dir / "incoming").iterdir()) == []


@pytest.mark.slow
def test_bodies_are_limited_per_endpoint_before_they_are_read(engine):
    job_id = uuid.uuid4().hex
    before = engine.reset_peak()
    # 200 MB announced to an endpoint that takes a few bytes: refused from the header, nothing read
    status, _, answer = engine.request("POST", f"/api/v1/jobs/{job_id}/push", b"",
                                       {"Content-Type": "application/json", "Content-Length": str(200 * 10**6)},
                                       send_body=False)
    error_of(status, answer, 413, "too_large")
    # the same without a length (chunked): refused once the first 64 KB chunk passes the limit
    chunk = b'{"destination": "' + b"x" * 65536
    chunked = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    status, _, answer = engine.request("POST", f"/api/v1/jobs/{job_id}/push", chunked,
                                       {"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
    error_of(status, answer, 413, "too_large")
    # a job over --max-upload-bytes, announced: refused before the upload
    status, _, answer = engine.request("POST", "/api/v1/jobs", b"", {"Content-Type": "multipart/form-data; boundary=b",
                                                                     "Content-Length": str(200 * 10**6)},
                                       send_body=False)
    error_of(status, answer, 413, "too_large")
    grown = engine.peak_growth(before)
    print(f"\nengine peak RSS grew by {grown / 2**20:.1f} MiB for 200 MB bodies (refused unread)")
    assert grown < 20 * 2**20
    assert engine.client().health()["status"] == "ok"


@pytest.mark.slow
def test_malformed_json_and_echoes_are_named_for_what_is_wrong(engine):
    job_id = uuid.uuid4().hex
    json_headers = {"Content-Type": "application/json"}
    error = error_of(*engine.request("POST", f"/api/v1/jobs/{job_id}/push", b'{"destination": ', json_headers)[::2],
                     400, "bad_request")
    assert "not valid JSON" in error["message"], error
    error = error_of(*engine.request("POST", f"/api/v1/jobs/{job_id}/push", b'["x"]', json_headers)[::2], 400)
    assert "JSON object" in error["message"] or "destination" in error["message"], error
    for path in (f"/api/v1/jobs?state={'%1b' * 3}{'z' * 5000}", f"/api/v1/jobs/{'%07' * 2}{'q' * 5000}",
                 f"/api/v1/nothing/{'%1b' * 2}{'w' * 5000}"):
        status, _, answer = engine.request("GET", path)
        error = error_of(status, answer, status)
        assert 400 <= status < 500 and len(error["message"]) < 400 and "\x1b" not in error["message"], error
    # the HTTP server's own refusal of a broken request (before the application) is plain text, as documented
    status, _, answer = engine.request("POST", f"/api/v1/jobs/{job_id}/cancel", b"", {"Content-Length": "abc"},
                                       send_body=False)
    assert status == 400
