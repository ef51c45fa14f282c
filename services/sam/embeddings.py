"""Image embeddings computed once: an on-disk store plus a bounded in-memory LRU, safe across processes.

An embedding is a small dict of numpy arrays (features of each tile and the geometry needed to decode
them). It is stored as one ``.npz`` file per key, written to a temporary file in the same folder, fsync'ed
and renamed into place with :func:`os.replace`, so readers never see a partial file. When two processes
ask for the same missing key at once, the first takes an ``fcntl`` lock on ``<key>.lock`` and computes;
the second blocks on the lock, re-checks the disk after acquiring it, and loads the first one's result.

Keys come from :func:`embedding_key`: sha256 over the image bytes, shape and dtype, the model id, the
tile grid parameters and a format version, so the same pixels under another model or tiling never
collide, and a changed pixel always misses.

Bounds: the in-memory LRU holds at most ``max_items`` entries and ``max_bytes`` bytes of arrays (one SAM
ViT embedding is 4 MiB per tile, so one large tiled image can take hundreds of MiB). On disk, the ``.npz``
files of the folder are kept within ``max_disk_bytes`` (default :data:`DEFAULT_MAX_DISK_BYTES`, 20 GiB;
``None`` or 0: unbounded): after each write, the least recently used files are deleted until the folder is
within the budget. A file's mtime is its last use: writing it, reading it from disk, or a hit in any
process's memory LRU (``os.utime``; atime is unreliable, often ``noatime``/``relatime``). Never deleted:
the file just written, and a file whose ``<key>.lock`` another process or thread holds (being computed or
rewritten). A writer killed mid-write (SIGKILL, OOM) leaves its hidden ``.<key>.*.npz.part``: the next
computation of that key deletes it under the key's lock, and pruning deletes any not modified for 10 minutes
(:data:`colabel.cache_folder.STALE_TEMPORARY_S`). A deleted file's ``<key>.lock`` goes with it; locking
re-checks that the ``.lock`` it holds is still the one in the folder, so that removal cannot let two processes
compute one key at once. Every process sharing the folder prunes, and tolerates files another one deleted
meanwhile. Files may also be
deleted by hand at any time (e.g. ``find DIR -name '*.npz' -mtime +30 -delete``): a deleted embedding is
computed again by the next ``embed`` of its image (``segment`` with its id answers NotFoundError, and the
provider then sends the image again). ``computed.log`` grows by one line per encoder pass.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import zipfile
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from colabel.cache_folder import CacheFolder, check_budget
from colabel.errors import InvalidInputError

__all__ = ["EmbeddingStore", "embedding_key", "KEY_VERSION", "DEFAULT_MAX_BYTES", "DEFAULT_MAX_DISK_BYTES"]

#: Bumped whenever the meaning of a stored embedding changes (normalisation, layout).
KEY_VERSION = "colabel-sam-embedding-v1"

#: Default byte budget of the in-memory LRU of :class:`EmbeddingStore` (2 GiB: about 500 ViT tiles).
DEFAULT_MAX_BYTES = 2 << 30

#: Default byte budget of the ``.npz`` files on disk of :class:`EmbeddingStore` (20 GiB: about 5,000 ViT
#: tiles of 4 MiB, i.e. thousands of images up to 1024 px, or a few hundred large tiled ones, while leaving
#: room on a typical cache disk; one encoder pass, about 0.2 s on a GPU, recomputes an evicted one).
DEFAULT_MAX_DISK_BYTES = 20 << 30

Arrays = dict[str, np.ndarray]


def embedding_key(image: np.ndarray, model_id: str, *, extra: Mapping[str, object] | None = None) -> str:
    """A hex sha256 naming the embedding of *image* under *model_id*.

    Parameters
    ----------
    image : ndarray
        The raw image as given by the caller (any shape and dtype); its bytes, shape and dtype are hashed.
    model_id : str
    extra : mapping, optional
        Further parameters that change the embedding (e.g. ``{"tile_size": 1024, "overlap": 64}``);
        hashed in sorted key order.

    Examples
    --------
    >>> a = np.zeros((4, 4), np.uint8)
    >>> embedding_key(a, "m") == embedding_key(a.copy(), "m") != embedding_key(a, "n")
    True
    """
    image = np.asarray(image)
    h = hashlib.sha256()
    h.update(KEY_VERSION.encode())
    h.update(b"\0model\0" + model_id.encode())
    h.update(b"\0shape\0" + repr(tuple(image.shape)).encode())
    h.update(b"\0dtype\0" + image.dtype.str.encode())
    for k in sorted(extra or {}):
        h.update(f"\0{k}\0{extra[k]!r}".encode())
    h.update(b"\0data\0")
    h.update(memoryview(np.ascontiguousarray(image)).cast("B"))
    return h.hexdigest()


def _is_key(key: object) -> bool:
    return (isinstance(key, str) and 0 < len(key) <= 200 and not key.startswith(".")
            and all(c.isalnum() or c in "-_." for c in key))


def _check_key(key: str) -> str:
    if not _is_key(key):
        raise InvalidInputError(
            f"embedding key must be 1-200 characters of letters, digits, '-', '_', '.', got {key!r}"
        )
    return key


def _nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Bytes held by the arrays of one entry."""
    return sum(int(np.asarray(a).nbytes) for a in arrays.values())


