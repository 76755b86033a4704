"""What ``serve`` is configured with, and the service's fixed limits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..model.loading import AUTO_RUNTIME

API_PREFIX = "/api/v1"
DEFAULT_PORT = 8000  # the Slicer module's default remote URL is http://127.0.0.1:8000
DEFAULT_DATA_DIR = Path("xreal-engine-data")
DEFAULT_MAX_UPLOAD_BYTES = 100 * 1024 * 1024
DEFAULT_MAX_QUEUED_JOBS = 16
DEFAULT_RETENTION_HOURS = 72.0
MAX_PATHOLOGIES = 16
# Every request body but a job's (push's {"destination": ...} is a few bytes) is refused above this.
MAX_SMALL_BODY_BYTES = 16 * 1024
# Less free space than this on the data directory's disk counts as full: the engine reports itself
# unhealthy and refuses new jobs instead of failing them half-way.
MIN_FREE_BYTES = 1024 * 1024
# Host names that always reach a loopback engine (a Host header naming anything else is refused).
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
# The request header that marks a state-changing request as coming from a program, not a web page:
# a browser cannot send it cross-origin without a CORS preflight, which this engine never grants.
CLIENT_HEADER = "X-XReal-Client"


@dataclass
class ServiceSettings:
    """Everything ``serve`` is configured with."""

    model: str = "demo"
    device: str = "auto"
    dtype: str = "auto"
    # model/loading.py UNET_RUNTIMES: eager (--eager), frozen (--freeze), compiled (--compile), or AUTO_RUNTIME
    # (frozen for a small UNet on a CPU, else eager: what serve and generate-batch run without a flag)
    unet_runtime: str = AUTO_RUNTIME
    data_dir: Path = DEFAULT_DATA_DIR
    token: Optional[str] = None
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_queued_jobs: int = DEFAULT_MAX_QUEUED_JOBS
    retention_hours: float = DEFAULT_RETENTION_HOURS
    pacs_config: Optional[Path] = None
    host: str = "127.0.0.1"  # the address listened on: decides which Host headers are accepted
    allowed_hosts: tuple = ()  # further host names clients use (--allow-host); "*" accepts any
    allowed_origins: tuple = ()  # web origins allowed to call the API from a browser (--allow-origin)

    def web_origins(self) -> tuple:
        """--allow-origin as browsers send an Origin (lower case, no trailing '/'): the guard and CORS
        compare a request's Origin with these exactly, so both agree on every origin."""
        return tuple(dict.fromkeys(origin.rstrip("/").lower() for origin in self.allowed_origins))

    def accepted_hosts(self) -> tuple:
        """Host names a request may address: the bound address, loopback names on loopback, --allow-host.

        A wildcard bind (0.0.0.0, ::) accepts any name unless --allow-host lists them: the
        token, mandatory there, already protects it from rebinding pages.
        """
        bound = self.host.strip("[]").lower()
        if bound in ("0.0.0.0", "::", "") and not self.allowed_hosts:
            return ("*",)
        names = {bound, *(h.strip("[]").lower() for h in self.allowed_hosts)}
        if bound in LOOPBACK_HOSTS or bound.startswith("127."):
            names.update(LOOPBACK_HOSTS)
        return tuple(sorted(names))
