"""What ``serve`` is configured with, and the service's fixed limits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

API_PREFIX = "/api/v1"
DEFAULT_PORT = 8000  # the Slicer module's default remote URL is http://127.0.0.1:8000
DEFAULT_DATA_DIR = Path("xreal-engine-data")
DEFAULT_MAX_UPLOAD_BYTES = 100 * 1024 * 1024
DEFAULT_MAX_QUEUED_JOBS = 16
DEFAULT_RETENTION_HOURS = 72.0
MAX_PATHOLOGIES = 16


@dataclass
class ServiceSettings:
    """Everything ``serve`` is configured with."""

    model: str = "demo"
    device: str = "auto"
    dtype: str = "auto"
    data_dir: Path = DEFAULT_DATA_DIR
    token: Optional[str] = None
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_queued_jobs: int = DEFAULT_MAX_QUEUED_JOBS
    retention_hours: float = DEFAULT_RETENTION_HOURS
    pacs_config: Optional[Path] = None
