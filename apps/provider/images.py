"""The images of a mounted folder: scan, describe, and read pixels of one level or region.

A pure module: no transport, no Ray. :class:`ImageCatalog` walks a folder once (and again on
:meth:`ImageCatalog.refresh`), keeps one :class:`ImageRecord` per image file, and reads pixels on demand.
Paths never leave this module: callers see opaque image ids and display names only.

Pixel arrays are numpy ``(height, width, channels)`` with ``channels >= 1`` in the file's own dtype.
How a file's axes become ``(H, W, C)``:

* grey ``(H, W)`` becomes ``(H, W, 1)``; RGB and RGBA stay ``(H, W, 3 | 4)``; palette PNGs become RGB
  (RGBA when the palette has transparency);
* TIFF axes come from tifffile's ``series.axes`` (OME-XML or ImageJ metadata where present): ``C`` and
  ``S`` (samples) are channels, moved last; **any other axis (``Z``, ``T``, a page sequence...) is reduced to
  its index 0** -- a ``ZCYX`` stack serves its first plane only;
* a TIFF axis tifffile cannot name (``Q`` or ``I``, e.g. a plain ``(C, H, W)`` multipage file) is taken as the
  channel axis when it is the only one, has at most 16 entries and is smaller than both ``H`` and ``W``;
* only the first series of a TIFF is served.

Resolution levels: a TIFF series with its own pyramid serves its levels as stored; any other image serves
level ``n`` as the block mean over ``2**n x 2**n`` pixels of level 0 (partial blocks at the right and bottom
edges average the pixels they have; integers are rounded), with as many levels as it takes for
``max(H, W) <= 512``.

Reading: a TIFF region decodes only the strips or tiles it needs. A PNG or JPEG cannot be read in part, so its
decoded pixels are kept in a :class:`PixelCache` (with every computed level read whole), least recently used
dropped first, within a byte budget (:data:`DEFAULT_PIXEL_CACHE_BYTES`; ``ColabelConfig.pixel_cache_bytes``):
the tiles of one image decode it once, and reads of one image at the same time wait for one decode. An image
larger than the whole budget is decoded for each read (still once for the reads at the same time).

Nothing here writes a file or changes an image.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from colabel.apps.provider.models import ImageInfo, Region
from colabel.errors import InvalidInputError, NotFoundError, PayloadTooLargeError, UnreadableImageError, shown

log = logging.getLogger(__name__)

TIFF_SUFFIXES = (".tif", ".tiff")
PIL_SUFFIXES = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg"}
LEVEL_TARGET = 512  #: computed levels stop once ``max(H, W)`` is at most this many pixels
MAX_CHANNEL_FIRST = 16  #: largest unnamed TIFF axis taken as channels
_CHECKED_PAGES = 256  #: pages whose strip/tile extents are checked against the file size
#: Default budget of a catalog's :class:`PixelCache` (512 MiB): decoded PNG/JPEG pixels and their computed levels.
DEFAULT_PIXEL_CACHE_BYTES = 512 * 2**20
#: Bytes of float64 sums a computed level is made of at once (it is made in strips of rows).
_STRIP_BYTES = 64 * 2**20
_CHANNEL_AXES = "CS"
_UNNAMED_AXES = "QI"

# Pillow modes -> (numpy dtype, channels, mode to convert to or None)
_PIL_MODES: dict[str, tuple[str, int, str | None]] = {
    "1": ("uint8", 1, "L"),
    "L": ("uint8", 1, None),
    "LA": ("uint8", 2, None),
    "La": ("uint8", 2, "LA"),
    "RGB": ("uint8", 3, None),
    "RGBA": ("uint8", 4, None),
    "RGBa": ("uint8", 4, "RGBA"),
    "RGBX": ("uint8", 3, "RGB"),
    "CMYK": ("uint8", 3, "RGB"),
    "YCbCr": ("uint8", 3, "RGB"),
    "PA": ("uint8", 4, "RGBA"),
    "I;16": ("uint16", 1, None),
    "I;16L": ("uint16", 1, None),
    "I;16B": ("uint16", 1, None),
    "I": ("int32", 1, None),
    "F": ("float32", 1, None),
}


@dataclass(frozen=True)
class ImageRecord:
    """One image file of the mounted folder, as the catalog found it. Internal: holds the path.

    Attributes
    ----------
    image_id : str
        Opaque id, ``"img-"`` + the first 16 hex digits of the SHA-256 of :attr:`name`.
    name : str
        POSIX path relative to the mounted folder, for display only.
    path : pathlib.Path
        Absolute resolved path of the file (the target, for a symbolic link).
    format : str
        ``"tiff"``, ``"ome-tiff"``, ``"png"`` or ``"jpeg"``.
    shape : tuple of int or None
        ``(H, W, C)`` of level 0, None when the file cannot be read.
    dtype : str or None
        numpy dtype name of the pixels, e.g. ``"uint8"``, ``"uint16"``, ``"float32"``.
    levels : tuple of (int, int)
        ``(H, W)`` of every resolution level, level 0 first; empty when the file cannot be read.
    error : str or None
        One sentence saying why the file cannot be served (corrupt, unsupported, outside the folder).
    """

    image_id: str
    name: str
    path: Path
    format: str
    shape: tuple[int, int, int] | None
    dtype: str | None
    levels: tuple[tuple[int, int], ...]
    error: str | None

    def info(self) -> ImageInfo:
        """The wire description of this image (no path).

        Returns
        -------
        ImageInfo
            ``status`` is ``"unreadable"`` when :attr:`error` is set, ``"unannotated"`` otherwise.
        """
        return ImageInfo(
            image_id=self.image_id,
            name=self.name,
            format=self.format,
            shape=list(self.shape) if self.shape else None,
            dtype=self.dtype,
            channels=self.shape[2] if self.shape else None,
            levels=[list(level) for level in self.levels],
            error=self.error,
            revision=None if self.error else file_revision(self.path),
            status="unreadable" if self.error else "unannotated",
        )


def file_revision(path: Path) -> str | None:
    """An opaque string that changes whenever the file at ``path`` is rewritten or replaced: its size and
    modification time in nanoseconds, read now (not at scan time). None when the file cannot be stat'ed.

    Examples
    --------
    >>> file_revision(Path("/no/such/file")) is None
    True
    """
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{st.st_size:x}-{st.st_mtime_ns:x}"


def image_id_for(name: str) -> str:
    """The opaque id of the image whose POSIX path relative to the folder is ``name``.

    Examples
    --------
    >>> image_id_for("a/b.tif")[:4]
    'img-'
    """
    digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()
    return "img-" + digest[:16]


class PixelCache:
    """Arrays by key, least recently used dropped first once they take more than ``max_bytes``; thread-safe.

    :meth:`get` makes a missing array once: callers asking for a key being made wait for that one result (or its
    error). An array larger than the whole budget is handed to the callers waiting for it and not kept. The
    arrays handed out are read-only and shared: copy what you return.

    Attributes
    ----------
    max_bytes : int
        The budget; 0 keeps nothing.
    nbytes : int
        Bytes of the arrays kept.
    decodes : int
        Full decodes of an image file done for the catalog (counted by :class:`ImageCatalog`).
    """

    def __init__(self, max_bytes: int = DEFAULT_PIXEL_CACHE_BYTES) -> None:
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self.decodes = 0
        self._lock = threading.Lock()
        self._arrays: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._making: dict[tuple, Future] = {}

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._arrays

    def resize(self, max_bytes: int) -> None:
        """Change the budget, dropping the least recently used arrays past it."""
        with self._lock:
            self.max_bytes = int(max_bytes)
            self._evict(0)

    def clear(self) -> None:
        with self._lock:
            self._arrays.clear()
            self.nbytes = 0

    def count_decode(self) -> None:
        with self._lock:
            self.decodes += 1

    def get(self, key: tuple, make: Callable[[], np.ndarray]) -> np.ndarray:
        """The array kept under ``key``, else ``make()``'s, made once for all callers asking meanwhile.

        ``key[0]`` names an image: keeping an array drops the image's arrays under keys that differ in ``key[1]``
        (another revision of its file).
        """
        with self._lock:
            array = self._arrays.get(key)
            if array is not None:
                self._arrays.move_to_end(key)
                return array
            pending = self._making.get(key)
            owner = pending is None
            if owner:
                pending = self._making[key] = Future()
        if not owner:
            return pending.result()
        try:
            array = make()
            array.flags.writeable = False
        except BaseException as exc:
            with self._lock:
                del self._making[key]
            pending.set_exception(exc)
            raise
        with self._lock:
            del self._making[key]
            self._keep(key, array)
        pending.set_result(array)
        return array

    def _keep(self, key: tuple, array: np.ndarray) -> None:
        for old in [k for k in self._arrays if k[0] == key[0] and k[1] != key[1]]:
            self.nbytes -= self._arrays.pop(old).nbytes
        if array.nbytes > self.max_bytes:
            return
        self._evict(array.nbytes)
        self._arrays[key] = array
        self.nbytes += array.nbytes

    def _evict(self, room: int) -> None:
        while self._arrays and self.nbytes + room > self.max_bytes:
            _, dropped = self._arrays.popitem(last=False)
            self.nbytes -= dropped.nbytes


class ImageCatalog:
    """The images of one folder, by opaque id.

    Parameters
    ----------
    folder : str or pathlib.Path
        The mounted folder. Its files are only ever read.
    exclude : iterable of str, optional
        Names of top-level sub-folders not to scan (colabel's own ``annotations`` by default).
    pixel_cache_bytes : int, optional
        Budget of :attr:`pixels`, the decoded PNG/JPEG pixels kept (:data:`DEFAULT_PIXEL_CACHE_BYTES`).

    Raises
    ------
    InvalidInputError
        When ``folder`` does not exist, is not a folder, or cannot be listed.

    Examples
    --------
    >>> catalog = ImageCatalog("tests/data")  # doctest: +SKIP
    >>> record = catalog.records()[0]  # doctest: +SKIP
    >>> catalog.read(record.image_id, region={"x": 0, "y": 0, "width": 64, "height": 32}).shape  # doctest: +SKIP
    (32, 64, 1)
    """

    def __init__(self, folder: str | Path, *, exclude: Iterable[str] = ("annotations",),
                 pixel_cache_bytes: int = DEFAULT_PIXEL_CACHE_BYTES) -> None:
        try:
            given = Path(os.fspath(folder)).expanduser()
        except TypeError:
            raise InvalidInputError(f"folder must be a path, not {type(folder).__name__}") from None
        if not given.exists():
            raise InvalidInputError(f"folder '{given}' does not exist")
        if not given.is_dir():
            raise InvalidInputError(f"'{given}' is not a folder")
        try:
            with os.scandir(given):
                pass
        except OSError as exc:
            raise InvalidInputError(f"folder '{given}' cannot be read ({exc.strerror or exc})") from None
        self.folder = given.resolve(strict=True)
        if isinstance(exclude, str):
            exclude = (exclude,)
        self.exclude = frozenset(exclude)
        self._lock = threading.Lock()
        self._records: dict[str, ImageRecord] = {}
        self._checked: dict[str, str] = {}  # image id -> file revision whose header matched the record
        self.pixels = PixelCache(pixel_cache_bytes)
        self.refresh()

    # ------------------------------------------------------------------ listing

    def refresh(self) -> None:
        """Scan the folder again (symbolic links to folders are not followed).

        Hidden files and folders (name starting with ``.``) and the excluded top-level folders are skipped;
        only ``.tif``, ``.tiff``, ``.png``, ``.jpg`` and ``.jpeg`` files (any case) are listed. Only headers are
        read; a corrupt file is listed with an ``error`` instead of raising.
        """
        found: dict[str, ImageRecord] = {}
        for dirpath, dirnames, filenames in os.walk(self.folder, followlinks=False):
            top = Path(dirpath) == self.folder
            dirnames[:] = sorted(
                d for d in dirnames if not d.startswith(".") and not (top and d in self.exclude)
            )
            for filename in sorted(filenames):
                if filename.startswith("."):
                    continue
                suffix = os.path.splitext(filename)[1].lower()
                if suffix not in TIFF_SUFFIXES and suffix not in PIL_SUFFIXES:
                    continue
                record = self._scan(Path(dirpath) / filename)
                found[record.image_id] = record
        with self._lock:
            self._records = found
            self._checked = {}
        self.pixels.clear()

    def records(self) -> list[ImageRecord]:
        """All records, sorted by name.

        Returns
        -------
        list of ImageRecord
        """
        with self._lock:
            records = list(self._records.values())
        return sorted(records, key=lambda r: r.name)

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, image_id: object) -> bool:
        return isinstance(image_id, str) and image_id in self._records

    def get(self, image_id: str) -> ImageRecord:
        """The record of ``image_id``.

        Raises
        ------
        InvalidInputError
            When ``image_id`` is not a string.
        NotFoundError
            For any string that is not an id of this catalog (paths included).
        """
        if not isinstance(image_id, str):
            raise InvalidInputError(f"image id must be a string, not {type(image_id).__name__}")
        record = self._records.get(image_id)
        if record is None:
            raise NotFoundError(f"unknown image id {shown(image_id)}")
        return record

    def check_unchanged(self, image_id: str) -> ImageRecord:
        """The record of ``image_id`` after checking that its file still has the listed shape and dtype (headers
        only, and only when the file's size or modification time changed since the last check): what a save is
        drawn against must be the image on disk.

        Raises
        ------
        UnreadableImageError
            The file changed shape or dtype, or cannot be read any more, since the folder was scanned.
        """
        record = self.get(image_id)
        if record.error or record.shape is None:
            return record
        revision = file_revision(record.path)
        if revision is not None and self._checked.get(image_id) == revision:
            return record
        try:
            if record.format in ("tiff", "ome-tiff"):
                _, shape, dtype, _ = _scan_tiff(record.path, fmt=record.format)
            else:
                _, shape, dtype, _ = _scan_pil(record.path)
        except Exception as exc:  # noqa: BLE001 - gone, truncated, replaced by something else
            raise UnreadableImageError(
                f"image '{record.name}' cannot be read any more ({_reason(exc, self.folder)}); refresh the catalog"
            ) from None
        if (tuple(shape), dtype) != (tuple(record.shape), record.dtype):
            raise UnreadableImageError(
                f"image '{record.name}' changed since the folder was scanned (now {tuple(shape)} {dtype}, listed "
                f"{tuple(record.shape)} {record.dtype}); refresh the catalog"
            )
        if revision is not None:
            self._checked[image_id] = revision
        return record

    # ------------------------------------------------------------------ pixels

    def read(
        self,
        image_id: str,
        *,
        region: Region | dict | None = None,
        level: int = 0,
        max_bytes: int | None = None,
    ) -> np.ndarray:
        """Pixels of one level of an image, or of a rectangle of that level.

        Parameters
        ----------
        image_id : str
            An id of this catalog.
        region : Region or dict, optional
            ``x, y, width, height`` in pixels of the requested level (``x`` = column); the whole level if None.
        level : int, optional
            Resolution level, 0 = full resolution; see :attr:`ImageRecord.levels`.
        max_bytes : int, optional
            Largest array to return; checked before any pixel is decoded.

        Returns
        -------
        numpy.ndarray
            ``(height, width, C)`` in the file's dtype (:attr:`ImageRecord.dtype`), C-contiguous, a new array.

        Raises
        ------
        NotFoundError
            Unknown ``image_id``.
        InvalidInputError
            ``level`` out of range, or ``region`` malformed or not inside the level.
        PayloadTooLargeError
            The result would be larger than ``max_bytes``.
        UnreadableImageError
            The file is listed with an error, or its pixel data turn out corrupt or truncated.
        """
        record = self.get(image_id)
        if record.error:
            raise UnreadableImageError(record.error)
        assert record.shape is not None and record.dtype is not None
        if isinstance(level, bool) or not isinstance(level, (int, np.integer)):
            raise InvalidInputError(f"level must be an integer, not {type(level).__name__}")
        level = int(level)
        if not 0 <= level < len(record.levels):
            raise InvalidInputError(
                f"level {level} does not exist for image '{record.name}', "
                f"which has levels 0 to {len(record.levels) - 1}"
            )
        height, width = record.levels[level]
        box = _check_region(region, height=height, width=width, level=level, name=record.name)
        if max_bytes is not None:
            if isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, np.integer)):
                raise InvalidInputError(f"max_bytes must be an integer, not {type(max_bytes).__name__}")
            y0, y1, x0, x1 = box
            nbytes = (y1 - y0) * (x1 - x0) * record.shape[2] * np.dtype(record.dtype).itemsize
            if nbytes > max_bytes:
                raise PayloadTooLargeError(
                    f"{y1 - y0} x {x1 - x0} pixels of image '{record.name}' at level {level} are {nbytes} bytes, "
                    f"more than the limit of {int(max_bytes)}; ask for a smaller region or a coarser level "
                    f"(this image has levels 0 to {len(record.levels) - 1})"
                )
        self._check_inside(record)
        try:
            if record.format in ("tiff", "ome-tiff"):
                out = _read_tiff(record, level=level, box=box)
            else:
                out = self._read_pil(record, level=level, box=box)
        except (UnreadableImageError, InvalidInputError):
            raise
        except MemoryError:
            raise
        except Exception as exc:  # any decoder failure: corrupt or truncated data
            raise UnreadableImageError(
                f"image '{record.name}' cannot be decoded: {_reason(exc, self.folder)}"
            ) from None
        expected = (box[1] - box[0], box[3] - box[2], record.shape[2])
        if out.shape != expected or out.dtype != np.dtype(record.dtype):
            raise UnreadableImageError(
                f"image '{record.name}' changed since the folder was scanned "
                f"(now {out.shape} {out.dtype}, listed {expected} {record.dtype}); refresh the catalog"
            )
        return np.ascontiguousarray(out)

    # ------------------------------------------------------------------ internals

    def _read_pil(self, record: ImageRecord, *, level: int, box: tuple[int, int, int, int]) -> np.ndarray:
        """A region of a level of a PNG/JPEG, from its decoded pixels kept in :attr:`pixels` (decoded once)."""
        revision = file_revision(record.path)

        def decode() -> np.ndarray:
            self.pixels.count_decode()
            return _decode_pil(record)

        if revision is None:  # cannot tell the file's revision: nothing kept
            base = decode()
        else:
            base = self.pixels.get((record.image_id, revision, 0), decode)
        y0, y1, x0, x1 = box
        if level == 0:
            return base[y0:y1, x0:x1].copy()
        factor = 2**level
        key = (record.image_id, revision, level)
        height, width = record.levels[level]
        if revision is not None and (box == (0, height, 0, width) or key in self.pixels):
            whole = self.pixels.get(key, lambda: _computed_level(base, factor))
            return whole[y0:y1, x0:x1].copy()
        window = base[y0 * factor : min(y1 * factor, base.shape[0]), x0 * factor : min(x1 * factor, base.shape[1])]
        return block_mean(window, factor=factor)

    def _excluded(self, real: Path) -> bool:
        """Whether a resolved path lies in one of the excluded top-level folders (colabel's annotations)."""
        return any(real.is_relative_to(self.folder / name) for name in self.exclude)

    def _check_inside(self, record: ImageRecord) -> None:
        real = Path(os.path.realpath(record.path))
        if not real.is_relative_to(self.folder):
            raise UnreadableImageError(f"image '{record.name}' now points outside the mounted folder")
        if self._excluded(real):
            raise UnreadableImageError(f"image '{record.name}' now points into the annotations folder")
        try:
            if not stat.S_ISREG(os.stat(real).st_mode):
                raise UnreadableImageError(f"image '{record.name}' is no longer a regular file")
        except OSError:
            raise UnreadableImageError(f"image '{record.name}' no longer exists; refresh the catalog") from None

    def _scan(self, path: Path) -> ImageRecord:
        rel = path.relative_to(self.folder).as_posix()
        name = rel.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        image_id = image_id_for(rel)
        lower = path.name.lower()
        suffix = os.path.splitext(lower)[1]
        if suffix in TIFF_SUFFIXES:
            fmt = "ome-tiff" if lower.endswith((".ome.tif", ".ome.tiff")) else "tiff"
        else:
            fmt = PIL_SUFFIXES[suffix]
        real = Path(os.path.realpath(path))

        def bad(message: str) -> ImageRecord:
            return ImageRecord(image_id, name, real, fmt, None, None, (), message)

        if not real.is_relative_to(self.folder):
            return bad(f"'{name}' points outside the mounted folder")
        if self._excluded(real):  # a link to labels (any session's) is not an image to annotate
            return bad(f"'{name}' points into the annotations folder")
        try:
            mode = os.stat(real).st_mode
        except OSError:
            return bad(f"'{name}' is a broken link")
        if not stat.S_ISREG(mode):
            return bad(f"'{name}' is not a regular file")
        try:
            if fmt in ("tiff", "ome-tiff"):
                fmt, shape, dtype, levels = _scan_tiff(real, fmt=fmt)
            else:
                fmt, shape, dtype, levels = _scan_pil(real)
        except _Unsupported as exc:
            return bad(f"'{name}' {exc}")
        except Exception as exc:
            log.debug("cannot read %s", real, exc_info=True)
            return bad(f"'{name}' cannot be read as {fmt.upper()}: {_reason(exc, self.folder)}")
        return ImageRecord(image_id, name, real, fmt, shape, dtype, levels, None)


# ---------------------------------------------------------------------- helpers


class _Unsupported(Exception):
    """A readable file colabel does not serve; the message completes a sentence about the file."""


def _reason(exc: BaseException, folder: Path) -> str:
    """The first line of a decoder's message, with paths in the folder made relative to it and other absolute
    paths cut to their file name.

    Callers are told the file's name relative to the folder, never where the folder lives (even when its path
    holds spaces, which the pattern for other paths stops at).
    """
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = text.replace(f"{folder}{os.sep}", "")
    text = re.sub(r"(?:/[^/\s'\"]+)+/([^/\s'\"]+)", r"\1", text)
    return text[:200]


def _check_region(
    region: Region | dict | None, *, height: int, width: int, level: int, name: str
) -> tuple[int, int, int, int]:
    """``(y0, y1, x0, x1)`` of ``region`` inside a level of ``height x width`` pixels."""
    if region is None:
        return 0, height, 0, width
    if not isinstance(region, Region):
        if not isinstance(region, dict):
            raise InvalidInputError(f"region must be an object with x, y, width, height, not {type(region).__name__}")
        try:
            region = Region.model_validate(region)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'region'}: {err['msg']}" for err in exc.errors()
            )
            raise InvalidInputError(f"region {region!r} is invalid ({problems})") from None
    if region.x + region.width > width or region.y + region.height > height:
        raise InvalidInputError(
            f"region x={region.x}, y={region.y}, width={region.width}, height={region.height} is outside "
            f"image '{name}', whose level {level} is {width} pixels wide and {height} high"
        )
    return region.y, region.y + region.height, region.x, region.x + region.width


def _computed_levels(height: int, width: int) -> tuple[tuple[int, int], ...]:
    """``(H, W)`` of levels ``0..n`` downsampled ``2**n`` (ceil), until ``max(H, W) <= LEVEL_TARGET``."""
    levels = [(height, width)]
    while max(levels[-1]) > LEVEL_TARGET:
        f = 2 ** len(levels)
        levels.append((math.ceil(height / f), math.ceil(width / f)))
    return tuple(levels)


def block_mean(image: np.ndarray, *, factor: int) -> np.ndarray:
    """Downsample by averaging ``factor x factor`` blocks, keeping the dtype.

    Blocks start at row and column 0; partial blocks at the bottom and right edges average the pixels
    they have. Integer means are rounded to nearest, booleans are a majority vote.

    Parameters
    ----------
    image : numpy.ndarray
        ``(H, W, C)`` of any real dtype. Not modified.
    factor : int
        Block side, >= 1.

    Returns
    -------
    numpy.ndarray
        ``(ceil(H / factor), ceil(W / factor), C)``, same dtype as ``image``.

    Examples
    --------
    >>> block_mean(np.arange(16, dtype=np.uint8).reshape(4, 4, 1), factor=2)[..., 0]
    array([[ 2,  4],
           [10, 12]], dtype=uint8)
    """
    if factor == 1:
        return image.copy()
    h, w = image.shape[:2]
    rows = np.arange(0, h, factor)
    cols = np.arange(0, w, factor)
    sums = np.add.reduceat(image, rows, axis=0, dtype=np.float64)
    sums = np.add.reduceat(sums, cols, axis=1)
    n_rows = np.diff(np.append(rows, h)).astype(np.float64)
    n_cols = np.diff(np.append(cols, w)).astype(np.float64)
    mean = sums / (n_rows[:, None, None] * n_cols[None, :, None])
    if image.dtype == np.bool_:
        return mean >= 0.5
    if np.issubdtype(image.dtype, np.integer):
        info = np.iinfo(image.dtype)
        return np.clip(np.rint(mean), info.min, info.max).astype(image.dtype)
    return mean.astype(image.dtype)


# ---------------------------------------------------------------------- TIFF


@dataclass(frozen=True)
class _Layout:
    """Where ``Y``, ``X`` and the channels are among a TIFF series' axes."""

    shape: tuple[int, ...]
    y: int
    x: int
    channels: tuple[int, ...]

    @property
    def hwc(self) -> tuple[int, int, int]:
        channels = int(np.prod([self.shape[i] for i in self.channels], dtype=np.int64))
        return self.shape[self.y], self.shape[self.x], channels

    def select(self, y0: int, y1: int, x0: int, x1: int) -> tuple[Any, ...]:
        """Index of the series array: the Y/X window, all channels, index 0 of every other axis."""
        key: list[Any] = []
        for i in range(len(self.shape)):
            if i == self.y:
                key.append(slice(y0, y1))
            elif i == self.x:
                key.append(slice(x0, x1))
            elif i in self.channels:
                key.append(slice(None))
            else:
                key.append(0)
        return tuple(key)

    def to_hwc(self, selected: np.ndarray) -> np.ndarray:
        """``(h, w, C)`` from the array that :meth:`select` picked."""
        kept = [i for i in range(len(self.shape)) if i in (self.y, self.x) or i in self.channels]
        order = [kept.index(self.y), kept.index(self.x)] + [kept.index(c) for c in self.channels]
        moved = np.transpose(selected, order)
        return moved.reshape(moved.shape[0], moved.shape[1], -1)


def _layout(axes: str, shape: tuple[int, ...]) -> _Layout:
    if len(axes) != len(shape) or "Y" not in axes or "X" not in axes:
        raise _Unsupported(f"has no image plane the reader understands (axes {axes!r}, shape {tuple(shape)})")
    y, x = axes.index("Y"), axes.index("X")
    height, width = shape[y], shape[x]
    channels = tuple(i for i, a in enumerate(axes) if a in _CHANNEL_AXES)
    if not channels:
        unnamed = [i for i, a in enumerate(axes) if a in _UNNAMED_AXES and shape[i] > 1]
        if len(unnamed) == 1 and shape[unnamed[0]] <= MAX_CHANNEL_FIRST and shape[unnamed[0]] < min(height, width):
            channels = (unnamed[0],)
    return _Layout(tuple(int(s) for s in shape), y, x, channels)


def _check_dtype(dtype: np.dtype) -> str:
    if dtype is None or dtype.kind not in "uifb":
        raise _Unsupported(f"has pixels of type {dtype}, which colabel does not serve")
    return np.dtype(dtype).newbyteorder("=").name


def _check_extents(series: Any, size: int) -> None:
    """Raise when a strip or tile of the first pages of ``series`` lies beyond the end of the file."""
    for page in list(series.pages[:_CHECKED_PAGES]):
        if page is None:
            continue
        offsets, counts = page.dataoffsets, page.databytecounts
        if len(offsets) and max(o + c for o, c in zip(offsets, counts, strict=False)) > size:
            raise _Unsupported("is truncated: its pixel data end before the file does")


def _check_codecs(series: Any) -> None:
    """Raise when decoding ``series`` needs a codec this installation lacks (most need ``imagecodecs``)."""
    import tifffile

    page = series.keyframe
    if page.compression not in tifffile.TIFF.DECOMPRESSORS:
        raise _Unsupported(
            f"is {_enum_name(tifffile.COMPRESSION, page.compression)}-compressed, which needs the imagecodecs package"
        )
    if page.predictor not in tifffile.TIFF.PREDICTORS:
        raise _Unsupported(
            f"uses the {_enum_name(tifffile.PREDICTOR, page.predictor)} predictor, which needs the imagecodecs package"
        )


def _enum_name(enum: Any, value: int) -> str:
    try:
        return enum(value).name
    except ValueError:
        return f"#{int(value)}"


def _scan_tiff(path: Path, *, fmt: str) -> tuple[str, tuple[int, int, int], str, tuple[tuple[int, int], ...]]:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        if tif.is_ome:
            fmt = "ome-tiff"
        if not tif.series:
            raise _Unsupported("contains no image")
        series = tif.series[0]
        layout = _layout(series.axes, series.shape)
        dtype = _check_dtype(series.dtype)
        _check_extents(series, path.stat().st_size)
        for level in series.levels:
            _check_codecs(level)
        shape = layout.hwc
        if len(series.levels) > 1:
            levels = []
            for level in series.levels:
                sub = _layout(level.axes, level.shape)
                levels.append((sub.shape[sub.y], sub.shape[sub.x]))
            levels = tuple(levels)
        else:
            levels = _computed_levels(shape[0], shape[1])
    return fmt, shape, dtype, levels


def _read_tiff(record: ImageRecord, *, level: int, box: tuple[int, int, int, int]) -> np.ndarray:
    import tifffile

    y0, y1, x0, x1 = box
    with tifffile.TiffFile(record.path) as tif:
        series = tif.series[0]
        own = len(series.levels) > 1
        source = series.levels[level] if own else series
        factor = 1 if own else 2**level
        layout = _layout(source.axes, source.shape)
        listed = record.levels[level] if own else record.shape
        if (layout.hwc[:2] if own else layout.hwc) != listed:
            raise UnreadableImageError(
                f"image '{record.name}' changed since the folder was scanned; refresh the catalog"
            )
        size = record.path.stat().st_size
        try:
            _check_extents(source, size)
        except _Unsupported as exc:
            raise UnreadableImageError(f"image '{record.name}' {exc}") from None
        full_h, full_w = layout.shape[layout.y], layout.shape[layout.x]
        sy0, sy1 = y0 * factor, min(y1 * factor, full_h)
        sx0, sx1 = x0 * factor, min(x1 * factor, full_w)
        key = layout.select(sy0, sy1, sx0, sx1)
        pixels = _tiff_window(tif, source, key, size=size, level=level if own else 0)
    out = layout.to_hwc(pixels)
    out = out.astype(out.dtype.newbyteorder("="), copy=False)
    return block_mean(out, factor=factor) if factor > 1 else out


def _tiff_window(tif: Any, source: Any, key: tuple[Any, ...], *, size: int, level: int) -> np.ndarray:
    """Decode only what ``key`` needs where the file allows it."""
    keyframe = source.keyframe
    offset = source.dataoffset
    if offset is not None and getattr(keyframe, "is_memmappable", False):
        dtype = np.dtype(source.dtype).newbyteorder(tif.byteorder)
        n = int(np.prod(source.shape, dtype=np.int64)) * dtype.itemsize
        if offset + n > size:
            raise ValueError(f"the pixel data need {offset + n} bytes but the file has {size}")
        mapped = np.memmap(tif.filehandle.path, dtype=dtype, mode="r", offset=offset, shape=tuple(source.shape))
        try:
            return np.array(mapped[key])
        finally:
            del mapped
    try:
        import zarr
    except ImportError:  # no zarr: decode the whole level, then crop
        return np.asarray(source.asarray())[key]
    store = tif.series[0].aszarr(level=level)
    try:
        array = zarr.open(store, mode="r")
        return np.asarray(array[key])
    finally:
        store.close()


# ---------------------------------------------------------------------- PNG / JPEG


def _pil_layout(image: Any) -> tuple[str, int, str | None]:
    mode = image.mode
    if mode == "P":
        return ("uint8", 4, "RGBA") if "transparency" in image.info else ("uint8", 3, "RGB")
    if mode not in _PIL_MODES:
        raise _Unsupported(f"has pixel mode {mode!r}, which colabel does not serve")
    return _PIL_MODES[mode]


def _open_pil(path: Path) -> Any:
    from PIL import Image

    return Image.open(path, formats=["PNG", "JPEG"])


def _scan_pil(path: Path) -> tuple[str, tuple[int, int, int], str, tuple[tuple[int, int], ...]]:
    with _open_pil(path) as image:
        dtype, channels, _ = _pil_layout(image)
        width, height = image.size
        fmt = "jpeg" if image.format == "JPEG" else "png"
    return fmt, (height, width, channels), dtype, _computed_levels(height, width)


def _decode_pil(record: ImageRecord) -> np.ndarray:
    """All pixels of a PNG/JPEG, ``(H, W, C)`` in the record's dtype; refused when it no longer has the listed shape."""
    with _open_pil(record.path) as image:
        dtype, channels, convert = _pil_layout(image)
        image.load()
        if convert:
            image = image.convert(convert)
        pixels = np.asarray(image)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    pixels = pixels.astype(np.dtype(dtype), copy=False)
    if pixels.shape != record.shape or pixels.dtype != np.dtype(record.dtype):
        raise UnreadableImageError(
            f"image '{record.name}' changed since the folder was scanned "
            f"(now {pixels.shape} {pixels.dtype}, listed {record.shape} {record.dtype}); refresh the catalog"
        )
    return pixels


def _computed_level(base: np.ndarray, factor: int) -> np.ndarray:
    """:func:`block_mean` of the whole of ``base``, made in strips of rows (the same result, in bounded memory)."""
    height, width, channels = base.shape
    rows = factor * max(1, _STRIP_BYTES // max(1, factor * width * channels * 8))
    out = np.empty((math.ceil(height / factor), math.ceil(width / factor), channels), dtype=base.dtype)
    for y in range(0, height, rows):
        out[y // factor : (y + rows) // factor] = block_mean(base[y : y + rows], factor=factor)
    return out
