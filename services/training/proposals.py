"""Pre-annotation proposals of a trained segmenter on one image: instances, pixel uncertainty and GeoJSON outlines.

Pure code shared by the annotator's pre-annotations (``colabel serve --preannotate``) and the batch command
(``colabel predict``): pixels in, arrays and GeoJSON Features (image pixel coordinates, QuPath's conventions)
out; nothing is read or written here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: The default ``review_uncertainty``: on ``bench/pretrain.py``'s 10 held-out tiles the saved ensemble of 3
#: flags 7 of its 89 proposals at 0.03, and they hold 3 of its 4 wrong ones.
REVIEW_UNCERTAINTY = 0.03


@dataclass(frozen=True)
class Proposals:
    """What a segmenter proposes for one image.

    Attributes
    ----------
    labels : ndarray (H, W), uint32
        Instances ``1..N`` (each its largest 8-connected piece), 0 = background.
    uncertainty : ndarray (H, W), float32
        Standard deviation of the foreground probability over the ensemble's members (0..0.5; zeros for one).
    features : list of dict
        One GeoJSON Feature per instance, in the order of ``labels``' ids: a Polygon in image pixels with
        properties ``objectType: "detection"``, ``colabel_source: "preannotation"`` and, for ensembles,
        ``colabel_uncertainty`` (mean of ``uncertainty`` over the object) and ``colabel_review: true`` where that
        is at least the review threshold.
    """

    labels: np.ndarray
    uncertainty: np.ndarray
    features: list[dict]

    @property
    def n_review(self) -> int:
        """Number of proposals flagged for review (``colabel_review``)."""
        return sum(bool(f["properties"].get("colabel_review")) for f in self.features)


def model_input(model, pixels: np.ndarray) -> np.ndarray:
    """``(H, W, C)`` pixels as ``model`` was trained on them: grey (the mean of the first three channels when
    the image has more) for 1-channel models, else the first ``in_channels`` channels (a grey image repeated)."""
    from .segmenter_training import to_model_channels

    pixels = np.asarray(pixels)
    return to_model_channels(pixels, int(model.config.get("in_channels", 1 if pixels.ndim == 2 else pixels.shape[-1])))


def propose(model, pixels: np.ndarray, *, review_uncertainty: float = REVIEW_UNCERTAINTY) -> Proposals:
    """Segment ``pixels`` (``(H, W)`` or ``(H, W, C)``, any dtype) with a
    :class:`~colabel.services.training.segmenter_training.TrainedSegmenter` and outline its instances."""
    from colabel.errors import InvalidInputError
    from colabel.services.nuclei import measure_nuclei

    if not 0 < review_uncertainty <= 0.5:
        raise InvalidInputError(f"review_uncertainty must be in (0, 0.5], got {review_uncertainty}")
    labels, uncertainty = model.predict(model_input(model, pixels))
    labels, nuclei = measure_nuclei(labels)
    features = [{"type": "Feature", "geometry": n.polygon,
                 "properties": {"objectType": "detection", "colabel_source": "preannotation"}} for n in nuclei]
    if len(model.state_dicts) > 1 and nuclei:
        from scipy import ndimage as ndi

        per_object = ndi.mean(uncertainty, labels, index=np.arange(1, len(nuclei) + 1))
        for feature, value in zip(features, per_object, strict=True):
            feature["properties"]["colabel_uncertainty"] = round(float(value), 4)
            if value >= review_uncertainty:
                feature["properties"]["colabel_review"] = True
    return Proposals(labels=labels, uncertainty=uncertainty, features=features)
