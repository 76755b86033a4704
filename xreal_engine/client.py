"""Client of the XReal engine service, standard library only.

Slicer's bundled Python has no torch, numpy is optional and installing packages is a
chore, so this module uses only urllib, json and threading. It depends on nothing else
in the package and can be copied on its own. Why this file is long: it is the whole client
(HTTP, multipart, safe zip extraction, the token file shared with ``serve``) in one
copyable file.

    client = EngineClient("http://127.0.0.1:8000", token=None)
    job = client.submit("anatomy.png", pathologies=[("region.png", "cardiomegaly")], seed=1, steps=50)
    job = client.wait(job["id"], callback=lambda job: print(job["stage"], job["progress"]))
    if job["state"] == "succeeded":
        client.download_all(job["id"], "result/")

Failures raise :class:`EngineError` (the server refused: ``status``, ``code``, ``message``)
or :class:`EngineUnreachable` (no answer). Retries happen only where they are safe: GET
requests, and job submission, which carries a ``request_id`` so the server returns the
same job instead of creating a second one.

Tokens: every request carries ``X-XReal-Client: 1`` (the engine refuses state-changing
requests without it, so that no web page can drive it). Without an explicit ``token``, a
client of a loopback URL reads the token that ``xreal-engine serve`` made up and left in
``local_token_path(port)``, a file only its user can read; that file's format and place
are defined here, the one module both sides share.
"""

from __future__ import annotations

import io
import json
import mimetypes
import os
import secrets
import shutil
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zipfile
from pathlib import Path, PurePosixPath

from .control_spec import parse_control
from .errors import XRealError

API_PREFIX = "/api/v1"
FINAL_STATES = ("succeeded", "failed", "cancelled")
RETRY_STATUSES = (502, 503, 504)
# How long a submission with a PACS source may take to be answered: the engine fetches the X-ray first,
# trying a silent PACS up to 4 times its timeout_s (30 s by default) with back-off.
SOURCE_FETCH_TIMEOUT_S = 600.0
SMALL_UPLOAD_BYTES = 256 * 1024
TOKEN_ENVIRONMENT = "XREAL_ENGINE_TOKEN"
CLIENT_HEADERS = {"X-XReal-Client": "1"}  # marks a request as a program's, not a web page's


