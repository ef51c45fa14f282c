"""Pre-annotations: a segmenter trained by ``colabel train`` proposes outlines on images nobody has saved yet.

The annotator page loads them as editable polygons marked ``objectType: "detection"`` and
``colabel_source: "preannotation"``; nothing is stored until the annotator saves (accepting, correcting or
deleting them), so every saved version is a human's.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from pathlib import Path

from .provider import DataProvider


class PreAnnotator:
    """Predictions of a saved :class:`~colabel.services.training.segmenter_training.TrainedSegmenter`.

    Each image is predicted once; the last ``max_cached`` images' proposals are kept in memory (least
    recently used dropped first). ``predictions`` counts the model runs.
    """

    def __init__(self, provider: DataProvider, model_path: str | Path, *, max_cached: int = 64) -> None:
        from colabel.services.training.segmenter_training import TrainedSegmenter

        self.provider = provider
        self.model_path = Path(model_path)
        self.model = TrainedSegmenter.load(self.model_path)
        if max_cached < 1:
            raise ValueError(f"max_cached must be at least 1, got {max_cached}")
        self.max_cached = max_cached
        self.predictions = 0
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, dict] = OrderedDict()

    def _predict(self, session, image_id: str) -> dict:
        from colabel.services.nuclei import measure_nuclei

        with self._lock:
            if image_id in self._cache:
                self._cache.move_to_end(image_id)
                return self._cache[image_id]
            pixels = self.provider.get_image(image_id, session=session)
            image = self._match_channels(pixels)
            labels, _uncertainty = self.model.predict(image)
            _, nuclei = measure_nuclei(labels)
            features = [{"type": "Feature", "geometry": n.polygon,
                         "properties": {"objectType": "detection", "colabel_source": "preannotation"}}
                        for n in nuclei]
            result = {"type": "FeatureCollection", "features": features, "model": self.model_path.name}
            self.predictions += 1
            self._cache[image_id] = result
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
            return result

    def _match_channels(self, pixels):
        """(H, W, C) -> what the model was trained on: grey (mean of channels) or 3 channels."""
        import numpy as np

        wanted = int(self.model.config.get("in_channels", pixels.shape[-1]))
        if wanted == 1:
            return pixels[..., 0] if pixels.shape[-1] == 1 else pixels[..., :3].mean(axis=-1).astype(np.float32)
        if pixels.shape[-1] == 1:
            return np.repeat(pixels, wanted, axis=-1)
        return pixels[..., :wanted]

    async def pre_annotation(self, session, image_id: str) -> dict:
        """A FeatureCollection of predicted outlines (image pixels) for an image of the session."""
        self.provider._check_in_session(session, image_id)
        return await asyncio.to_thread(self._predict, session, image_id)
