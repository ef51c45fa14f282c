"""Model weights: download once, verify, cache, never trust a partial file.

:func:`fetch` is shared by every model colabel serves. A file is only ever placed at its final cache path
by an atomic :func:`os.replace` of a fully downloaded, checksum-verified, fsync'ed temporary file in the
same folder, so a crash, a dropped connection or a wrong checksum leaves nothing that a later call could
mistake for the weights. Two processes fetching the same file serialise on an ``fcntl`` lock file next
to it: one downloads, the other waits and then finds the verified file in the cache.

Checksums are written ``"sha256:<hex>"`` or ``"xxh128:<hex>"`` (micro-sam publishes xxh128 hashes, see
``xxh128sum``); ``None`` skips verification.

The default cache folder is ``$COLABEL_CACHE_DIR`` when set, else ``~/.cache/colabel/weights``.

No ray or hypha_rpc import here: this is plain model-side code.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path
from urllib.parse import unquote, urlparse

from colabel.errors import ColabelError, InvalidInputError, NotFoundError
from colabel.files import file_lock

__all__ = [
    "WeightsUnavailableError",
    "ChecksumMismatchError",
    "default_cache_dir",
    "fetch",
    "file_checksum",
    "verify_checksum",
    "require_local",
]

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20
_ALGORITHMS = ("sha256", "xxh128")

# Files verified by this process: (path, size, mtime_ns, checksum). Re-hashing a 2.5 GB checkpoint on
# every load costs seconds; a changed size or mtime (a rewrite, a corruption by another tool) misses.
_verified: set[tuple[str, int, int, str]] = set()
_verified_lock = threading.Lock()


class WeightsUnavailableError(ColabelError):
    """Weights that could not be obtained: the download failed, was cut short, or did not verify."""


class ChecksumMismatchError(WeightsUnavailableError):
    """A downloaded or cached file whose checksum is not the published one."""


def default_cache_dir() -> Path:
    """``$COLABEL_CACHE_DIR`` if set, else ``~/.cache/colabel/weights`` (not created here)."""
    env = os.environ.get("COLABEL_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "colabel" / "weights"


def _parse_checksum(checksum: str) -> tuple[str, str]:
    algorithm, sep, digest = checksum.partition(":")
    algorithm = algorithm.strip().lower()
    digest = digest.strip().lower()
    if not sep or algorithm not in _ALGORITHMS or not digest or any(c not in "0123456789abcdef" for c in digest):
        raise InvalidInputError(
            f"checksum {checksum!r} must be 'sha256:<hex>' or 'xxh128:<hex>'"
        )
    return algorithm, digest


def _hasher(algorithm: str):
    if algorithm == "sha256":
        return hashlib.sha256()
    try:
        import xxhash
    except ImportError:  # pragma: no cover - xxhash is a dependency of the sam extra
        raise WeightsUnavailableError(
            "verifying an xxh128 checksum needs the 'xxhash' package: pip install xxhash"
        ) from None
    return xxhash.xxh128()


def file_checksum(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Checksum of a file as ``"<algorithm>:<hex>"`` (``algorithm`` is ``sha256`` or ``xxh128``)."""
    if algorithm not in _ALGORITHMS:
        raise InvalidInputError(f"checksum algorithm must be one of {', '.join(_ALGORITHMS)}, got {algorithm!r}")
    h = _hasher(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return f"{algorithm}:{h.hexdigest()}"


def verify_checksum(path: str | os.PathLike, checksum: str | None) -> bool:
    """True when *path* exists and matches *checksum* (always True for an existing file and ``None``)."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        return False
    if checksum is None:
        return path.is_file()
    algorithm, digest = _parse_checksum(checksum)
    memo = (str(path.resolve()), st.st_size, st.st_mtime_ns, f"{algorithm}:{digest}")
    with _verified_lock:
        if memo in _verified:
            return True
    ok = file_checksum(path, algorithm) == f"{algorithm}:{digest}"
    if ok:
        with _verified_lock:
            _verified.add(memo)
    return ok




def _local_source(url: str) -> Path | None:
    """The local path behind a ``file://`` URL or a plain path; None for a remote URL."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if not parsed.scheme or (len(parsed.scheme) == 1 and os.name == "nt"):  # a path, or C:\ on Windows
        return Path(url).expanduser()
    return None


def _default_filename(url: str) -> str:
    name = Path(unquote(urlparse(url).path)).name
    if not name or name in ("download", "file", "files"):
        name = f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{name or 'weights'}"
    return name


def _unavailable(model: str | None, url: str, reason: str) -> WeightsUnavailableError:
    what = f"the weights of model {model!r}" if model else "model weights"
    return WeightsUnavailableError(
        f"Could not obtain {what} from {url} ({reason}); download the file yourself and point the "
        f"configuration at the local checkpoint file instead (e.g. checkpoints={{{model or 'model_id'!r}: "
        f"'/path/to/checkpoint.pt'}})."
    )


def _download(url: str, dest, *, model: str | None, progress: bool, timeout: float) -> None:
    """Stream *url* into the open binary file *dest*; raise WeightsUnavailableError on any failure."""
    import httpx
    from tqdm.auto import tqdm

    try:
        with httpx.stream(
            "GET", url, follow_redirects=True, timeout=httpx.Timeout(timeout, connect=min(timeout, 15.0))
        ) as response:
            if response.status_code != 200:
                raise _unavailable(model, url, f"HTTP status {response.status_code}")
            total = response.headers.get("content-length")
            total = int(total) if total and total.isdigit() else None
            with tqdm(
                total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress,
                desc=f"downloading {model or Path(urlparse(url).path).name}", leave=False,
            ) as bar:
                for chunk in response.iter_bytes(_CHUNK):
                    dest.write(chunk)
                    bar.update(len(chunk))
            received = response.num_bytes_downloaded  # bytes on the wire, what content-length counts
            if total is not None and received != total:
                raise _unavailable(model, url, f"the download stopped after {received} of {total} bytes")
    except httpx.HTTPError as exc:
        raise _unavailable(model, url, f"{type(exc).__name__}: {exc}") from None


def fetch(
    url: str,
    *,
    checksum: str | None,
    cache_dir: str | os.PathLike | None = None,
    filename: str | None = None,
    progress: bool = True,
    model: str | None = None,
    timeout: float = 60.0,
) -> Path:
    """Return the path of a verified local copy of *url*, downloading it once.

    Parameters
    ----------
    url : str
        ``http(s)://`` URL, ``file://`` URL or a plain local path (local files are copied into the cache).
    checksum : str or None
        ``"sha256:<hex>"`` or ``"xxh128:<hex>"``; None skips verification (a cached file is then trusted
        as soon as it exists: it can only have got there complete, by an atomic rename).
    cache_dir : path-like, optional
        Folder of the cache, created when missing; :func:`default_cache_dir` by default.
    filename : str, optional
        Name of the cached file; the last component of the URL path by default (URLs ending in a generic
        ``/download`` get a prefix derived from the whole URL, so two models never share a name).
    progress : bool, default True
        Show a tqdm progress bar (stderr) while downloading.
    model : str, optional
        Model id named in error messages.
    timeout : float, default 60
        Seconds without progress before a download is abandoned.

    Returns
    -------
    path : pathlib.Path
        ``cache_dir / filename``, complete and verified.

    Raises
    ------
    WeightsUnavailableError
        Network failure, HTTP error, truncated download, missing local file; the message names the model
        and URL and says that a local checkpoint file can be configured instead.
    ChecksumMismatchError
        The downloaded file does not match *checksum* (the file is deleted).
    InvalidInputError
        A malformed *checksum* or *filename*.

    Examples
    --------
    >>> path = fetch("https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
    ...              checksum="xxh128:6923c33df3637b6a922d7682bfc9a86b", model="sam_vit_b")  # doctest: +SKIP
    """
    if checksum is not None:
        _parse_checksum(checksum)
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    filename = filename or _default_filename(url)
    if "/" in filename or "\\" in filename or filename in (".", "..") or filename.startswith("."):
        raise InvalidInputError(f"filename {filename!r} must be a plain file name")
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / filename

    if verify_checksum(target, checksum):  # fast path, no lock: a file at target is always complete
        return target

    with file_lock(cache_dir / f".{filename}.lock"):
        if target.exists():
            if verify_checksum(target, checksum):  # another process finished while we waited
                return target
            logger.warning("cached %s does not match %s; downloading it again", target, checksum)
            target.unlink(missing_ok=True)

        fd, tmp_name = tempfile.mkstemp(dir=cache_dir, prefix=f".{filename}.", suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as dest:
                source = _local_source(url)
                if source is not None:
                    if not source.is_file():
                        raise _unavailable(model, url, f"no file at {source}")
                    with open(source, "rb") as src:
                        shutil.copyfileobj(src, dest, _CHUNK)
                else:
                    _download(url, dest, model=model, progress=progress, timeout=timeout)
                dest.flush()
                os.fsync(dest.fileno())
            if checksum is not None and not verify_checksum(tmp, checksum):
                algorithm, _ = _parse_checksum(checksum)
                raise ChecksumMismatchError(
                    f"the file downloaded for {model or 'the model'} from {url} has checksum "
                    f"{file_checksum(tmp, algorithm)}, not the expected {checksum}; it was deleted"
                )
            os.replace(tmp, target)
            with contextlib.suppress(OSError):  # make the rename itself durable
                dir_fd = os.open(cache_dir, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return target


def require_local(path: str | os.PathLike, *, model: str | None = None) -> Path:
    """Return *path* as a Path if it is an existing file, else raise :class:`NotFoundError`."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise NotFoundError(f"checkpoint file {str(p)!r} for model {model or '?'!r} does not exist")
    return p
