"""Pre-annotations: a segmenter trained by ``colabel train`` proposes outlines on images nobody has saved yet.

The annotator page loads them as editable polygons marked ``objectType: "detection"`` and
``colabel_source: "preannotation"``; nothing is stored until the annotator saves (accepting, correcting or
deleting them), so every saved version is a human's.

With an ensemble model (``colabel train --ensemble K``, K >= 2) each proposal also carries
``colabel_uncertainty``: the mean over its pixels of the members' standard deviation of the foreground
probability (0 = all members agree; at most 0.5), and ``colabel_review: true`` where that is at least
``review_uncertainty`` (default 0.03); the page outlines those dashed, to be checked first. On
``bench/pretrain.py``'s 10 held-out tiles the saved ensemble of 3 flags 7 of its 89 proposals at 0.03, and
they hold 3 of its 4 wrong ones (the median proposal's uncertainty is 0.011).
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from pathlib import Path

from colabel.services.training.proposals import REVIEW_UNCERTAINTY

from .provider import DataProvider


class PreAnnotator:
    """Predictions of a saved :class:`~colabel.services.training.segmenter_training.TrainedSegmenter`.

    Each image is predicted once; the last ``max_cached`` images' proposals are kept in memory (least
    recently used dropped first). ``predictions`` counts the model runs. An image the model cannot take (e.g. a
    2-channel image for an RGB model) is refused with an :class:`~colabel.errors.InvalidInputError` naming it,
    which the annotator page shows ("pre-annotations unavailable: ..."); the refusal is kept like proposals, and
    other images are predicted as before. ``model``: the segmenter already
    loaded from ``model_path`` (``colabel serve`` reads it once to check it), or None to load it here.
    """

    def __init__(self, provider: DataProvider, model_path: str | Path, *, max_cached: int = 64,
                 review_uncertainty: float = REVIEW_UNCERTAINTY, model=None) -> None:
        from colabel.services.training.segmenter_training import TrainedSegmenter

        self.provider = provider
        self.model_path = Path(model_path)
        self.model = model if model is not None else TrainedSegmenter.load(self.model_path)
        if max_cached < 1:
            raise ValueError(f"max_cached must be at least 1, got {max_cached}")
        self.max_cached = max_cached
        if not 0 < review_uncertainty <= 0.5:
            raise ValueError(f"review_uncertainty must be in (0, 0.5], got {review_uncertainty}")
        self.review_uncertainty = float(review_uncertainty)
        self.predictions = 0
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, dict | str] = OrderedDict()  # proposals, or why the model cannot take it

    def _predict(self, session, image_id: str) -> dict:
        from colabel.errors import InvalidInputError
        from colabel.services.training.proposals import propose

        with self._lock:
            if image_id in self._cache:
                self._cache.move_to_end(image_id)
                result = self._cache[image_id]
            else:
                pixels = self.provider.get_image(image_id, session=session)
                try:
                    proposals = propose(self.model, pixels, review_uncertainty=self.review_uncertainty)
                except InvalidInputError as exc:  # this image only: others are still predicted
                    name = self.provider.catalog.get(image_id).name
                    result = f"the model {self.model_path.name} cannot take {name}: {exc}"
                else:
                    result = {"type": "FeatureCollection", "features": proposals.features,
                              "model": self.model_path.name}
                    self.predictions += 1
                self._cache[image_id] = result
                while len(self._cache) > self.max_cached:
                    self._cache.popitem(last=False)
        if isinstance(result, str):
            raise InvalidInputError(result)
        return result

    async def pre_annotation(self, session, image_id: str) -> dict:
        """A FeatureCollection of predicted outlines (image pixels) for an image of the session."""
        self.provider._check_in_session(session, image_id)
        return await asyncio.to_thread(self._predict, session, image_id)
