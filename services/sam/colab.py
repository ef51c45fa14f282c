"""BioImage.IO Colab compatibility: the functions of its SAM service, with the same return shapes.

BioImage.IO Colab's browser client computes the image embedding on the server, downloads the ONNX prompt
decoder once, and decodes clicks locally. :class:`ColabSam` offers the same functions over a
:class:`ModelPool` of :class:`~colabel.services.sam.segmenter.SamSegmenter`:

``hello()``, ``ping()`` -> ``"pong"``, ``deployment_status()``,
``compute_embedding(image, model_id)`` -> ``{"features": (1, 256, 64, 64) float32,
"original_image_shape": [H, W], "sam_scale": 1024 / max(H, W), "mask_threshold": 0.0}``
(a tiny test model gives its own feature size and scale),
``get_onnx_model(model_id, quantize=True)`` -> ONNX bytes of segment_anything's ``SamOnnxModel``
(inputs ``image_embeddings, point_coords, point_labels, mask_input, has_mask_input, orig_im_size``;
outputs ``masks, iou_predictions, low_res_masks``), and
``segment_image(image, model_id, points_per_side, pred_iou_thresh, stability_score_thresh,
min_mask_region_area)`` -> ``{"mask": (H, W) uint32 label image}`` (Colab used uint16).

As in Colab, ``compute_embedding`` embeds the whole image resized to the model input (no tiling). Colab's
client maps clicks with ``[x, y] * sam_scale``; the exact mapping, which the server uses
(:func:`~colabel.services.sam.transforms.points_to_model`) and colabel's page too, is
``[x * round(W*s)/W - 0.5, y * round(H*s)/H - 0.5]`` with ``s = sam_scale``. Unlike Colab's export, the
exported decoder crops the padding for the real ``orig_im_size`` (see :func:`_exportable_onnx_model`), so
masks of non-square images are not stretched. Plain class: no ray, no hypha_rpc.
"""

from __future__ import annotations

import copy
import os
import tempfile
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from colabel.errors import InvalidInputError

from .embeddings import DEFAULT_MAX_BYTES, DEFAULT_MAX_DISK_BYTES, EmbeddingStore
from .segmenter import SamSegmenter, default_embedding_dir

__all__ = ["ModelPool", "ColabSam", "export_onnx_decoder"]

#: torch's TorchScript ONNX exporter keeps process-wide state (``GLOBALS.in_onnx_export``, export options):
#: two ``torch.onnx.export`` calls at once in one process break each other ("GLOBALS.in_onnx_export must be
#: True"), so that call, and only that call, is serialised across threads. Copying the decoder before it and
#: the quantisation after it run in parallel.
_TORCH_ONNX_EXPORT_LOCK = threading.Lock()


