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
import glob
import hashlib
import logging
import os
import re
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
    "load_error_reason",
    "discard_unreadable",
]

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20
_ALGORITHMS = ("sha256", "xxh128")
#: Hex digits of a digest per algorithm (256 and 128 bits).
_DIGEST_LENGTHS = {"sha256": 64, "xxh128": 32}

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
    if len(digest) != _DIGEST_LENGTHS[algorithm]:
        raise InvalidInputError(
            f"checksum {checksum!r} must have {_DIGEST_LENGTHS[algorithm]} hex digits for {algorithm}, "
            f"got {len(digest)}"
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




def load_error_reason(exc: BaseException) -> str:
    """One line saying why ``torch.load`` could not read a file, without torch's advice to retry with
    ``weights_only=False`` (which runs arbitrary code from the file) or to allowlist its classes.

    Examples
    --------
    >>> load_error_reason(RuntimeError("PytorchStreamReader failed reading zip archive"))
    'RuntimeError: PytorchStreamReader failed reading zip archive'
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    match = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\n\s*\n|$)", text, flags=re.S)
    detail = match.group(1) if match else text
    detail = " ".join(detail.split())
    detail = re.split(r"(?<=\.) (?:Please|Re-running|Check|Do it|Alternatively)\b", detail)[0]
    if not detail or "weights_only" in detail or "add_safe_globals" in detail:
        detail = "not a file of tensors torch.load can read safely"
    return f"{type(exc).__name__}: {detail[:300]}"


def discard_unreadable(path: str | os.PathLike, *, url: str, model: str | None, reason: str) -> WeightsUnavailableError:
    """Delete a file :func:`fetch` placed in the cache that turned out unreadable, and return the error to raise.

    A download that is not the weights (an HTML error page served with HTTP 200, say) would otherwise stay
    cached for ever when no checksum is known: the next :func:`fetch` downloads it again instead.

    Parameters
    ----------
    path : path-like
        The cached file (the path :func:`fetch` returned).
    url : str
        Where it was downloaded from.
    model : str, optional
        Model id named in the message.
    reason : str
        Why it cannot be read (e.g. :func:`load_error_reason`).

    Returns
    -------
    WeightsUnavailableError
        Naming the cache path and the URL, and saying that the file was deleted and will be downloaded
        again next time.
    """
    path = Path(path)
    deleted = True
    try:
        path.unlink(missing_ok=True)
    except OSError:
        deleted = False
    with _verified_lock:
        resolved = str(path.resolve())
        _verified.difference_update({m for m in _verified if m[0] == resolved})
    what = f"the weights of model {model!r}" if model else "the weights"
    outcome = ("it was deleted and will be downloaded again next time" if deleted
               else "delete it to download it again")
    return WeightsUnavailableError(
        f"{what} downloaded from {url} into the cache file {path} cannot be loaded ({reason}); {outcome}. "
        f"If this repeats, download the file yourself and point the configuration at the local file."
    )


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
    """The refusal for weights that could not be had: what, from where, why, and how to give a local file instead
    (the command line's option for it, and the Python configuration's)."""
    what = f"the weights of model {model!r}" if model else "model weights"
    model_id = model or "MODEL_ID"
    option = ("--nuclei-checkpoint /path/to/checkpoint.pth" if model_id.startswith("hovernet")
              else f"--checkpoint {model_id}=/path/to/checkpoint.pt")
    return WeightsUnavailableError(
        f"Could not obtain {what} from {url} ({reason}); download the file yourself and use the local checkpoint "
        f"file instead: `colabel serve` / `colabel models` {option}, or in Python checkpoints={{{model_id!r}: "
        f"'/path/to/checkpoint.pt'}}."
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
        The downloaded file does not match *checksum* (the file is deleted). When *url* is a local path
        that is the cache file itself (``cache_dir / filename``), that file is verified where it is and
        never deleted or replaced.
    InvalidInputError
        A malformed *checksum* (also a digest of the wrong length: 64 hex digits for sha256, 32 for
        xxh128) or *filename*, before any download.

    Notes
    -----
    Temporary files ``.<filename>.*.part`` left by a download that was killed (SIGKILL, OOM) are deleted
    by the next download of the same file, once it holds the file's lock.

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
    source = _local_source(url)
    if source is not None and _same_file(source, target):  # the user's own file: verify it, never replace it
        return _verify_in_place(target, checksum, model=model)

    if verify_checksum(target, checksum):  # fast path, no lock: a file at target is always complete
        return target

    with file_lock(cache_dir / f".{filename}.lock"):
        _remove_stale_parts(cache_dir, filename)
        if target.exists():
            if verify_checksum(target, checksum):  # another process finished while we waited
                return target
            logger.warning("cached %s does not match %s; downloading it again", target, checksum)
            target.unlink(missing_ok=True)

        fd, tmp_name = tempfile.mkstemp(dir=cache_dir, prefix=f".{filename}.", suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as dest:
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


def _same_file(source: Path, target: Path) -> bool:
    """True when *source* and *target* name one file (same path after resolving links, or hard links)."""
    try:
        if source.expanduser().resolve() == target.resolve():
            return True
        return source.exists() and target.exists() and os.path.samefile(source, target)
    except OSError:
        return False


def _verify_in_place(target: Path, checksum: str | None, *, model: str | None) -> Path:
    """*target* when it exists and matches *checksum*; never deletes or rewrites it.

    Raises
    ------
    WeightsUnavailableError
        No file at *target*.
    ChecksumMismatchError
        The file does not match; it is left as it is.
    """
    if not target.is_file():
        raise _unavailable(model, str(target), f"no file at {target}")
    if not verify_checksum(target, checksum):
        algorithm, _ = _parse_checksum(checksum)
        raise ChecksumMismatchError(
            f"the file {target} given for {model or 'the model'} has checksum {file_checksum(target, algorithm)}, "
            f"not the expected {checksum}; it was left as it is"
        )
    return target


def _remove_stale_parts(cache_dir: Path, filename: str) -> None:
    """Delete ``.<filename>.*.part`` left by a download that was killed (SIGKILL, OOM) before its cleanup ran.

    Called with the file's lock held: only the lock holder writes these files, so none is in use.
    """
    for part in cache_dir.glob(glob.escape(f".{filename}.") + "*.part"):
        with contextlib.suppress(OSError):
            part.unlink()
            logger.info("removed %s, left by an interrupted download", part)


def require_local(path: str | os.PathLike, *, model: str | None = None) -> Path:
    """Return *path* as a Path if it is an existing file, else raise :class:`NotFoundError`."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise NotFoundError(f"checkpoint file {str(p)!r} for model {model or '?'!r} does not exist")
    return p
