"""Crash-safe file primitives shared by storage, caches and downloads.

* :func:`atomic_write`: temporary file beside the target, ``fsync``, rename (or no-clobber hard link), ``fsync``
  of the folder — readers see the old content or the new, never a part, and the write survives a crash;
* :func:`make_dirs`: missing folders created, each flushed into its parent, so they survive a power loss too;
* :func:`file_lock`: an exclusive ``flock`` held across processes (and threads: one descriptor each);
* :func:`claim_file`: the same taken without waiting, for a process's lifetime, naming its holder.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (new names, renames) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: Path) -> None:
    """Create the folder ``path`` and its missing parents, flushing each new one into its parent (``fsync``).

    ``mkdir(parents=True)`` alone leaves a new folder's entry in the page cache: after a power loss the folder,
    and every file written into it since, may be gone although each file was flushed. An existing folder costs
    one ``stat``.
    """
    path = Path(path)
    missing: list[Path] = []
    while not path.is_dir():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder)
        except FileExistsError:
            if not folder.is_dir():
                raise
        fsync_dir(folder.parent)


def atomic_write(path: Path, data: bytes, *, exclusive: bool = False, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so that readers see the old content or the new, never a part.

    The bytes go to a unique temporary file beside ``path``, are flushed with ``fsync``, and the file is
    then renamed onto ``path`` (or, with ``exclusive=True``, hard-linked to it, which fails with
    :class:`FileExistsError` when ``path`` exists: no-clobber by construction). The folder is flushed last,
    so once this returns the write survives a crash or power loss.
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:  # a full disk or an I/O error: leave no partial temporary file behind
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    try:
        if exclusive:
            os.link(tmp, path)
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: object, **kwargs) -> None:
    """:func:`atomic_write` of ``obj`` as UTF-8 JSON."""
    atomic_write(path, json.dumps(obj, ensure_ascii=False, indent=1).encode("utf-8"), **kwargs)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if missing), held across processes: :func:`lock_descriptor`,
    waiting for it, released at the end of the block."""
    fd = lock_descriptor(path)
    try:
        yield
    finally:
        os.close(fd)


def lock_descriptor(path: Path, *, blocking: bool = True) -> int | None:
    """A descriptor holding an exclusive ``flock`` on the file now at ``path`` (created if missing), or None when
    ``blocking`` is false and another descriptor holds it. Closing the descriptor releases the lock.

    As :func:`file_lock`, plus a check that the locked file is still the one at ``path``, so that lock files may be
    deleted by whoever holds them (a pruner): a process that waited on a deleted file locks the new one instead of
    believing it holds the lock.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                return None
            held = os.fstat(fd)
            try:
                now = os.stat(path)
            except FileNotFoundError:
                now = None
        except BaseException:
            os.close(fd)
            raise
        if now is not None and (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
            return fd
        os.close(fd)  # the file was deleted while we waited: lock the one at path now


class ClaimedElsewhere(Exception):
    """:func:`claim_file` found the lock held; ``holder`` is what its holder wrote (``""`` if nothing)."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path} is held by {holder or 'another process'}")
        self.path, self.holder = path, holder


@contextlib.contextmanager
def claim_file(path: Path, holder: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) without waiting for it.

    While held, the file says ``holder`` (one line: who holds it, e.g. a pid and start time). The kernel
    releases the lock when the holder exits, however it exits (a killed process leaves no stale claim).
    Raises :class:`ClaimedElsewhere`, with the holder's line, when another descriptor holds it.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            with open(path, encoding="utf-8", errors="replace") as held:
                raise ClaimedElsewhere(path, held.read().strip()) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode("utf-8") + b"\n", 0)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