class ModelPool:
    """Loads :class:`SamSegmenter` s lazily per model id and keeps at most *max_models* of them.

    Parameters
    ----------
    checkpoints : mapping, optional
        Local checkpoint files per model id (see :func:`colabel.services.sam.registry.resolve`).
    weights_dir, embedding_dir : path-like, optional
        Weights cache and embedding store folders (defaults as in :class:`SamSegmenter`).
    device : str, optional
    max_models : int, default 2
        Least recently used segmenters beyond this are dropped.
    tile_size, overlap : optional
        Passed to each segmenter.
    progress : bool, default True
    factory : callable, optional
        ``(model_id) -> SamSegmenter``, replacing the default loader (e.g. to wrap prebuilt models).
    embedding_memory_bytes : int, default 2 GiB
        Byte budget of the embedding store's in-memory LRU (see :class:`EmbeddingStore` ``max_bytes``).
    embedding_disk_bytes : int or None, default 20 GiB
        Byte budget of the embedding store's ``.npz`` files on disk, least recently used deleted first;
        ``None`` or 0: unbounded (see :class:`EmbeddingStore` ``max_disk_bytes``).
    """

    def __init__(
        self,
        *,
        checkpoints: Mapping[str, Any] | None = None,
        weights_dir: str | os.PathLike | None = None,
        embedding_dir: str | os.PathLike | None = None,
        device: str | None = None,
        max_models: int = 2,
        tile_size: int | None = None,
        overlap: int = 64,
        progress: bool = True,
        factory: Callable[[str], SamSegmenter] | None = None,
        embedding_memory_bytes: int = DEFAULT_MAX_BYTES,
        embedding_disk_bytes: int | None = DEFAULT_MAX_DISK_BYTES,
    ) -> None:
        if not isinstance(max_models, int) or max_models < 1:
            raise InvalidInputError(f"max_models must be an int >= 1, got {max_models!r}")
        self.checkpoints = dict(checkpoints or {})
        self.weights_dir = weights_dir
        self.store = EmbeddingStore(embedding_dir or default_embedding_dir(), max_bytes=embedding_memory_bytes,
                                    max_disk_bytes=embedding_disk_bytes)
        self.device = device
        self.max_models = max_models
        self.tile_size = tile_size
        self.overlap = overlap
        self.progress = progress
        self._factory = factory
        self._models: OrderedDict[str, SamSegmenter] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    def known(self) -> list[str]:
        """Model ids that can be loaded (published ones plus configured checkpoints)."""
        from .registry import known_model_ids

        return known_model_ids(self.checkpoints)

    def loaded(self) -> list[str]:
        """Ids of the segmenters in memory, least recently used first."""
        with self._lock:
            return list(self._models)

    def spec(self, model_id: str):
        from .registry import resolve

        return resolve(model_id, checkpoints=self.checkpoints)

    def _load(self, model_id: str) -> SamSegmenter:
        if self._factory is not None:
            return self._factory(model_id)
        return SamSegmenter(
            model_id, checkpoints=self.checkpoints, weights_dir=self.weights_dir, store=self.store,
            device=self.device, tile_size=self.tile_size, overlap=self.overlap, progress=self.progress,
        )

    def get(self, model_id: str) -> SamSegmenter:
        """The segmenter of *model_id*, loading it on first use (one load per id even under threads).

        Raises
        ------
        NotFoundError, InvalidInputError, colabel.services.weights.WeightsUnavailableError
        """
        if not isinstance(model_id, str) or not model_id:
            raise InvalidInputError(f"model_id must be a non-empty string, got {model_id!r}")
        with self._lock:
            if model_id in self._models:
                self._models.move_to_end(model_id)
                return self._models[model_id]
            loading = self._loading.setdefault(model_id, threading.Lock())
        with loading:
            with self._lock:
                if model_id in self._models:
                    self._models.move_to_end(model_id)
                    return self._models[model_id]
            if self._factory is None:
                self.spec(model_id)  # NotFoundError before any download
            segmenter = self._load(model_id)
            with self._lock:
                self._models[model_id] = segmenter
                while len(self._models) > self.max_models:
                    self._models.popitem(last=False)
                self._loading.pop(model_id, None)
            return segmenter


def _decoder_only(sam):
    """What ``SamOnnxModel`` reads from a Sam, on the CPU, without copying the (large) image encoder.

    A deep copy (the prompt encoder and mask decoder: a few MiB even for ViT-H), so the caller may hold the
    segmenter's lock only while this runs and export from the copy outside it. A result of this function
    passed again is returned as is.
    """
    import torch

    if getattr(sam, "colabel_decoder_only", False):
        return sam

    class DecoderOnly(torch.nn.Module):
        colabel_decoder_only = True

        def __init__(self) -> None:
            super().__init__()
            self.prompt_encoder = copy.deepcopy(sam.prompt_encoder).cpu().eval()
            self.mask_decoder = copy.deepcopy(sam.mask_decoder).cpu().eval()
            self.image_encoder = type("ImageEncoderInfo", (), {"img_size": int(sam.image_encoder.img_size)})()
            self.mask_threshold = float(sam.mask_threshold)

    return DecoderOnly()


