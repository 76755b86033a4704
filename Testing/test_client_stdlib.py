"""The stdlib client on its own: importable without torch/numpy, safe zip extraction,
multipart encoding, and its retry / error rules against small loopback HTTP servers
that misbehave on purpose (the real engine is exercised in test_server_service.py).
"""

from __future__ import annotations

import email.parser
import http.server
import json
import socket
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest

from xreal_engine.client import EngineClient, EngineError, EngineUnreachable, MultipartBody, extract_zip_safely


def test_client_imports_without_torch_numpy_or_server_libraries():
    code = (
        "import sys\n"
        "for name in ('torch', 'numpy', 'fastapi', 'pydantic', 'diffusers', 'PIL'):\n"
        "    sys.modules[name] = None  # any import of these now fails\n"
        "import xreal_engine.client, xreal_engine.cli.submit, xreal_engine.model.sampling\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@pytest.mark.parametrize("member", ["../evil.txt", "/etc/evil.txt", "segments/../../evil.txt", "C:evil.txt",
                                    "..\\evil.txt"])
def test_download_all_refuses_archive_entries_that_escape(tmp_path, member):
    archive_path = tmp_path / "result.zip"
    with zipfile.ZipFile(archive_path, "w") as archive:
        archive.writestr("sc.dcm", b"fine")
        archive.writestr(member, b"evil")
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(EngineError) as refused:
        extract_zip_safely(archive_path, dest)
    assert refused.value.code == "unsafe_archive"
    assert not (tmp_path / "evil.txt").exists() and not Path("/etc/evil.txt").exists()


def test_download_all_refuses_symlinks_and_extracts_nested_files(tmp_path):
    link_zip = tmp_path / "link.zip"
    with zipfile.ZipFile(link_zip, "w") as archive:
        info = zipfile.ZipInfo("segments/link")
        info.external_attr = (0o120777 << 16)
        archive.writestr(info, "/etc/passwd")
    with pytest.raises(EngineError):
        extract_zip_safely(link_zip, tmp_path / "a")

    good_zip = tmp_path / "good.zip"
    with zipfile.ZipFile(good_zip, "w") as archive:
        archive.writestr("sc.dcm", b"sc")
        archive.writestr("segments/01_left_lung.png", b"png")
    written = extract_zip_safely(good_zip, tmp_path / "b")
    assert sorted(p.relative_to((tmp_path / "b").resolve()).as_posix() for p in written) == [
        "sc.dcm", "segments/01_left_lung.png"]
    assert (tmp_path / "b" / "segments" / "01_left_lung.png").read_bytes() == b"png"


def test_multipart_body_round_trips_through_a_standard_parser(tmp_path):
    mask = tmp_path / 'we"ird name.png'
    mask.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 10)
    with MultipartBody([("finding", "pleural effusion"), ("steps", "5")], [("pathology", mask)]) as body:
        raw = body.stream.read()
        headers = body.headers()
    assert int(headers["Content-Length"]) == len(raw)
    message = email.parser.BytesParser().parsebytes(
        f"Content-Type: {headers['Content-Type']}\r\n\r\n".encode() + raw)
    parts = {part.get_param("name", header="content-disposition"): part for part in message.get_payload()}
    assert parts["finding"].get_payload(decode=True) == b"pleural effusion"
    assert parts["steps"].get_payload(decode=True) == b"5"
    assert parts["pathology"].get_payload(decode=True) == mask.read_bytes()
    assert parts["pathology"].get_content_type() == "image/png"
    assert '"' not in parts["pathology"].get_param("filename", header="content-disposition")


# ----------------------------------------------------------------------------- misbehaving servers


class ScriptedHandler(http.server.BaseHTTPRequestHandler):
    """Answers from ``server.script``: a list of callables, one per request, in order."""

    protocol_version = "HTTP/1.1"

    def _handle(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.server.requests.append((self.command, self.path, dict(self.headers), body))
        step = self.server.script.pop(0) if self.server.script else self.server.default
        step(self)

    do_GET = do_POST = do_DELETE = _handle

    def log_message(self, *args):
        pass


def reply(status: int, payload, headers: dict | None = None, content_type: str = "application/json"):
    def respond(handler):
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            handler.send_header(key, value)
        handler.end_headers()
        handler.wfile.write(data)
    return respond


def drop_connection(handler):
    """The request arrived but the answer is lost (the engine processed it, the network failed)."""
    handler.close_connection = True
    handler.connection.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def scripted_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ScriptedHandler)
    server.script, server.requests = [], []
    server.default = reply(500, b"<html>unexpected</html>", content_type="text/html")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def client_for(server, **kwargs) -> EngineClient:
    return EngineClient(f"http://127.0.0.1:{server.server_address[1]}", token="secret-token", timeout=10,
                        retry_delay=0.01, **kwargs)


