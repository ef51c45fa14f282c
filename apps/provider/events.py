"""The session event log: every label, suggestion shown, accepted and corrected, appended crash-safely.

``annotations/sessions/<session_id>/events.jsonl``: one JSON object a line, written with a single
``write`` on an ``O_APPEND`` descriptor and flushed with ``fsync`` before the call returns. A crash can leave
at most a torn last line, which :meth:`EventLog.read` skips; every acknowledged event is readable.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from .storage import fsync_dir, make_dirs, utc_now

KINDS = ("label", "suggestion_shown", "suggestion_accepted", "suggestion_corrected", "retrain")
#: Event kinds that set a cell's label.
LABEL_KINDS = ("label", "suggestion_accepted", "suggestion_corrected")


class EventLog:
    """Append-only events of one session."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        make_dirs(self.path.parent)
        self._lock = threading.Lock()

    def append(self, kind: str, **fields) -> dict:
        """Record an event (``kind`` one of :data:`KINDS`) with a UTC time; returns it once it is on disk."""
        if kind not in KINDS:
            raise ValueError(f"unknown event kind {kind!r}")
        event = {"kind": kind, "time": utc_now(), **fields}
        line = (json.dumps(event, separators=(",", ":")) + "\n").encode("utf-8")
        with self._lock:
            created = not self.path.exists()
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
            if created:  # the new file's name must survive a power loss too
                fsync_dir(self.path.parent)
        return event

    def read(self) -> list[dict]:
        """Every complete event, in order (a torn last line from a crash is skipped)."""
        if not self.path.exists():
            return []
        events = []
        for line in self.path.read_bytes().split(b"\n"):
            if not line.strip():
                continue
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
        return events