def _exportable_onnx_model(base):
    """``SamOnnxModel`` with a mask crop that stays dynamic in the exported graph.

    segment_anything's ``mask_postprocessing`` crops the padded mask with
    ``masks[..., :int(prepadded_size[0]), :int(prepadded_size[1])]``; ``int()`` of a traced tensor is
    frozen into the ONNX graph as the value of the *dummy* ``orig_im_size`` used at export time. Exported
    with a square dummy (as BioImage.IO Colab does), the graph never crops, and masks of non-square images
    are stretched over the padding. Here the crop gathers ``arange(prepadded_size)`` rows and columns, which
    the exporter keeps dynamic (ONNX ``Range`` + ``Gather``), giving exactly the torch result for any size.
    """
    import torch
    import torch.nn.functional as F

    class ExportableSamOnnxModel(base):
        def mask_postprocessing(self, masks, orig_im_size):
            masks = F.interpolate(masks, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
            prepadded = self.resize_longest_image_size(orig_im_size, self.img_size)
            rows = torch.arange(prepadded[0], device=masks.device)
            cols = torch.arange(prepadded[1], device=masks.device)
            masks = masks.index_select(2, rows).index_select(3, cols)
            size = orig_im_size.to(torch.int64)
            return F.interpolate(masks, size=(size[0], size[1]), mode="bilinear", align_corners=False)

    return ExportableSamOnnxModel


def export_onnx_decoder(sam, *, quantize: bool = True, opset: int = 17) -> bytes:
    """Export SAM's prompt encoder + mask decoder as BioImage.IO Colab / SAM's ONNX example do.

    Parameters
    ----------
    sam : segment_anything.modeling.Sam
        Or what :func:`_decoder_only` made of one (then used without another copy).
    quantize : bool, default True
        Dynamic uint8 weight quantisation with onnxruntime (about 4x smaller, as Colab serves it).
    opset : int, default 17

    Returns
    -------
    model : bytes
        An ONNX model with inputs ``image_embeddings (1, C, g, g)``, ``point_coords (1, N, 2)`` (model
        frame: ``[x * round(W*s)/W - 0.5, y * round(H*s)/H - 0.5]``, see
        :func:`~colabel.services.sam.transforms.points_to_model`), ``point_labels (1, N)`` (1 pos, 0 neg,
        -1 padding, 2/3 box corners), ``mask_input (1, 1, 4g, 4g)``, ``has_mask_input (1,)``,
        ``orig_im_size (2,)`` ``[H, W]``, all float32; outputs ``masks (1, 1, H, W)`` logits,
        ``iou_predictions (1, 1)``, ``low_res_masks``.
    """
    import torch

    from colabel.services.torchvision_compat import install

    install()
    from segment_anything.utils.onnx import SamOnnxModel

    decoder = _decoder_only(sam)
    onnx_model = _exportable_onnx_model(SamOnnxModel)(
        model=decoder, return_single_mask=True, use_stability_score=False, return_extra_metrics=False
    )
    embed_dim = decoder.prompt_encoder.embed_dim
    embed_size = tuple(decoder.prompt_encoder.image_embedding_size)
    img_size = int(decoder.image_encoder.img_size)
    mask_size = [4 * x for x in embed_size]
    dummy = {
        "image_embeddings": torch.randn(1, embed_dim, *embed_size, dtype=torch.float),
        "point_coords": torch.randint(low=0, high=img_size, size=(1, 5, 2), dtype=torch.float),
        "point_labels": torch.randint(low=0, high=4, size=(1, 5), dtype=torch.float),
        "mask_input": torch.randn(1, 1, *mask_size, dtype=torch.float),
        "has_mask_input": torch.tensor([1], dtype=torch.float),
        "orig_im_size": torch.tensor([img_size, img_size], dtype=torch.float),
    }
    with tempfile.TemporaryDirectory(prefix="colabel-onnx-") as tmp:
        path = Path(tmp) / "decoder.onnx"
        with _TORCH_ONNX_EXPORT_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                onnx_model,
                tuple(dummy.values()),
                str(path),
                export_params=True,
                verbose=False,
                opset_version=opset,
                do_constant_folding=True,
                input_names=list(dummy),
                output_names=["masks", "iou_predictions", "low_res_masks"],
                dynamic_axes={"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}},
                dynamo=False,
            )
        if quantize:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantized = Path(tmp) / "decoder_quantized.onnx"
            # no warnings.catch_warnings() here: it swaps the process-wide filters and is not thread-safe, so it
            # is used only under the export lock above (quantize_dynamic emits no Python warnings anyway)
            quantize_dynamic(model_input=str(path), model_output=str(quantized), per_channel=False,
                             reduce_range=False, weight_type=QuantType.QUInt8)
            path = quantized
        return path.read_bytes()


class ColabSam:
    """BioImage.IO Colab's SAM service functions over a :class:`ModelPool`.

    Parameters
    ----------
    models : ModelPool
    default_model : str, optional
        Model id used when a call passes ``model_id=None``; without it ``None`` is refused.

    Examples
    --------
    >>> colab = ColabSam(ModelPool())  # doctest: +SKIP
    >>> out = colab.compute_embedding(image, "sam_vit_b_lm")  # doctest: +SKIP
    >>> out["features"].shape, out["sam_scale"] == 1024 / max(image.shape[:2])  # doctest: +SKIP
    ((1, 256, 64, 64), True)
    """

    def __init__(self, models: ModelPool, default_model: str | None = None) -> None:
        self.models = models
        self.default_model = default_model
        self._onnx: dict[tuple[str, bool], bytes] = {}
        self._onnx_lock = threading.Lock()  # guards the two dicts only, never held during an export
        self._onnx_exporting: dict[tuple[str, bool], threading.Lock] = {}  # one export at a time per key

    def _model_id(self, model_id: str | None) -> str:
        """*model_id*, or the default model for None (InvalidInputError when there is none)."""
        if model_id is not None:
            return model_id
        if self.default_model is None:
            raise InvalidInputError("model_id is required: this service has no default model")
        return self.default_model

    def _model(self, model_id: str | None) -> SamSegmenter:
        """The segmenter of *model_id* (None: the default model), loaded on first use."""
        return self.models.get(self._model_id(model_id))

    def hello(self) -> str:
        return "Welcome to the Interactive Segmentation service!"

    def ping(self) -> str:
        return "pong"

    def deployment_status(self) -> dict[str, Any]:
        """``{"status": "ready", "loaded": [...], "models": {id: {..., "loaded": bool}}}``."""
        loaded = self.models.loaded()
        models = {}
        for model_id in self.models.known():
            info = self.models.spec(model_id).info()
            info["loaded"] = model_id in loaded
            models[model_id] = info
        return {"status": "ready", "loaded": loaded, "models": models}

    def compute_embedding(self, image: np.ndarray, model_id: str | None = None) -> dict[str, Any]:
        """The whole-image embedding in Colab's format (``model_id`` None: the default model).

        Returns
        -------
        dict
            ``features`` ndarray (1, C, g, g) float32; ``original_image_shape`` [H, W];
            ``sam_scale`` float = model input size / max(H, W); ``mask_threshold`` float (0.0).
        """
        segmenter = self._model(model_id)
        embedding = segmenter.embed(image, tiling=False)
        height, width = embedding.image_shape
        return {
            "features": np.ascontiguousarray(embedding.features[0:1], dtype=np.float32),
            "original_image_shape": [int(height), int(width)],
            "sam_scale": segmenter.long_side / max(height, width),
            "mask_threshold": segmenter.mask_threshold,
        }

    def get_onnx_model(self, model_id: str | None = None, quantize: bool = True) -> bytes:
        """ONNX bytes of the prompt decoder of *model_id* (None: the default model; exported once per id and
        quantisation).

        Concurrent calls for one (model, quantize) wait for a single export; calls for other keys go on in
        parallel, except for torch's exporter call itself, which is not thread-safe (one at a time per
        process). The segmenter's lock is held only to copy the prompt encoder and mask decoder, so prompts and
        embeddings on the model go on during the export (seconds) and quantisation.
        """
        if not isinstance(quantize, (bool, np.bool_)):
            raise InvalidInputError(f"quantize must be true or false, got {quantize!r}")
        model_id = self._model_id(model_id)
        key = (model_id, bool(quantize))
        with self._onnx_lock:
            if key in self._onnx:
                return self._onnx[key]
        segmenter = self.models.get(model_id)  # unknown ids raise here, so only real keys get an export lock
        with self._onnx_lock:
            exporting = self._onnx_exporting.setdefault(key, threading.Lock())
        with exporting:
            with self._onnx_lock:
                if key in self._onnx:  # exported by the call we waited for
                    return self._onnx[key]
            with segmenter._lock:  # a consistent copy: no torch call on this model runs meanwhile
                decoder = _decoder_only(segmenter.sam)
            data = export_onnx_decoder(decoder, quantize=bool(quantize))
            with self._onnx_lock:
                self._onnx[key] = data
                self._onnx_exporting.pop(key, None)
            return data

    def segment_image(
        self,
        image: np.ndarray,
        model_id: str | None = None,
        points_per_side: int | None = 32,
        pred_iou_thresh: float | None = 0.88,
        stability_score_thresh: float | None = 0.95,
        min_mask_region_area: int | None = 0,
    ) -> dict[str, np.ndarray]:
        """Automatic segmentation: ``{"mask": (H, W) uint32 label image}`` (0 background); ``model_id`` None is
        the default model."""
        segmenter = self._model(model_id)
        labels = segmenter.generate(
            image,
            points_per_side=32 if points_per_side is None else points_per_side,
            pred_iou_thresh=0.88 if pred_iou_thresh is None else pred_iou_thresh,
            stability_score_thresh=0.95 if stability_score_thresh is None else stability_score_thresh,
            min_mask_region_area=0 if min_mask_region_area is None else min_mask_region_area,
            tiling=False,
        )
        return {"mask": labels}