class EngineError(Exception):
    """The engine answered with an error: HTTP ``status``, machine ``code``, human ``message``."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None,
                 details: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after
        self.details = details or {}  # the error's other keys, e.g. "rows": every bad manifest row

    def __str__(self) -> str:
        return self.message


class EngineUnreachable(EngineError):
    """No answer from the engine (not running, wrong URL, network down, timeout)."""

    def __init__(self, message: str):
        super().__init__(0, "unreachable", message)


class EngineClient:
    """Talk to one engine. ``timeout`` applies to each request (connect + each read)."""

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 30.0,
                 retries: int = 3, retry_delay: float = 0.5):
        parsed = urllib.parse.urlsplit(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"The engine URL {base_url!r} must look like http://host:port.")
        self.base_url = base_url.rstrip("/")
        self.token = token or None
        self.timeout = timeout
        self.retries = max(1, retries)
        self.retry_delay = retry_delay
        self._max_upload_bytes: int | None = None  # from info(), fetched on the first large upload
        # A local engine must not be reached through an HTTP proxy from the environment.
        loopback = is_loopback(parsed.hostname)
        self._opener = urllib.request.build_opener(*([urllib.request.ProxyHandler({})] if loopback else []))
        # No token given: a local engine's own token file (read per request: the engine may restart).
        self._local_port = _url_port(parsed) if loopback and self.token is None else None

    # -- low level --------------------------------------------------------------------------
    def _headers(self, extra: dict | None = None) -> dict:
        headers = {"Accept": "application/json", "User-Agent": "xreal-engine-client", **CLIENT_HEADERS}
        token = self.token or (read_local_token(self._local_port) if self._local_port else None)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        headers.update(extra or {})
        return headers

    def _open(self, method: str, path: str, body=None, headers: dict | None = None,
              retry: bool = False, timeout: float | None = None):
        """Send one request; return the open response. Retries connection failures and 502-504 if ``retry``."""
        url = self.base_url + API_PREFIX + path
        attempts = self.retries if retry else 1
        for attempt in range(1, attempts + 1):
            if hasattr(body, "seek"):
                body.seek(0)
            request = urllib.request.Request(url, data=body, method=method, headers=self._headers(headers))
            try:
                return self._opener.open(request, timeout=timeout or self.timeout)
            except urllib.error.HTTPError as error:
                engine_error = _error_from_response(error)
                # A 502/504 in the engine's own words (a PACS that failed) was retried by the engine already;
                # one from a proxy in between, and any 503 (starting, storage), is worth another try.
                answered_by_engine = engine_error.code != f"http_{error.code}"
                if attempt < attempts and error.code in RETRY_STATUSES and not (
                        error.code in (502, 504) and answered_by_engine):
                    time.sleep(self.retry_delay * attempt)
                    continue
                raise engine_error from None
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as error:
                if attempt < attempts:
                    time.sleep(self.retry_delay * attempt)
                    continue
                reason = getattr(error, "reason", error)
                raise EngineUnreachable(f"The engine at {self.base_url} did not answer ({reason}).") from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _json(self, method: str, path: str, body=None, headers=None, retry: bool = False,
              timeout: float | None = None):
        with self._open(method, path, body, headers, retry, timeout) as response:
            try:
                data = response.read()
            except OSError as error:
                raise EngineUnreachable(f"The engine at {self.base_url} stopped answering ({error}).") from None
        return json.loads(data) if data else None

    # -- API ----------------------------------------------------------------------------------
    def health(self) -> dict:
        return self._json("GET", "/health", retry=True)

    def info(self) -> dict:
        return self._json("GET", "/info", retry=True)

    def submit(self, anatomy_path=None, pathologies=(), image_path=None, *, seed: int | None = None,
               steps: int | None = None, anatomy_steps: int | None = None, guidance: float | None = None,
               eta: float | None = None, request_id: str | None = None, push_to: str | None = None,
               source: dict | None = None, sampler: str | None = None, fast: bool | None = None,
               controls=(), control_stages: str | None = None, keep_outside_region: bool | None = None) -> dict:
        """Upload masks (and an image to edit) and queue a job; returns the job status dict.

        ``pathologies`` is a list of (mask path, finding). ``source`` is
        ``{"source": NAME, "study": UID, "series": UID, "instance": UID?}`` to edit an image
        fetched by the engine from a PACS. The request id (default: a new UUID) makes a
        retried submission return the same job. ``controls``: ControlNets to steer with, as
        ``[(name, file path or None, scale or None), ...]`` (``lungs`` takes no file; a None scale is the
        model's), and ``control_stages`` the stages they steer (anatomy, pathology or both).
        ``keep_outside_region``: keep the previous image outside each (feathered) pathology region
        (None: the model's default; model/sampling.py).
        """
        fields = []
        files = []
        for name, path, scale in controls:  # the engine checks names, scales and which controls take a file
            fields.append(("control", str(name) if scale is None else f"{name}:{float(scale)!r}"))
            if path is not None:
                files.append(("control_file", Path(path)))
        if anatomy_path is not None:
            files.append(("anatomy", Path(anatomy_path)))
        for mask_path, finding in pathologies:
            files.append(("pathology", Path(mask_path)))
            fields.append(("finding", finding))
        if image_path is not None:
            files.append(("image", Path(image_path)))
        parameters = {"seed": seed, "steps": steps, "anatomy_steps": anatomy_steps, "guidance": guidance,
                      "eta": eta, "sampler": sampler, "fast": None if fast is None else str(bool(fast)).lower(),
                      "request_id": request_id or uuid.uuid4().hex, "push_to": push_to, "control_stages": control_stages,
                      "keep_outside_region": None if keep_outside_region is None else str(bool(keep_outside_region)).lower()}
        parameters.update(source or {})
        fields.extend((name, str(value)) for name, value in parameters.items() if value is not None)
        with MultipartBody(fields, files) as body:
            self._check_upload_size(body.length)
            # With a PACS source the engine fetches the X-ray before it answers (its own retries included).
            timeout = max(self.timeout, SOURCE_FETCH_TIMEOUT_S) if source else None
            return self._json("POST", "/jobs", body.stream, body.headers(), retry=True, timeout=timeout)

    def _check_upload_size(self, length: int) -> None:
        """Refuse a too-large upload before sending it: the engine would cut the connection mid-upload.

        Small bodies skip the check (the engine reads them and answers properly); larger ones
        cost one ``info`` request per client, which also surfaces a wrong token before the upload.
        """
        if length <= SMALL_UPLOAD_BYTES:
            return
        if self._max_upload_bytes is None:
            self._max_upload_bytes = int(self.info().get("limits", {}).get("max_upload_bytes") or 0)
        if self._max_upload_bytes and length > self._max_upload_bytes:
            raise EngineError(413, "too_large",
                              f"The upload is {length} bytes; this engine accepts at most "
                              f"{self._max_upload_bytes} bytes per job. Use smaller or compressed files.")

    def status(self, job_id: str) -> dict:
        return self._json("GET", f"/jobs/{_quote(job_id)}", retry=True)

    def jobs(self, state: str | None = None, limit: int = 100) -> list:
        query = urllib.parse.urlencode({k: v for k, v in {"state": state, "limit": limit}.items() if v is not None})
        return self._json("GET", f"/jobs?{query}", retry=True)["jobs"]

    def cancel(self, job_id: str) -> dict:
        return self._json("POST", f"/jobs/{_quote(job_id)}/cancel", retry=True)

    def push(self, job_id: str, destination: str) -> dict:
        """Send a finished job's SC + SEG to one of the engine's PACS destinations; returns the job with its report."""
        body = json.dumps({"destination": destination}).encode()
        return self._json("POST", f"/jobs/{_quote(job_id)}/push", body, {"Content-Type": "application/json"})

    def delete(self, job_id: str) -> None:
        with self._open("DELETE", f"/jobs/{_quote(job_id)}"):
            pass

    def shutdown(self) -> dict:
        return self._json("POST", "/shutdown")

    def wait(self, job_id: str, poll_interval: float = 0.5, callback=None, timeout: float | None = None) -> dict:
        """Poll until the job is final; ``callback(job)`` sees every status. Returns the final status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.status(job_id)
            if callback is not None:
                callback(job)
            if job["state"] in FINAL_STATES:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise EngineError(0, "timeout", f"The job {job_id} did not finish within {timeout:g} seconds.")
            time.sleep(poll_interval)

    def events(self, job_id: str):
        """Yield job status dicts pushed by the server (server-sent events) until a final state."""
        with self._open("GET", f"/jobs/{_quote(job_id)}/events", headers={"Accept": "text/event-stream"},
                        retry=True) as response:
            data = []  # the event name is not needed: every event carries the job status as JSON
            for raw in response:
                line = raw.decode("utf-8").rstrip("\r\n")
                if line.startswith(":"):
                    continue
                if line.startswith("data:"):
                    data.append(line[5:].strip())
                elif not line and data:
                    payload = json.loads("\n".join(data))
                    data = []
                    if "state" in payload:
                        yield payload
                    if payload.get("state") in FINAL_STATES or "state" not in payload:
                        return

    def download(self, job_id: str, name: str, dest) -> Path:
        """Save one result file (a name from the job's ``files``) to ``dest`` (a file or a directory)."""
        dest = Path(dest)
        if dest.is_dir():
            dest = dest / PurePosixPath(name).name
        with self._open("GET", f"/jobs/{_quote(job_id)}/files/{_quote(name, safe='/')}", retry=True) as response:
            _save_stream(response, dest)
        return dest

    def download_all(self, job_id: str, dest_dir) -> list:
        """Download result.zip and extract it into ``dest_dir``; refuses unsafe member names."""
        dest_dir = Path(dest_dir)
        dest_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="xreal-download-") as tmp:
            zip_path = Path(tmp) / "result.zip"
            with self._open("GET", f"/jobs/{_quote(job_id)}/result.zip", retry=True) as response:
                _save_stream(response, zip_path)
            return extract_zip_safely(zip_path, dest_dir)

    # -- batches (many jobs from one manifest; the engine's batch endpoints) ---------------------------
    def submit_batch(self, manifest=None, rows=None, *, formats=None, quality_check: bool | None = None,
                     min_dice: float | None = None, request_id: str | None = None) -> dict:
        """Queue one job per manifest row, all or none; returns the batch status dict.

        Either ``manifest``, a ``.csv`` / ``.jsonl`` file in generate-batch's columns (the files it names,
        relative to it, are uploaded with it), or ``rows``, dicts of the JSONL form (``name``, ``anatomy``,
        ``pathologies`` [{"mask", "finding"}], ``image``, ``seed``, ``steps``, ...) naming local files. A value
        that is no existing file (a template name such as ``anatomy_01``) is left to the engine, which
        reports every bad row by number (EngineError 422 ``invalid_manifest``, ``rows`` in ``details``).
        ``formats``: exports in the dataset besides the results ("monai", "imagefolder", "nnunet").
        """
        if (manifest is None) == (rows is None):
            raise ValueError("Give submit_batch either a manifest file or rows.")
        with tempfile.TemporaryDirectory(prefix="xreal-batch-") as tmp:
            if manifest is not None:
                manifest = Path(manifest)
                files = [("file", manifest.parent / value, value) for value in _manifest_files(manifest)]
            else:
                manifest, files = _rows_manifest(rows, Path(tmp) / "manifest.jsonl")
            fields = {"formats": ",".join(formats) if formats else None,
                      "quality_check": None if quality_check is None else str(bool(quality_check)).lower(),
                      "min_dice": min_dice, "request_id": request_id or uuid.uuid4().hex}
            with MultipartBody([(k, v) for k, v in fields.items() if v is not None],
                               [("manifest", manifest, manifest.name), *files]) as body:
                self._check_upload_size(body.length)
                return self._json("POST", "/batches", body.stream, body.headers(), retry=True)

    def batch_status(self, batch_id: str) -> dict:
        """Counts (queued, running, succeeded, failed, dropped, cancelled), progress, ETA, and every row."""
        return self._json("GET", f"/batches/{_quote(batch_id)}", retry=True)

    def batches(self, limit: int = 100) -> list:
        return self._json("GET", f"/batches?limit={int(limit)}", retry=True)["batches"]

    def wait_batch(self, batch_id: str, poll_interval: float = 1.0, callback=None, timeout: float | None = None) -> dict:
        """Poll until every row is final (state finished or cancelled); ``callback(status)`` sees each status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.batch_status(batch_id)
            if callback is not None:
                callback(status)
            if status["state"] in BATCH_FINAL_STATES:
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise EngineError(0, "timeout", f"The batch {batch_id} did not finish within {timeout:g} seconds.")
            time.sleep(poll_interval)

    def cancel_batch(self, batch_id: str) -> dict:
        """Cancel the queued rows now and the running one within a diffusion step; returns the status."""
        return self._json("POST", f"/batches/{_quote(batch_id)}/cancel", retry=True)

    def delete_batch(self, batch_id: str) -> None:
        with self._open("DELETE", f"/batches/{_quote(batch_id)}"):
            pass

    def download_dataset(self, batch_id: str, dest_dir, timeout: float = 600.0) -> list:
        """A finished batch's dataset.zip (results, exports, dataset.json) extracted into ``dest_dir``.

        The engine builds the zip on the first request, hence the longer ``timeout``.
        """
        dest_dir = Path(dest_dir)
        dest_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="xreal-download-") as tmp:
            zip_path = Path(tmp) / "dataset.zip"
            with self._open("GET", f"/batches/{_quote(batch_id)}/dataset.zip", retry=True,
                            timeout=max(timeout, self.timeout)) as response:
                _save_stream(response, zip_path)
            return extract_zip_safely(zip_path, dest_dir)


BATCH_FINAL_STATES = ("finished", "cancelled")


def _manifest_files(manifest: Path) -> list:
    """The relative file names in a manifest that exist beside it (template names and the rest: the engine's)."""
    values = []
    if manifest.suffix.lower() == ".csv":
        import csv

        with open(manifest, newline="", encoding="utf-8-sig") as handle:
            for record in csv.DictReader(handle):
                values += [record.get("anatomy"), record.get("image"), *(record.get("pathology_masks") or "").split(";"),
                           *(_control_file(text) for text in (record.get("controls") or "").split(";"))]
    else:
        for line in manifest.read_text(encoding="utf-8-sig").splitlines():
            try:
                record = json.loads(line) if line.strip() else {}
            except ValueError:
                continue  # the engine reports the line by its number
            record = record if isinstance(record, dict) else {}
            pathologies = record.get("pathologies") if isinstance(record.get("pathologies"), list) else []
            controls = record.get("controls") if isinstance(record.get("controls"), list) else []
            values += [record.get("anatomy"), record.get("image"),
                       *(p.get("mask") for p in pathologies if isinstance(p, dict)), *map(_control_file, controls)]
    found = []
    for value in values:
        value = value.strip() if isinstance(value, str) else ""
        relative = PurePosixPath(value.replace("\\", "/"))
        if value and not relative.is_absolute() and ".." not in relative.parts and value not in found \
                and (manifest.parent / value).is_file():
            found.append(value)
    return found


def _control_file(control):
    """The file a manifest's control names: ``NAME:FILE[:SCALE]`` or ``{"file": FILE}`` (None for ``lungs``
    or a control the engine will refuse by its row)."""
    if isinstance(control, dict):
        return control.get("file")
    try:
        source = parse_control(control).source
    except XRealError:
        return None
    return None if source is None else str(source)


def _rows_manifest(rows, path: Path) -> tuple:
    """Rows naming local files -> (a JSONL manifest at ``path`` naming them by upload name, the file parts)."""
    uploads: dict = {}  # local path -> the name the manifest gives it

    def named(value):
        if not isinstance(value, (str, os.PathLike)) or not Path(value).is_file():
            return value  # a template name, or a missing file the engine reports by row
        local = str(Path(value).resolve())
        if local not in uploads:
            uploads[local] = f"f{len(uploads) + 1:04d}/{Path(local).name}"
        return uploads[local]

    lines = []
    for row in rows:
        row = dict(row)
        for key in ("anatomy", "image"):
            if row.get(key) is not None:
                row[key] = named(row[key])
        if row.get("pathologies"):
            row["pathologies"] = [{**p, "mask": named(p.get("mask"))} for p in row["pathologies"]]
        if row.get("controls"):  # (name, file or None, scale or None), as submit() takes them, or manifest forms
            row["controls"] = [{"name": c[0], "file": named(str(c[1])) if c[1] else None, "scale": c[2]}
                               if isinstance(c, (tuple, list)) else c for c in row["controls"]]
        lines.append(json.dumps(row))
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path, [("file", Path(local), name) for local, name in uploads.items()]


# ----------------------------------------------------------------------------- tokens


def is_loopback(hostname: str | None) -> bool:
    hostname = (hostname or "").strip("[]").lower()
    return hostname in ("localhost", "::1") or hostname.startswith("127.")


def _url_port(parsed) -> int | None:
    try:
        return parsed.port or (443 if parsed.scheme == "https" else 80)
    except ValueError:
        return None


def local_token_path(port: int) -> Path:
    """Where ``serve`` on this machine leaves the token it made up for ``port`` (only its user can read it)."""
    return Path.home() / ".config" / "xreal-engine" / "tokens" / f"engine-{int(port)}.token"


def read_token_file(path) -> str:
    """The token in a token file: its first line, stripped ('' if empty). OSError if it cannot be read."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return lines[0].strip() if lines else ""


def read_local_token(port: int) -> str | None:
    """The token of the local engine on ``port``, or None if it left none."""
    try:
        return read_token_file(local_token_path(port)) or None
    except (OSError, UnicodeDecodeError):
        return None


def write_local_token(port: int, token: str) -> Path:
    """Leave ``token`` for clients of the local engine on ``port``: a 0600 file in a 0700 folder, written atomically."""
    path = local_token_path(port)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if os.name != "nt":
        os.chmod(path.parent, 0o700)
    _save_stream(io.BytesIO((token + "\n").encode("utf-8")), path)  # mkstemp: mode 0600
    return path


def remove_local_token(port: int, token: str | None = None) -> None:
    """Remove the token file of ``port`` (only if it holds ``token``, when given: a later engine may own it)."""
    path = local_token_path(port)
    try:
        if token is None or read_token_file(path) == token:
            path.unlink()
    except OSError:
        pass


def new_token() -> str:
    return secrets.token_urlsafe(32)


def resolve_token(token: str | None, token_file, environ=None) -> tuple:
    """(token or None, warning or None) from --token, --token-file or $XREAL_ENGINE_TOKEN, in that order.

    A token on the command line is visible to every local user (``ps``): it works, with a warning.
    Raises ValueError (one sentence) for both options at once or an unreadable or empty file.
    """
    environ = os.environ if environ is None else environ
    if token is not None and token_file is not None:
        raise ValueError("Give the access token either with --token or with --token-file, not both.")
    if token_file is not None:
        try:
            token = read_token_file(token_file)
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"The token file {token_file} cannot be read ({getattr(error, 'strerror', None) or error}).") from None
        if not token:
            raise ValueError(f"The token file {token_file} is empty.")
        return token, _readable_by_others(token_file)
    if token is not None:
        return token, (f"--token puts the access token in the process list, visible to every user of this machine; "
                       f"set {TOKEN_ENVIRONMENT} or use --token-file instead.")
    return environ.get(TOKEN_ENVIRONMENT) or None, None


def _readable_by_others(token_file) -> str | None:
    """A warning when other local users can read the token file (they could then drive the engine)."""
    try:
        mode = os.stat(token_file).st_mode
    except OSError:
        return None
    if os.name != "posix" or not mode & 0o044:
        return None
    return (f"The token file {token_file} can be read by other users of this machine (mode {mode & 0o777:o}); "
            f"make it private with chmod 600.")


def extract_zip_safely(zip_path, dest_dir) -> list:
    """Extract regular files only, each inside ``dest_dir`` (no absolute paths, '..', drive letters or links)."""
    dest_dir = Path(dest_dir).resolve()
    written = []
    with zipfile.ZipFile(zip_path) as archive:
        for member in archive.infolist():
            if member.is_dir():
                continue
            parts = PurePosixPath(member.filename.replace("\\", "/")).parts
            is_link = (member.external_attr >> 16) & 0o170000 == 0o120000
            if (not parts or member.filename.startswith(("/", "\\")) or ".." in parts
                    or ":" in member.filename or is_link):
                raise EngineError(0, "unsafe_archive", f"The result archive holds an unsafe entry {member.filename!r}.")
            target = dest_dir.joinpath(*parts).resolve()
            if dest_dir not in target.parents:
                raise EngineError(0, "unsafe_archive", f"The result archive holds an unsafe entry {member.filename!r}.")
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(member) as source, open(target, "wb") as out:
                shutil.copyfileobj(source, out)
            written.append(target)
    return written


class MultipartBody:
    """A multipart/form-data body in a temporary file, so large uploads are not held in memory."""

    def __init__(self, fields, files):
        self.boundary = f"xreal-{uuid.uuid4().hex}"
        self.stream = tempfile.TemporaryFile()
        for name, value in fields:
            self._part(name, None, "text/plain; charset=utf-8")
            self.stream.write(str(value).encode("utf-8"))
            self.stream.write(b"\r\n")
        for name, path, *filename in files:  # (field, path) or (field, path, the part's filename)
            if not path.is_file():
                self.stream.close()
                if path.is_dir():
                    raise IsADirectoryError(f"The {name} file {path} is a directory, not a file.")
                raise FileNotFoundError(f"The {name} file {path} does not exist.")
            content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            if content_type not in ("image/png", "application/dicom"):
                content_type = "application/octet-stream"
            self._part(name, filename[0] if filename else path.name, content_type)
            with open(path, "rb") as source:
                shutil.copyfileobj(source, self.stream, 1 << 20)
            self.stream.write(b"\r\n")
        self.stream.write(f"--{self.boundary}--\r\n".encode())
        self.length = self.stream.tell()
        self.stream.seek(0)

    def _part(self, name: str, filename: str | None, content_type: str) -> None:
        disposition = f'form-data; name="{_header_safe(name)}"'
        if filename is not None:
            disposition += f'; filename="{_header_safe(filename)}"'
        self.stream.write(f"--{self.boundary}\r\nContent-Disposition: {disposition}\r\n"
                          f"Content-Type: {content_type}\r\n\r\n".encode("utf-8"))

    def headers(self) -> dict:
        return {"Content-Type": f"multipart/form-data; boundary={self.boundary}", "Content-Length": str(self.length)}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stream.close()
        return False


def _header_safe(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', "%22").replace("\r", " ").replace("\n", " ")


def _quote(text: str, safe: str = "") -> str:
    return urllib.parse.quote(str(text), safe=safe)


def _save_stream(response, dest: Path) -> None:
    """Write a response body to ``dest`` via a temp file, so a broken transfer leaves nothing half-written."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
        os.replace(tmp_name, dest)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _error_from_response(error) -> EngineError:
    """EngineError from an HTTP error response (the engine's JSON, or the bare status)."""
    try:
        payload = json.loads(error.read() or b"{}")
        details = dict(payload.get("error") or {})
        code, message = details.pop("code", None), details.pop("message", None)
    except (ValueError, AttributeError, OSError):
        code = message = details = None
    retry_after = error.headers.get("Retry-After") if error.headers else None
    try:
        retry_after = float(retry_after) if retry_after is not None else None
    except ValueError:
        retry_after = None
    return EngineError(error.code, code or f"http_{error.code}",
                       message or f"The engine answered HTTP {error.code} ({error.reason}).", retry_after, details)
