"""Append-only JSON-lines audit log, safe across LitServe's worker processes.

Each record is serialised to one line and written with a single `os.write` on an O_APPEND
descriptor while holding an exclusive `flock`, so concurrent writers (several inference worker
processes) never lose or interleave lines. A file renamed or removed by log rotation is reopened at the
next record. Records carry hashes and results, never pixels.
"""
from __future__ import annotations

import fcntl
import json
import os
import threading
from datetime import datetime, timezone
from pathlib import Path


class AuditLog:
    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path else None
        self._fd: int | None = None
        self._pid: int | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # descriptors and locks never cross process boundaries
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def ensure_writable(self) -> None:
        """Create the log now, so that a path that cannot be written stops the server at start instead of
        failing every prediction."""
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640))
        except OSError as exc:
            raise ValueError(f"audit log {self.path} cannot be written ({exc}); fix server.audit_log") from exc

    def _descriptor(self) -> int:
        if self._fd is not None and self._pid == os.getpid():  # this process's own descriptor
            if not self._moved():
                return self._fd
            os.close(self._fd)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._pid = os.getpid()
        return self._fd

    def _moved(self) -> bool:
        """The open file is no longer the one at `path` (logrotate renamed or removed it): reopen, as the standard
        library's WatchedFileHandler does, so no line goes to a renamed or deleted file after rotation."""
        try:
            at_path = os.stat(self.path)
        except FileNotFoundError:
            return True
        held = os.fstat(self._fd)
        return (at_path.st_dev, at_path.st_ino) != (held.st_dev, held.st_ino)

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        record = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), **record}
        line = (json.dumps(record, separators=(",", ":"), default=float) + "\n").encode()
        with self._lock:
            fd = self._descriptor()
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                view = memoryview(line)
                while view:  # os.write may be partial in theory; finish the line under the lock
                    view = view[os.write(fd, view):]
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
