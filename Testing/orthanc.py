"""A real Orthanc PACS for tests: started on free loopback ports, stopped after.

Uses the Debian ``orthanc`` and ``orthanc-dicomweb`` packages (``make system-deps``).
Each server gets its own temporary storage directory and JSON configuration, so
tests never touch a system Orthanc and leave nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import requests

ORTHANC_BINARY = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def orthanc_available() -> bool:
    """Whether the Orthanc binary and its DICOMweb plugin are installed."""
    return Path(ORTHANC_BINARY).is_file() and DICOMWEB_PLUGIN.is_file()


def free_port() -> int:
    """A TCP port on loopback that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class OrthancServer:
    """One Orthanc process with HTTP (REST + DICOMweb) and DICOM on loopback.

    ``modalities`` maps a name to ``(aet, host, port)``: DICOM peers that may query
    and retrieve (C-FIND / C-GET), as in a real PACS set-up.
    """

    def __init__(self, aet: str = "ORTHANC", username: str = "xreal", password: str = "test-password",
                 modalities: dict | None = None):
        self.aet = aet
        self.username = username
        self.password = password
        self.modalities = modalities or {}
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.work_dir = Path(tempfile.mkdtemp(prefix="xreal-orthanc-"))
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def auth(self) -> tuple[str, str]:
        return (self.username, self.password)

    @property
    def authorization_header(self) -> str:
        return requests.auth._basic_auth_str(self.username, self.password)

    def write_config(self) -> Path:
        config = {
            "Name": "xreal-test-orthanc",
            "StorageDirectory": str(self.work_dir / "storage"),
            "IndexDirectory": str(self.work_dir / "storage"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "DicomCheckCalledAet": True,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.username: self.password},
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
            "DicomModalities": {name: list(peer) for name, peer in self.modalities.items()},
            "DicomAlwaysAllowStore": True,
            "HttpDescribeErrors": True,
            "HttpThreadsCount": 4,
            "DicomThreadsCount": 2,
            "ConcurrentJobs": 1,
            "SaveJobs": False,
            "StableAge": 1,
            "DicomAssociationCloseDelay": 0,
        }
        path = self.work_dir / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        return path

    def start(self, timeout_s: float = 60.0) -> "OrthancServer":
        """Start Orthanc and wait until its REST API answers."""
        config_path = self.write_config()
        self.log_path = self.work_dir / "orthanc.log"
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([ORTHANC_BINARY, str(config_path)], stdout=log,
                                            stderr=subprocess.STDOUT, cwd=self.work_dir)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(f"{self.url}/system", auth=self.auth, timeout=2).ok:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {timeout_s} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """Stop the process (gracefully, then by force); keep the storage for a restart."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.work_dir, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # Small REST helpers for test set-up and checks (Orthanc's own API, not DICOMweb).
    def upload(self, path: Path) -> dict:
        response = requests.post(f"{self.url}/instances", data=Path(path).read_bytes(), auth=self.auth, timeout=30)
        response.raise_for_status()
        return response.json()

    def instance_count(self) -> int:
        response = requests.get(f"{self.url}/statistics", auth=self.auth, timeout=10)
        response.raise_for_status()
        return int(response.json()["CountInstances"])

    def __enter__(self) -> "OrthancServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()


@contextlib.contextmanager
def running_orthanc(**kwargs):
    """An Orthanc started for a ``with`` block (a module-scoped fixture); always cleaned up, also after a failed start."""
    server = OrthancServer(**kwargs)
    try:
        yield server.start()
    finally:
        server.cleanup()


def write_self_signed_certificate(path: Path, host: str = "127.0.0.1") -> Path:
    """A PEM file with a fresh self-signed certificate for ``host`` followed by its private key."""
    key, cert = path.with_suffix(".key"), path.with_suffix(".crt")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={host}",
                    "-addext", f"subjectAltName=IP:{host}", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    path.write_bytes(cert.read_bytes() + key.read_bytes())
    return path


@contextlib.contextmanager
def tls_proxy(target_port: int, certificate: Path):
    """HTTPS on a free loopback port in front of plain HTTP on ``target_port``; yields the port.

    Stands in for the nginx or load balancer that terminates TLS in front of a PACS. (Debian's
    Orthanc 1.10 has its own ``SslEnabled``, but that build crashes on the first TLS request.)
    """
    import socketserver
    import ssl
    import threading

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(certificate))

    def pipe(source, sink):
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    class Relay(socketserver.BaseRequestHandler):
        def handle(self):
            try:
                client = context.wrap_socket(self.request, server_side=True)
            except (ssl.SSLError, OSError):
                return  # the client did not trust us: that is what some tests check
            with client, socket.create_connection(("127.0.0.1", target_port)) as upstream:
                back = threading.Thread(target=pipe, args=(upstream, client), daemon=True)
                back.start()
                pipe(client, upstream)
                back.join(30)

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Relay)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def write_dx(path, pixels, *, study=None, series=None, instance_number: int = 1, spacing_mm: float = 1.4,
             patient=("Test^Pacs", "PACS-TEST-1")):
    """Write a 12-bit DX For Presentation image (as a modality would send it) and return its dataset."""
    import numpy as np
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    pixels = np.asarray(pixels, dtype=np.uint16)
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient[0], patient[1], "", "O"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study or generate_uid(), series or generate_uid()
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "20260101", "120000", "1", "", ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "DX", 1, instance_number
    ds.Manufacturer, ds.PatientOrientation, ds.BodyPartExamined = "test", ["L", "F"], "CHEST"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType, ds.BurnedInAnnotation = "FOR PRESENTATION", "NO"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelSpacing = ds.ImagerPixelSpacing = [spacing_mm, spacing_mm]
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return ds
