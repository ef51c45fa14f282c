"""The interactive-segmentation model service: a plain class that Ray Serve deploys and the gateway exposes.

It offers BioImage.IO Colab's SAM functions unchanged (``hello``, ``ping``, ``compute_embedding``,
``get_onnx_model``, ``segment_image``; ``deployment_status`` comes from the gateway) and colabel's own:
``embed`` (image -> embedding id, computed once per image content and model, shared through the store by
every replica), ``segment`` (embedding id + prompts -> GeoJSON polygons, score) and ``generate``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from colabel.errors import InvalidInputError, NotFoundError

from .colab import ColabSam, ModelPool
from .embeddings import DEFAULT_MAX_BYTES, DEFAULT_MAX_DISK_BYTES
from .segmenter import ambiguous_prompt


class SamService(ColabSam):
    """SAM / micro-sam prompts for any number of annotators and replicas.

    Parameters
    ----------
    default_model : str
        Model id used when a call names none (``sam_vit_b_lm``: micro-sam's light-microscopy ViT-B).
    checkpoints : dict, optional
        Model id -> local checkpoint path (no download), or ``{"id": ["vit_b", "/path.pt"]}``.
    weights_dir : str, optional
        Download cache for published weights.
    embedding_dir : str, optional
        The embedding store shared by replicas (npz files + a lock per image).
    device, tile_size, overlap, max_models : see :class:`ModelPool`.
    embedding_memory_bytes : int, default 2 GiB
        Byte budget of the in-memory embedding cache per replica.
    embedding_disk_bytes : int or None, default 20 GiB
        Byte budget of the embedding store on disk, shared by the replicas: the least recently used embeddings
        are deleted past it (None or 0: unbounded; see :class:`EmbeddingStore`).
    """

    rpc_functions = ("hello", "ping", "info", "compute_embedding", "get_onnx_model", "segment_image",
                     "embed", "segment", "generate", "encoder_passes")

    def __init__(self, default_model: str = "sam_vit_b_lm", checkpoints: dict | None = None,
                 weights_dir: str | None = None, embedding_dir: str | None = None, device: str | None = None,
                 tile_size: int | None = None, overlap: int = 64, max_models: int = 2,
                 embedding_memory_bytes: int = DEFAULT_MAX_BYTES,
                 embedding_disk_bytes: int | None = DEFAULT_MAX_DISK_BYTES) -> None:
        pool = ModelPool(checkpoints=checkpoints, weights_dir=weights_dir, embedding_dir=embedding_dir,
                         device=device, max_models=max_models, tile_size=tile_size, overlap=overlap,
                         progress=False, embedding_memory_bytes=embedding_memory_bytes,
                         embedding_disk_bytes=embedding_disk_bytes)
        super().__init__(pool, default_model=default_model)

    def info(self) -> dict:
        """Default model, models that can be loaded and those loaded now."""
        return {"default_model": self.default_model, "known": self.models.known(), "loaded": self.models.loaded()}

    def embed(self, image: np.ndarray, model_id: str | None = None) -> dict:
        """Make sure the embedding of ``image`` (H, W) or (H, W, C) exists; computed at most once per content.

        Returns ``{embedding_id, model_id, image_shape [H, W], n_tiles}``.
        """
        segmenter = self._model(model_id)
        embedding = segmenter.embed(image)
        return {"embedding_id": embedding.key, "model_id": segmenter.model_id,
                "image_shape": list(embedding.image_shape), "n_tiles": embedding.n_tiles}

    def segment(self, embedding_id: str, model_id: str | None = None, points: Any = None, labels: Any = None,
                box: Any = None, multimask: bool | None = None, mask_input: Any = None,
                return_logits: bool = False) -> dict:
        """Segment one object of an embedded image from positive/negative points and/or a box.

        ``points`` (N, 2) ``[x, y]`` image pixels with ``labels`` (N,) 1 positive / 0 negative; ``box``
        ``[x0, y0, x1, y1]``. Returns ``{features: GeoJSON Features (image pixels), score, tiles_used,
        bbox}`` for the one object the prompts point at (the connected part holding a positive point, or
        the largest; specks dropped, small holes filled); raises NotFoundError when no replica has the
        embedding (call ``embed`` first). Refine an earlier answer by passing its ``low_res_logits``
        (returned with ``return_logits=True``, (1, 256, 256) float32 for the published models) as
        ``mask_input``: SAM's "previous mask" prompt. ``multimask`` None follows SAM's exported decoder (what
        browsers run): the best of three masks for an ambiguous prompt (one point without a box, or a box
        alone), the single-mask output otherwise; so browser and server give the same outline.
        """
        if not isinstance(embedding_id, str) or not embedding_id:
            raise InvalidInputError("embedding_id must be the id returned by embed")
        segmenter = self._model(model_id)
        embedding = segmenter.load_embedding(embedding_id)
        if embedding is None:
            raise NotFoundError(f"unknown embedding {embedding_id[:16]}...; call embed with the image first")
        result = segmenter.segment(embedding, points=points, point_labels=labels, box=box, mask_input=mask_input,
                                   multimask=ambiguous_prompt(points, box) if multimask is None else multimask,
                                   single_object=True)
        rows, cols = np.nonzero(result.mask)
        bbox = ([int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1]
                if rows.size else None)
        out = {"features": result.polygons, "score": float(result.score), "tiles_used": list(result.tiles_used),
               "bbox": bbox}
        if return_logits:
            out["low_res_logits"] = np.asarray(result.low_res_logits, dtype=np.float32)
        return out

    def generate(self, image: np.ndarray, model_id: str | None = None, points_per_side: int = 32,
                 pred_iou_thresh: float = 0.88, stability_score_thresh: float = 0.95,
                 min_mask_region_area: int = 0) -> dict:
        """Automatic mask generation for a whole image: ``{labels: (H, W) uint32, count}``."""
        labels = self._model(model_id).generate(
            image, points_per_side=points_per_side, pred_iou_thresh=pred_iou_thresh,
            stability_score_thresh=stability_score_thresh, min_mask_region_area=min_mask_region_area)
        return {"labels": labels, "count": int(labels.max())}

    def encoder_passes(self, embedding_id: str | None = None) -> int:
        """Encoder passes recorded in the shared store by every replica (for one embedding, if given)."""
        return self.models.store.computed_total(embedding_id)
