"""Run outputs: metrics.jsonl (one JSON object per line, flushed as written) and summary.json."""

from __future__ import annotations

import json
import os
import re
import resource
from pathlib import Path


TARGETS = (0.93, 0.98)  # test accuracies whose time-to-reach a run summary records


class MetricsWriter:
    def __init__(self, path: Path, append: bool = False):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a" if append else "w", buffering=1)  # line-buffered: a crash loses at most the last line

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")

    def flush(self) -> int:
        """Flush to the OS; returns the file's length (where a restarted writer continues)."""
        self._file.flush()
        return self._file.tell()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_json(path: Path, obj: dict) -> None:
    """Atomically write a JSON file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def rss_mb() -> float:
    """This process's resident memory now, in MB (Linux /proc; 0 where it is not available)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 0.0
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


def reset_peak_rss() -> None:
    """Restart this process's peak-RSS mark (Linux: clear_refs 5), so `peak_rss_mb` covers only what follows,
    not the import-time spikes before it. A no-op where the kernel does not offer it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """Peak resident memory in MB since the process started or since `reset_peak_rss` (Linux VmHWM)."""
    try:
        match = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
    except OSError:
        match = None
    kb = int(match.group(1)) if match else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kb / 1024, 1)


class PeakMemory:
    """A process's peak RSS over its whole life, and separately from the start of training on, so that what
    training adds (activations, optimizer state, queued messages) is not hidden under import-time spikes."""

    def __init__(self):
        self.before: float | None = None  # peak before training started
        self.start: float | None = None  # RSS when training started
        self.train_peak: float | None = None  # peak from then until the first evaluation

    def training_starts(self) -> None:
        if self.start is None:
            self.before, self.start = peak_rss_mb(), rss_mb()
            reset_peak_rss()

    def training_pauses(self) -> None:
        """Training is over for now (an evaluation comes): the training peak is what was reached so far."""
        if self.start is not None and self.train_peak is None:
            self.train_peak = peak_rss_mb()

    def report(self) -> dict:
        now = peak_rss_mb()
        train_peak = self.train_peak if self.train_peak is not None else (now if self.start is not None else None)
        return {"peak_rss_mb": max(now, self.before or 0.0), "rss_start_mb": self.start, "train_peak_rss_mb": train_peak}
