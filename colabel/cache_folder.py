"""A folder of cache files kept within a byte budget, least recently used deleted first, safe across processes.

Each entry is one file ``<key><suffix>`` (``.npz``, ``.npy``, ``.pkl``) written atomically by its owner (temporary
file, ``fsync``, rename). :meth:`CacheFolder.prune`, called by the owner after each write, deletes the least
recently used files until the folder's files of that suffix fit ``max_bytes``. A file's mtime is its last use: its
owner calls :meth:`CacheFolder.touch` on every hit (``os.utime``; atime is unreliable, often ``noatime``).

Never deleted: the file just written (``keep``), and a file whose ``<key>.lock`` another process or thread holds
(:meth:`CacheFolder.key_lock`, taken while the entry is computed or rewritten). A deleted file's ``<key>.lock``
goes with it; :func:`~colabel.files.lock_descriptor` re-checks that the lock file it holds is still the one in the
folder, so that removal cannot let two processes compute one key at once. Every process sharing the folder prunes,
and tolerates files another one deleted meanwhile. Deleting a cache file is never an error for its readers: a
missing entry is computed again.

Temporary files (hidden, ``.<key>.<random>...part`` or ``.tmp``) left by a writer that was killed mid-write (SIGKILL,
OOM) are not entries and are not counted: the owner removes a key's with :meth:`CacheFolder.remove_partial` while it
holds the key's lock (nobody else writes them then), and :meth:`CacheFolder.prune` removes any not modified for
:data:`STALE_TEMPORARY_S` seconds (a write in progress keeps changing its file).

Used by the SAM embedding store, the nucleus result cache and the HALS feature store.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from colabel.errors import InvalidInputError, shown
from colabel.files import file_lock, lock_descriptor

__all__ = ["CacheFolder", "CachedFile", "STALE_TEMPORARY_S", "check_budget"]

#: ``(mtime_ns, key, size_bytes)`` of one cache file.
CachedFile = tuple[int, str, int]

#: A temporary file (``.<key>.*.part`` / ``.tmp``) not modified for this long is a killed writer's: :meth:`prune`
#: removes it.
STALE_TEMPORARY_S = 600.0

#: Temporary-file endings of the writers of the cache folders (SAM embeddings, nucleus results, HALS features).
TEMPORARY_SUFFIXES = (".part", ".tmp")

logger = logging.getLogger(__name__)


def check_budget(name: str, value: int | None) -> int | None:
    """``value`` as a byte budget: a non-negative int, or None; 0 and None mean unbounded (returned as None).

    Raises InvalidInputError naming ``name`` for anything else (a bool, a float, a negative number).
    """
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidInputError(f"{name} must be a non-negative int (bytes) or None, got {shown(value)}")
    return value or None


def _is_plain_key(stem: str) -> bool:
    return 0 < len(stem) <= 200 and not stem.startswith(".") and all(c.isalnum() or c in "-_." for c in stem)


class CacheFolder:
    """The files ``<key><suffix>`` of one folder, kept within ``max_bytes``.

    Parameters
    ----------
    folder : path-like
        Created if missing.
    suffix : str
        The entries' file suffix, with its dot (``".npz"``). Other files of the folder are neither counted nor
        deleted, nor are hidden ones (temporary files start with a dot).
    max_bytes : int or None
        Budget of the entries' sizes together, in bytes; None or 0: unbounded (:meth:`prune` does nothing).
    is_key : callable, optional
        ``(stem) -> bool``: which file stems are entries (default: 1-200 letters, digits, ``-``, ``_``, ``.``).
    """

    def __init__(self, folder: str | os.PathLike, suffix: str, max_bytes: int | None, *,
                 is_key: Callable[[str], bool] = _is_plain_key) -> None:
        if not suffix.startswith(".") or suffix == ".lock":
            raise ValueError(f"suffix must start with a dot and not be .lock, got {suffix!r}")
        self.folder = Path(folder).expanduser()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.suffix = suffix
        self.max_bytes = check_budget("max_bytes", max_bytes)
        self.is_key = is_key
        self._prune_lock = threading.Lock()
        self._swept = -float("inf")  # time.monotonic() of the last sweep of stale temporary files

    def path(self, key: str) -> Path:
        """The entry's file (it may not exist)."""
        return self.folder / f"{key}{self.suffix}"

    def lock_path(self, key: str) -> Path:
        return self.folder / f"{key}.lock"

    def key_lock(self, key: str) -> contextlib.AbstractContextManager[None]:
        """Hold ``<key>.lock`` (blocking) while the entry is computed or written: the pruner leaves it alone."""
        return file_lock(self.lock_path(key))

    @staticmethod
    def touch(path: Path) -> None:
        """Mark ``path`` as used now (its mtime orders pruning); a file pruned meanwhile is no error."""
        with contextlib.suppress(OSError):
            os.utime(path)

    def scan(self) -> tuple[list[CachedFile], set[str]]:
        """``([(mtime_ns, key, size) of each entry], {keys of .lock files})``; files vanishing meanwhile are
        skipped, as are hidden files and names that are not keys."""
        files: list[CachedFile] = []
        locks: set[str] = set()
        try:
            entries = list(os.scandir(self.folder))
        except FileNotFoundError:
            return files, locks
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            if name.endswith(".lock"):
                stem, is_lock = name[: -len(".lock")], True
            elif name.endswith(self.suffix):
                stem, is_lock = name[: -len(self.suffix)], False
            else:
                continue
            if not self.is_key(stem):
                continue
            if is_lock:
                locks.add(stem)
                continue
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue
            files.append((st.st_mtime_ns, stem, st.st_size))
        return files, locks

    def remove_partial(self, key: str) -> int:
        """Delete the temporary files of ``key`` (``.<key>.*.part`` / ``.tmp``) that a writer killed mid-write left.

        Call it holding :meth:`key_lock` (``key``'s writers write only under it, so none is in use). Returns the
        files deleted."""
        removed = 0
        for suffix in TEMPORARY_SUFFIXES:
            for path in self.folder.glob(glob.escape(f".{key}.") + "*" + suffix):
                with contextlib.suppress(OSError):
                    path.unlink()
                    removed += 1
                    logger.info("removed %s, left by an interrupted write", path)
        return removed

    def remove_stale_temporaries(self, max_age_s: float = STALE_TEMPORARY_S) -> int:
        """Delete the folder's temporary files (hidden, ending ``.part`` or ``.tmp``) not modified for ``max_age_s``
        seconds: writers killed mid-write left them. Returns the files deleted."""
        removed = 0
        oldest = time.time() - max_age_s
        try:
            entries = list(os.scandir(self.folder))
        except FileNotFoundError:
            return 0
        for entry in entries:
            if not (entry.name.startswith(".") and entry.name.endswith(TEMPORARY_SUFFIXES)):
                continue
            with contextlib.suppress(OSError):
                if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < oldest:
                    os.unlink(entry.path)
                    removed += 1
                    logger.info("removed %s, left by an interrupted write", entry.path)
        return removed

    def total_bytes(self) -> int:
        """Bytes of the entries in the folder now (every process's)."""
        return sum(size for _, _, size in self.scan()[0])

    def remove_unused(self, key: str, mtime_ns: int | None) -> bool | None:
        """Delete the entry and its ``<key>.lock`` unless another holder has the lock, or the entry was used since
        it was seen with ``mtime_ns`` (None: remove only a ``.lock`` whose entry is missing).

        Returns True when this call deleted the entry (for a stale lock: the lock), False when the entry was gone
        already (another process pruned it after the scan; its lock is removed), None when kept.
        """
        path, lock_path = self.path(key), self.lock_path(key)
        try:
            fd = lock_descriptor(lock_path, blocking=False)
        except OSError:
            return None
        if fd is None:  # being computed or written by another process or thread
            return None
        try:
            try:
                st = os.stat(path)
            except FileNotFoundError:
                st = None
            if mtime_ns is None:
                if st is not None:  # written since the scan: not stale
                    return None
            else:
                if st is None:  # deleted by another process meanwhile: its bytes are gone too
                    lock_path.unlink(missing_ok=True)
                    return False
                if st.st_mtime_ns != mtime_ns:  # read or rewritten since the scan: recently used
                    return None
                path.unlink(missing_ok=True)
            lock_path.unlink(missing_ok=True)  # while held: see lock_descriptor
            return True
        except OSError:
            return None
        finally:
            os.close(fd)

    def prune(self, keep: str | None = None, *, on_gone: Callable[[str], None] | None = None) -> int:
        """Delete least recently used entries (and their ``.lock``) until the folder's entries fit ``max_bytes``;
        also remove ``.lock`` files left without an entry. Never deletes ``keep``, nor an entry whose lock another
        holder has. Bounded or not, it first removes stale temporary files (:meth:`remove_stale_temporaries`, at
        most once a minute per instance).

        ``on_gone(key)`` is called for each entry no longer on disk (deleted by this call or, after the scan, by
        another process), so that the owner drops it from its memory cache.

        Returns
        -------
        removed : int
            Entries this call deleted.
        """
        if time.monotonic() - self._swept >= 60.0:
            self._swept = time.monotonic()
            self.remove_stale_temporaries()
        if not self.max_bytes:
            return 0
        with self._prune_lock:  # this process's writers prune one at a time (other processes may too)
            files, locks = self.scan()
            for stale in locks - {key for _, key, _ in files} - {keep}:
                self.remove_unused(stale, None)
            total = sum(size for _, _, size in files)
            removed = 0
            for mtime_ns, key, size in sorted(files):  # oldest use first
                if total <= self.max_bytes:
                    break
                if key == keep:
                    continue
                outcome = self.remove_unused(key, mtime_ns)
                if outcome is not None:
                    total -= size
                    removed += bool(outcome)
                    if on_gone is not None:
                        on_gone(key)
            return removed

    def __repr__(self) -> str:
        return f"CacheFolder({str(self.folder)!r}, {self.suffix!r}, max_bytes={self.max_bytes})"