def test_get_is_retried_on_503_and_sends_the_token(scripted_server):
    scripted_server.script = [reply(503, {"error": {"code": "busy", "message": "Busy."}}),
                              reply(503, {"error": {"code": "busy", "message": "Busy."}}),
                              reply(200, {"status": "ok", "model": "ready"})]
    assert client_for(scripted_server).health()["status"] == "ok"
    assert len(scripted_server.requests) == 3
    assert all(headers["Authorization"] == "Bearer secret-token" for _, _, headers, _ in scripted_server.requests)


def test_a_lost_submit_answer_is_retried_with_the_same_request_id(scripted_server, tmp_path):
    anatomy = tmp_path / "anatomy.png"
    anatomy.write_bytes(b"\x89PNG\r\n\x1a\n")
    scripted_server.script = [drop_connection, reply(202, {"id": "a" * 32, "state": "queued"})]
    job = client_for(scripted_server).submit(anatomy, seed=3)
    assert job["id"] == "a" * 32
    posts = [body for method, _, _, body in scripted_server.requests if method == "POST"]
    assert len(posts) == 2

    def request_id(body: bytes) -> bytes:
        return body.split(b'name="request_id"\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n')[1].split(b"\r\n")[0]

    assert request_id(posts[0]) == request_id(posts[1]) and len(request_id(posts[0])) == 32


def test_refusals_are_not_retried_and_carry_status_code_message(scripted_server):
    scripted_server.script = [reply(429, {"error": {"code": "queue_full", "message": "The engine is busy."}},
                                    {"Retry-After": "7"})]
    with pytest.raises(EngineError) as busy:
        client_for(scripted_server).status("b" * 32)
    assert (busy.value.status, busy.value.code, busy.value.retry_after) == (429, "queue_full", 7.0)
    assert str(busy.value) == "The engine is busy." and len(scripted_server.requests) == 1

    with pytest.raises(EngineError) as broken:
        client_for(scripted_server).cancel("b" * 32)  # default reply: HTML 500
    assert broken.value.status == 500 and "500" in broken.value.message


def test_events_parse_server_sent_events_until_the_final_state(scripted_server):
    stream = (": keep-alive\n\n"
              'event: progress\ndata: {"id": "j", "state": "queued", "stage": "queued"}\n\n'
              'event: progress\ndata: {"id": "j", "state": "running", "stage": "anatomy", "step": 1}\n\n'
              ": keep-alive\n\n"
              'event: end\ndata: {"id": "j", "state": "succeeded", "stage": "done"}\n\n').encode()
    scripted_server.script = [reply(200, stream, content_type="text/event-stream")]
    states = [event["state"] for event in client_for(scripted_server).events("j")]
    assert states == ["queued", "running", "succeeded"]


def test_unreachable_engine_raises_engine_unreachable():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = EngineClient(f"http://127.0.0.1:{port}", timeout=2, retries=2, retry_delay=0.01)
    with pytest.raises(EngineUnreachable) as unreachable:
        client.health()
    assert unreachable.value.status == 0 and f"127.0.0.1:{port}" in unreachable.value.message


def test_base_url_must_be_http():
    with pytest.raises(ValueError):
        EngineClient("ftp://example.org")
    assert EngineClient("http://127.0.0.1:1/").base_url == "http://127.0.0.1:1"  # trailing slash dropped


def test_a_local_engine_is_not_reached_through_a_proxy(scripted_server, monkeypatch):
    """Slicer may run with http_proxy set; the local engine must still be reached directly."""
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("no_proxy", "")
    scripted_server.script = [reply(200, {"status": "ok"})]
    assert client_for(scripted_server).health() == {"status": "ok"}
