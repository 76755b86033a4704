"""What a generate-batch run reports as it goes: ``OUT/failures.csv`` and the progress bar."""

from __future__ import annotations

import csv
import io
import sys
import time
from pathlib import Path

from .exports import write_text_atomic


class FailureLog:
    """failures.csv: the latest failed or dropped attempt of each row that is not finished, rewritten whole."""

    COLUMNS = ("row", "name", "kind", "reason")

    def __init__(self, path: Path, unfinished: set):
        self.path = Path(path)
        self.entries = {}
        if self.path.is_file():
            with self.path.open(newline="") as handle:
                for entry in csv.DictReader(handle):
                    if entry.get("name") in unfinished:
                        self.entries[entry["name"]] = entry
        self._save()

    def record(self, outcome: dict) -> None:
        if outcome["status"] == "finished":
            if self.entries.pop(outcome["name"], None) is not None:
                self._save()
            return
        self.entries[outcome["name"]] = {"row": outcome["row"], "name": outcome["name"], "kind": outcome["status"],
                                         "reason": outcome["reason"]}
        self._save()

    def _save(self) -> None:
        if not self.entries and not self.path.exists():
            return
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.COLUMNS, lineterminator="\n")
        writer.writeheader()
        for entry in sorted(self.entries.values(), key=lambda e: int(e["row"])):
            writer.writerow({key: entry[key] for key in self.COLUMNS})
        write_text_atomic(self.path, buffer.getvalue())


class Progress:
    """One tqdm bar on stderr: rows done (finished + failed + dropped), failures, images per minute, ETA."""

    def __init__(self, total: int, done: int, enabled: bool = True):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=done, unit="row", desc="generate-batch", file=sys.stderr,
                        disable=not enabled, dynamic_ncols=True)
        self.started = time.monotonic()
        self.attempted = self.finished = self.failed = self.dropped = 0

    def count(self, outcome: dict) -> None:
        self.attempted += 1
        status = outcome["status"]
        self.finished += status == "finished"
        self.failed += status == "failed"
        self.dropped += status == "dropped"

    def update(self, outcome: dict) -> None:
        self.count(outcome)
        self.bar.set_postfix_str(f"failed {self.failed}, dropped {self.dropped}, {self.rate():.1f} img/min",
                                 refresh=False)
        self.bar.update(1)

    def seconds(self) -> float:
        return time.monotonic() - self.started

    def rate(self) -> float:
        return 60.0 * self.finished / max(self.seconds(), 1e-9)

    def close(self) -> None:
        self.bar.close()
