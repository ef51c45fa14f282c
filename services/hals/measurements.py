"""Per-nucleus measurements and the HALS cell features: CNN patch features next to stain and shape measures.

Pathologists' cell classes are often intensity- or size-driven (a DAB-positive nucleus, a hyperchromatic
one, a large one). A frozen ImageNet CNN on a patch sees the neighbourhood's texture but describes the
centre nucleus' mean stain or size poorly, so HALS' features are completed here with the measurements
QuPath's cell detection reports for every cell (nucleus and "cytoplasm" ring means per stain, area,
shape). :func:`cell_features` is what both the live service (:class:`~colabel.services.hals.service.
ClassifierService`) and the benchmark (``bench/hals.py``) use:

1. the CNN patch is scaled to the nuclei: its side is :data:`PATCH_DIAMETERS` (1.6) times the median
   equivalent diameter of the image's nuclei (:func:`patch_size_for`), instead of a fixed 40 px;
2. :func:`nucleus_measurements` -- ``(N, 12)`` float32, see :data:`MEASUREMENT_NAMES`;
3. the two blocks are concatenated, ``(N, cnn_dim + 12)``; :func:`column_weights` gives the classifier
   the weights that balance the blocks after standardisation (each block contributes the same total
   variance to the first layer, so 12 measurements are not drowned by 1280 CNN columns).

No ray or hypha_rpc import here: plain model-side code.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from colabel.errors import InvalidInputError

__all__ = [
    "MEASUREMENT_NAMES",
    "N_MEASUREMENTS",
    "PATCH_DIAMETERS",
    "RING_DIAMETERS",
    "nucleus_measurements",
    "median_diameter",
    "patch_size_for",
    "column_weights",
    "cell_features",
]

#: Columns of :func:`nucleus_measurements`. Stain 1..3 are hematoxylin, eosin and DAB optical densities
#: (``skimage.color.rgb2hed``) for RGB images; for a grey image stain 1 is its intensity scaled to 0..1
#: by the 1st / 99.8th percentiles and stains 2, 3 are 0.
MEASUREMENT_NAMES: tuple[str, ...] = (
    "stain1_nucleus_mean", "stain1_nucleus_sd", "stain1_ring_mean",
    "stain2_nucleus_mean", "stain2_nucleus_sd", "stain2_ring_mean",
    "stain3_nucleus_mean", "stain3_nucleus_sd", "stain3_ring_mean",
    "log_area", "eccentricity", "solidity",
)
N_MEASUREMENTS = len(MEASUREMENT_NAMES)

#: CNN patch side in median nucleus diameters (HALS' 40 px is ~2.7 diameters of a 14.6 px nucleus).
PATCH_DIAMETERS = 1.6
#: Width of the "cytoplasm" ring in median nucleus diameters (5 px for a 14.6 px nucleus).
RING_DIAMETERS = 0.35
#: Bounds of the scaled patch side in pixels.
PATCH_RANGE = (16, 96)


def _check_labels(labels: ArrayLike, shape: tuple[int, int]) -> np.ndarray:
    lab = np.asarray(labels)
    if lab.dtype.kind not in "iu":
        raise InvalidInputError(f"labels must be an integer label image, got dtype {lab.dtype}")
    if lab.shape != tuple(shape):
        raise InvalidInputError(f"labels {lab.shape} must have the image's height and width {tuple(shape)}")
    return lab.astype(np.int64, copy=False)


def _stains(image: np.ndarray) -> list[np.ndarray]:
    """Three ``(H, W)`` float64 channels: H, E, DAB optical density (RGB) or scaled intensity, 0, 0 (grey)."""
    from skimage.color import rgb2hed

    from .features import _as_hwc, to_uint8

    hwc = _as_hwc(image)
    if hwc.shape[2] == 3:
        rgb = to_uint8(hwc)
        hed = rgb2hed(rgb)
        return [hed[..., k] for k in range(3)]
    grey = to_uint8(hwc[:, :, 0]).astype(np.float64) / 255.0
    zero = np.zeros_like(grey)
    return [grey, zero, zero]


def median_diameter(labels: ArrayLike, ids: ArrayLike | None = None) -> float:
    """Median equivalent diameter ``sqrt(4 area / pi)`` in pixels of the labelled objects (*ids*, default all).

    Raises
    ------
    InvalidInputError
        When there is no object.
    """
    lab = np.asarray(labels)
    area = np.bincount(lab.ravel().astype(np.int64))
    ids = np.flatnonzero(area) if ids is None else np.asarray(ids, dtype=np.int64)
    ids = ids[(ids > 0) & (ids < len(area))]
    area = area[ids]
    area = area[area > 0]
    if area.size == 0:
        raise InvalidInputError("no labelled nucleus: cannot derive a nucleus size")
    return float(np.median(np.sqrt(4.0 * area / np.pi)))


def patch_size_for(diameter: float, *, diameters: float = PATCH_DIAMETERS) -> int:
    """CNN patch side in pixels for nuclei of median *diameter* px: ``round(diameters * diameter)``, even,
    clipped to :data:`PATCH_RANGE`.

    Examples
    --------
    >>> patch_size_for(14.6), patch_size_for(23.7), patch_size_for(3.0)
    (24, 38, 16)
    """
    if not np.isfinite(diameter) or diameter <= 0:
        raise InvalidInputError(f"nucleus diameter must be a positive number of pixels, got {diameter!r}")
    side = 2 * int(round(diameters * float(diameter) / 2))
    return int(np.clip(side, *PATCH_RANGE))


def nucleus_measurements(image: ArrayLike, labels: ArrayLike, ids: ArrayLike, *,
                         ring_px: int | None = None) -> np.ndarray:
    """QuPath-style measurements of each nucleus: stain means / sd inside, stain mean in a ring, shape.

    Parameters
    ----------
    image : array-like, (H, W) or (H, W, C), C in {1, 3, 4}
        RGB (brightfield: H, E, DAB optical densities) or grey (fluorescence: scaled intensity). Any
        numeric dtype; non-uint8 images are scaled as :func:`~colabel.services.hals.features.to_uint8`.
    labels : array-like (H, W) of int
        Instance labels, 0 = background.
    ids : array-like (N,) of int
        The nuclei, in output order (label values).
    ring_px : int, optional
        Ring ("cytoplasm") width in pixels: the background pixels that
        :func:`skimage.segmentation.expand_labels` gives each nucleus. Default
        ``round(RING_DIAMETERS * median_diameter)``, at least 1. A nucleus without ring pixels gets its
        own mean there.

    Returns
    -------
    ndarray (N, 12), float32
        Columns :data:`MEASUREMENT_NAMES`; optical densities are unitless, ``log_area`` is ``ln(px²)``,
        eccentricity and solidity are in [0, 1] (``skimage.measure.regionprops``).

    Raises
    ------
    InvalidInputError
        Labels of another shape than the image, non-integer labels, or an id absent from *labels*.
    """
    from scipy import ndimage as ndi
    from skimage.measure import regionprops
    from skimage.segmentation import expand_labels

    from .features import _as_hwc

    hwc = _as_hwc(image)
    lab = _check_labels(labels, hwc.shape[:2])
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.size == 0:
        return np.zeros((0, N_MEASUREMENTS), np.float32)
    props = {p.label: p for p in regionprops(lab)}
    missing = [int(i) for i in ids if int(i) not in props]
    if missing:
        raise InvalidInputError(f"nucleus ids not in labels: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if ring_px is None:
        ring_px = max(1, int(round(RING_DIAMETERS * median_diameter(lab, ids))))
    if int(ring_px) < 1:
        raise InvalidInputError(f"ring_px must be >= 1, got {ring_px}")
    ring = np.where(lab == 0, expand_labels(lab, int(ring_px)), 0)
    cols = []
    with np.errstate(invalid="ignore", divide="ignore"):
        for channel in _stains(hwc):
            inside = np.asarray(ndi.mean(channel, lab, ids), np.float64)
            sd = np.asarray(ndi.standard_deviation(channel, lab, ids), np.float64)
            around = np.asarray(ndi.mean(channel, ring, ids), np.float64)
            cols += [inside, sd, np.where(np.isfinite(around), around, inside)]
    area = np.array([props[int(i)].area for i in ids], np.float64)
    cols += [np.log(area), np.array([props[int(i)].eccentricity for i in ids]),
             np.array([props[int(i)].solidity for i in ids])]
    return np.nan_to_num(np.stack(cols, axis=1)).astype(np.float32)


def column_weights(cnn_dim: int, n_measurements: int = N_MEASUREMENTS, *, ratio: float = 1.0) -> np.ndarray:
    """Classifier column weights that balance a CNN block and a measurement block after standardisation.

    Every standardised column has variance 1, so a block of ``n`` columns contributes ``n`` to the first
    layer's input variance. Weighting the measurement columns by ``sqrt(ratio * cnn_dim / n_measurements)``
    gives the measurement block *ratio* times the CNN block's total (default 1, equal: 1280 and 12 columns
    get weight 10.3). Pass the result as the classifier's ``column_weights`` training option.

    Returns
    -------
    ndarray (cnn_dim + n_measurements,), float64
    """
    if cnn_dim < 1 or n_measurements < 0:
        raise InvalidInputError(f"cnn_dim must be >= 1 and n_measurements >= 0, got {cnn_dim}, {n_measurements}")
    if not (np.isfinite(ratio) and ratio > 0):
        raise InvalidInputError(f"ratio must be a positive number, got {ratio!r}")
    w = np.ones(int(cnn_dim) + int(n_measurements))
    if n_measurements:
        w[int(cnn_dim):] = np.sqrt(ratio * cnn_dim / n_measurements)
    return w


def cell_features(image: ArrayLike, labels: ArrayLike, ids: ArrayLike, centroids_xy: ArrayLike, extractor, *,
                  store=None, diameters: float = PATCH_DIAMETERS, progress: bool | None = None) -> np.ndarray:
    """The HALS cell features: CNN features of a nucleus-scaled patch, then :func:`nucleus_measurements`.

    Parameters
    ----------
    image : array-like (H, W) or (H, W, C)
    labels : array-like (H, W) of int
        Instance labels of the nuclei (the nucleus service's ``labels``).
    ids : array-like (N,) of int
        Label value of each nucleus, in the order of *centroids_xy*.
    centroids_xy : array-like (N, 2)
        ``[x, y]`` pixels (:mod:`colabel.coords`).
    extractor : FeatureExtractor
        E.g. :class:`~colabel.services.hals.features.EfficientNetLite0Features`.
    store : FeatureStore, optional
        Caches the CNN block (keyed on image, centroids, extractor and the scaled patch size).
    diameters : float
        Patch side in median nucleus diameters (:func:`patch_size_for`).

    Returns
    -------
    ndarray (N, extractor.dim + 12), float32
        Use :func:`column_weights(extractor.dim) <column_weights>` when training on them.
    """
    from .features import compute_features

    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    xy = np.asarray(centroids_xy, dtype=np.float64).reshape(-1, 2)
    if len(ids) != len(xy):
        raise InvalidInputError(f"{len(ids)} nucleus ids for {len(xy)} centroids: one id per centroid")
    if len(ids) == 0:
        return np.zeros((0, int(extractor.dim) + N_MEASUREMENTS), np.float32)
    measures = nucleus_measurements(image, labels, ids)  # validates labels and ids first
    size = patch_size_for(median_diameter(labels, ids), diameters=diameters)
    if store is not None:
        cnn = store.get_or_compute(image, xy, extractor, patch_size=size, progress=progress)
    else:
        cnn = compute_features(image, xy, extractor, patch_size=size, progress=progress)
    return np.ascontiguousarray(np.hstack([cnn, measures]), dtype=np.float32)
