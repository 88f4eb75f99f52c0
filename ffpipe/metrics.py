"""Run outputs: metrics.jsonl (one JSON object per line, flushed as written) and summary.json."""

from __future__ import annotations

import json
import os
from pathlib import Path


TARGETS = (0.93, 0.98)  # test accuracies whose time-to-reach a run summary records


class MetricsWriter:
    def __init__(self, path: Path, append: bool = False):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a" if append else "w", buffering=1)  # line-buffered: a crash loses at most the last line

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")

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
