"""Interactive segmentation with Segment Anything (SAM and micro-sam weights), usable in-process.

Pure model code: nothing here imports ray or hypha_rpc, and torch / segment_anything are imported only
inside the functions that need them, so ``import colabel.services.sam`` is fast.

Modules
-------
registry
    Model ids -> architecture, published URL and checksum; building SAM (also tiny test configs) and
    loading checkpoints (plain state dicts, micro-sam ``model_state`` with ``sam.`` prefixes, ``model``).
embeddings
    :class:`~colabel.services.sam.embeddings.EmbeddingStore`: image embeddings computed once, kept on
    disk and in a bounded in-memory LRU, safe across processes.
segmenter
    :class:`~colabel.services.sam.segmenter.SamSegmenter`: ``embed`` / ``segment`` / ``generate`` with
    tiling of large images, exact SAM coordinate transforms and GeoJSON polygons.
colab
    :class:`~colabel.services.sam.colab.ColabSam`: BioImage.IO Colab-compatible functions over a
    :class:`~colabel.services.sam.colab.ModelPool`.
"""

from __future__ import annotations

__all__ = [
    "ModelSpec",
    "SamConfig",
    "MODELS",
    "resolve",
    "build_sam",
    "load_sam",
    "EmbeddingStore",
    "SamSegmenter",
    "ImageEmbedding",
    "SegmentResult",
    "mask_to_features",
    "ColabSam",
    "ModelPool",
]

_LAZY = {
    "ModelSpec": "registry",
    "SamConfig": "registry",
    "MODELS": "registry",
    "resolve": "registry",
    "build_sam": "registry",
    "load_sam": "registry",
    "EmbeddingStore": "embeddings",
    "SamSegmenter": "segmenter",
    "ImageEmbedding": "segmenter",
    "SegmentResult": "segmenter",
    "mask_to_features": "polygons",
    "ColabSam": "colab",
    "ModelPool": "colab",
}


def __getattr__(name: str):
    """Import the submodule that defines *name* on first use (keeps the package import cheap)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