class EmbeddingStore:
    """Embeddings on disk (one ``.npz`` per key) with a bounded in-memory LRU in front.

    Parameters
    ----------
    cache_dir : path-like
        Folder of the ``.npz`` files and their ``.lock`` files; created when missing. Several processes
        may share it.
    max_items : int, default 8
        In-memory LRU capacity in entries.
    max_bytes : int, default :data:`DEFAULT_MAX_BYTES` (2 GiB)
        In-memory LRU capacity in bytes of arrays (one SAM ViT embedding is 4 MiB per tile); least recently
        used entries are dropped until both bounds hold, and an entry larger than the budget is not kept in
        memory at all (it is read from disk when needed again).
    max_disk_bytes : int or None, default :data:`DEFAULT_MAX_DISK_BYTES` (20 GiB)
        Budget of the ``.npz`` files in *cache_dir*, enforced after each write by deleting the least recently
        used files (see :meth:`prune`); ``None`` or 0: unbounded. Processes sharing the folder should use
        the same budget (each enforces its own).

    Examples
    --------
    >>> store = EmbeddingStore(tmp_path)  # doctest: +SKIP
    >>> arrays = store.get_or_compute(key, lambda: {"features": encoder(image)})  # doctest: +SKIP
    >>> store.stats()  # doctest: +SKIP
    {'hits_memory': 0, 'hits_disk': 0, 'computed': 1}
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        *,
        max_items: int = 8,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_disk_bytes: int | None = DEFAULT_MAX_DISK_BYTES,
    ) -> None:
        for name, value in (("max_items", max_items), ("max_bytes", max_bytes)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidInputError(f"{name} must be a non-negative int, got {value!r}")
        self.cache_dir = Path(cache_dir).expanduser()
        self.disk = CacheFolder(self.cache_dir, ".npz", check_budget("max_disk_bytes", max_disk_bytes),
                                is_key=_is_key)
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._memory: OrderedDict[str, Arrays] = OrderedDict()
        self._memory_bytes = 0
        self._lock = threading.Lock()
        self._stats = {"hits_memory": 0, "hits_disk": 0, "computed": 0}
        self._log_lock = threading.Lock()
        self._log_seen = (0, 0)  # (inode, bytes of computed.log counted so far)
        self._log_counts: Counter[str] = Counter()

    # -- paths ------------------------------------------------------------------------------------

    def path(self, key: str) -> Path:
        """The ``.npz`` file of *key* (it may not exist)."""
        return self.cache_dir / f"{_check_key(key)}.npz"

    @property
    def max_disk_bytes(self) -> int | None:
        """Budget of the ``.npz`` files on disk in bytes (None: unbounded)."""
        return self.disk.max_bytes

    @max_disk_bytes.setter
    def max_disk_bytes(self, value: int | None) -> None:
        self.disk.max_bytes = check_budget("max_disk_bytes", value)

    # -- memory -----------------------------------------------------------------------------------

    def memory_bytes(self) -> int:
        """Bytes of arrays held by the in-memory LRU now."""
        with self._lock:
            return self._memory_bytes

    def _forget(self, key: str) -> None:
        """Drop *key* from memory (caller holds ``self._lock``)."""
        arrays = self._memory.pop(key, None)
        if arrays is not None:
            self._memory_bytes -= _nbytes(arrays)

    def _remember(self, key: str, arrays: Arrays) -> None:
        size = _nbytes(arrays)
        with self._lock:
            self._forget(key)
            if self.max_items == 0 or size > self.max_bytes:
                return
            self._memory[key] = arrays
            self._memory_bytes += size
            while len(self._memory) > self.max_items or self._memory_bytes > self.max_bytes:
                self._forget(next(iter(self._memory)))

    def _from_memory(self, key: str) -> Arrays | None:
        with self._lock:
            arrays = self._memory.get(key)
            if arrays is not None:
                self._memory.move_to_end(key)
                self._stats["hits_memory"] += 1
        if arrays is not None:
            self.disk.touch(self.path(key))  # a use here keeps the file from other processes' pruning too
        return arrays

    # -- disk -------------------------------------------------------------------------------------

    def _read(self, key: str) -> Arrays | None:
        path = self.path(key)
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {name: npz[name] for name in npz.files}
        except FileNotFoundError:
            return None
        except (OSError, ValueError, zipfile.BadZipFile, EOFError):
            # unreadable despite the atomic write (disk trouble, a foreign file): drop it and recompute
            path.unlink(missing_ok=True)
            return None
        self.disk.touch(path)
        return arrays

    def _write(self, key: str, arrays: Arrays) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=f".{key}.", suffix=".npz.part")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path(key))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # -- public -----------------------------------------------------------------------------------

    def get(self, key: str) -> Arrays | None:
        """The stored arrays of *key* from memory or disk, or None; never computes."""
        arrays = self._from_memory(key)
        if arrays is not None:
            return arrays
        arrays = self._read(key)
        if arrays is not None:
            with self._lock:
                self._stats["hits_disk"] += 1
            self._remember(key, arrays)
        return arrays

    def get_or_compute(
        self,
        key: str,
        compute_fn: Callable[[], Mapping[str, np.ndarray]],
        *,
        accept: Callable[[Arrays], bool] | None = None,
    ) -> Arrays:
        """Return the arrays of *key*, calling *compute_fn* only if no process has stored them yet.

        Parameters
        ----------
        key : str
            Letters, digits, ``-``, ``_``, ``.`` (e.g. from :func:`embedding_key`).
        compute_fn : callable
            ``() -> {name: ndarray}``; called at most once per key across all processes sharing
            *cache_dir* (while the result stays on disk). Arrays must not be object arrays.
        accept : callable, optional
            ``(arrays) -> bool``: stored arrays it rejects (e.g. a file of an older format) count as
            missing, and are computed again and replaced.

        Returns
        -------
        arrays : dict of str to ndarray
            Shared with the in-memory cache: treat as read-only.
        """

        def usable(found: Arrays | None) -> bool:
            return found is not None and (accept is None or bool(accept(found)))

        arrays = self.get(key)
        if usable(arrays):
            return arrays
        with self.disk.key_lock(_check_key(key)):
            arrays = self._read(key)  # someone else may have finished while we waited
            if usable(arrays):
                with self._lock:
                    self._stats["hits_disk"] += 1
                self._remember(key, arrays)
                return arrays
            self.disk.remove_partial(key)  # a writer killed mid-write left its .part: nobody writes it under the lock
            computed = compute_fn()
            if not isinstance(computed, Mapping) or not computed:
                raise InvalidInputError("compute_fn must return a non-empty mapping of names to arrays")
            arrays = {str(k): np.asarray(v) for k, v in computed.items()}
            self._write(key, arrays)
            self._log_computed(key)
            with self._lock:
                self._stats["computed"] += 1
        self._remember(key, arrays)
        self.prune(keep=key)
        return arrays

    # -- pruning ----------------------------------------------------------------------------------

    def disk_bytes(self) -> int:
        """Bytes of the ``.npz`` files in the folder now (all processes' files)."""
        return self.disk.total_bytes()

    def prune(self, keep: str | None = None) -> int:
        """Delete least recently used ``.npz`` files (and their ``.lock``) until the folder's ``.npz`` files fit
        ``max_disk_bytes`` (:meth:`CacheFolder.prune`); never *keep*, nor a file another holder has locked.
        Called after each write; a no-op when unbounded.

        Returns
        -------
        removed : int
            ``.npz`` files this call deleted.
        """

        def forget(key: str) -> None:
            with self._lock:
                self._forget(key)

        return self.disk.prune(keep, on_gone=forget)

    def _log_computed(self, key: str) -> None:
        """Append ``key`` to ``computed.log``: one line per encoder pass, from every process sharing the folder
        (appends of one short line are atomic), so replicas' passes can be counted together."""
        fd = os.open(self.cache_dir / "computed.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, f"{key}\n".encode())
        finally:
            os.close(fd)

    def computed_total(self, key: str | None = None) -> int:
        """Encoder passes recorded by every process sharing this folder (for ``key`` only, if given).

        Reads only what was appended to ``computed.log`` since the previous call (the whole file again if it
        was replaced or truncated)."""
        path = self.cache_dir / "computed.log"
        with self._log_lock:
            try:
                with open(path, "rb") as f:
                    st = os.fstat(f.fileno())
                    inode, offset = self._log_seen
                    if st.st_ino != inode or st.st_size < offset:  # a new or truncated log: count from the start
                        self._log_counts.clear()
                        offset = 0
                    f.seek(offset)
                    chunk = f.read(st.st_size - offset)
            except FileNotFoundError:
                self._log_seen, self._log_counts = (0, 0), Counter()
                return 0
            complete = chunk[: chunk.rfind(b"\n") + 1]  # a line being appended is counted next time
            self._log_counts.update(complete.decode(errors="replace").split())
            self._log_seen = (st.st_ino, offset + len(complete))
            return sum(self._log_counts.values()) if key is None else self._log_counts[key]

    def stats(self) -> dict[str, int]:
        """Counters since construction: ``hits_memory``, ``hits_disk``, ``computed`` (encoder passes)."""
        with self._lock:
            return dict(self._stats)

    def clear_memory(self) -> None:
        """Forget the in-memory entries (the files stay)."""
        with self._lock:
            self._memory.clear()
            self._memory_bytes = 0

    def __contains__(self, key: str) -> bool:
        with self._lock:
            if key in self._memory:
                return True
        return self.path(key).exists()

    def __repr__(self) -> str:
        return (f"EmbeddingStore({str(self.cache_dir)!r}, max_items={self.max_items}, max_bytes={self.max_bytes}, "
                f"max_disk_bytes={self.max_disk_bytes})")
