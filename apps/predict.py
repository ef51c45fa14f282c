"""``colabel predict``: pre-annotate a folder's images with a trained segmenter, into files trainers and QuPath read.

Every image of FOLDER, found as ``colabel serve`` finds them (TIFF / OME-TIFF, PNG, JPEG; hidden files, the
top-level ``annotations`` folder and OUT itself skipped), is segmented by a model of ``colabel train``
(:func:`~colabel.services.training.proposals.propose`, the same proposals the annotator is offered) and written
under OUT at the image's own relative path, the image's file name plus a suffix:

* ``NAME.labels.tif`` -- instance labels ``(H, W)``, uint16 (uint32 beyond 65535 objects), 0 = background;
* ``NAME.geojson`` -- a FeatureCollection of the outlines in image pixels (QuPath detections: File > Import
  objects); for an ensemble each carries ``colabel_uncertainty`` and, when the members disagree,
  ``colabel_review: true``;
* ``NAME.uncertainty.tif`` -- float32, the per-pixel standard deviation of the members' foreground
  probability (ensembles only);

and ``predictions.json``: the model (file name, SHA-256, training-set version), per image its outputs, object
and review counts and seconds, and the images skipped with the reason. Every file is written atomically
(temporary file, fsync, rename).

Incremental: an image is predicted again only when its file (size, modification time) or the model (SHA-256)
changed since the record in ``predictions.json``, for an ensemble when the review threshold changed (it decides
every ``colabel_review``), or with ``overwrite``. Unreadable images, and images the model cannot take (e.g. a
2-channel image for an RGB model), are listed under ``skipped`` with the reason, nothing is written for them, and
the other images are predicted.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from colabel.errors import InvalidInputError, UnreadableImageError
from colabel.files import atomic_write, atomic_write_json
from colabel.services.weights import file_checksum

from .provider.images import ImageCatalog
from .provider.storage import encode_tiff, tiff_bytes

RECORD = "predictions.json"
FORMAT = "colabel-predictions/1"


def output_names(name: str, *, ensemble: bool) -> dict[str, str]:
    """The files written for the image at relative path ``name`` (POSIX), relative to OUT."""
    names = {"labels": f"{name}.labels.tif", "geojson": f"{name}.geojson"}
    if ensemble:
        names["uncertainty"] = f"{name}.uncertainty.tif"
    return names


def predict_folder(model_path: str | Path, folder: str | Path, out: str | Path, *, overwrite: bool = False,
                   review_uncertainty: float | None = None, progress: bool = True) -> dict:
    """Pre-annotate the images of ``folder`` into ``out``; returns the record written to ``out/predictions.json``
    plus ``predicted`` and ``up_to_date`` (image names of this run).

    Raises
    ------
    InvalidInputError
        ``folder`` is not a readable folder or holds no readable image, ``out`` is a file or ``folder`` itself or
        cannot be created (its nearest existing ancestor is a file, or a folder this process cannot write in),
        ``model_path`` is not a colabel segmenter file, ``review_uncertainty`` is out of (0, 0.5], or ``out``
        holds a ``predictions.json`` that is not colabel's. Nothing is written then.
    FileNotFoundError
        ``model_path`` does not exist.
    """
    from tqdm import tqdm

    from colabel.services.training.proposals import REVIEW_UNCERTAINTY, propose
    from colabel.services.training.segmenter_training import TrainedSegmenter

    from .train import check_writable_folder

    model_path, out = Path(model_path), Path(out).expanduser()
    review = REVIEW_UNCERTAINTY if review_uncertainty is None else review_uncertainty
    if not 0 < review <= 0.5:
        raise InvalidInputError(f"review uncertainty must be in (0, 0.5], got {review}")
    catalog = ImageCatalog(folder)
    if out.exists() and not out.is_dir():
        raise InvalidInputError(f"--out '{out}' is a file, not a folder")
    check_writable_folder(out, f"--out {out}")
    out_resolved = out.resolve()
    if out_resolved == catalog.folder:
        raise InvalidInputError("--out must not be the image folder itself: use a new folder (or a sub-folder)")
    model = TrainedSegmenter.load(model_path)
    ensemble = len(model.state_dicts) > 1
    model_info = {"file": model_path.name, "sha256": file_checksum(model_path).split(":", 1)[1],
                  "training_set_version": model.training_set_version, "ensemble": len(model.state_dicts)}
    previous = _read_record(out / RECORD)
    stale = (overwrite or previous.get("model", {}).get("sha256") != model_info["sha256"]
             # an ensemble's colabel_review flags follow the threshold: another one makes every image out of date
             or (ensemble and previous.get("review_uncertainty") != review))
    done = {} if stale else previous.get("images", {})

    records = [r for r in catalog.records() if not r.path.is_relative_to(out_resolved)]
    images, skipped, predicted, up_to_date = {}, {}, [], []
    todo = []
    for record in records:
        if record.error:
            skipped[record.name] = record.error
            continue
        stat = record.path.stat()
        source = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        outputs = output_names(record.name, ensemble=ensemble)
        old = done.get(record.name)
        if old and old.get("source") == source and all((out / p).is_file() for p in outputs.values()):
            images[record.name] = old
            up_to_date.append(record.name)
        else:
            todo.append((record, source, outputs))
    if not todo and not up_to_date:
        reasons = "; ".join(f"{name}: {reason}" for name, reason in sorted(skipped.items()))
        raise InvalidInputError(f"no readable images in {catalog.folder}" + (f" ({reasons})" if reasons else ""))
    for record, source, outputs in tqdm(todo, desc="predicting", unit="image", disable=not progress or not todo):
        start = time.perf_counter()
        try:
            pixels = catalog.read(record.image_id)
        except (InvalidInputError, UnreadableImageError) as exc:
            skipped[record.name] = str(exc)
            continue
        try:
            proposals = propose(model, pixels, review_uncertainty=review)
        except InvalidInputError as exc:  # e.g. a 2-channel image for an RGB model: the others are still predicted
            skipped[record.name] = f"the model cannot take this image: {exc}"
            _write_record(out, model_info, review, images, skipped)
            continue
        labels = proposals.labels.astype(np.uint16 if proposals.labels.max() <= 0xFFFF else np.uint32)
        collection = {"type": "FeatureCollection", "features": proposals.features,
                      "colabel": {"image": record.name, "model": model_info["file"],
                                  "training_set_version": model.training_set_version}}
        (out / outputs["labels"]).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out / outputs["labels"], tiff_bytes(labels))
        atomic_write_json(out / outputs["geojson"], collection)
        if ensemble:
            atomic_write(out / outputs["uncertainty"], encode_tiff(proposals.uncertainty.astype(np.float32), axes="YX"))
        else:  # an ensemble's map from an earlier run would not belong to these outlines
            (out / output_names(record.name, ensemble=True)["uncertainty"]).unlink(missing_ok=True)
        images[record.name] = {"source": source, "outputs": outputs, "objects": len(proposals.features),
                               "review": proposals.n_review, "shape": list(pixels.shape),
                               "seconds": round(time.perf_counter() - start, 3)}
        predicted.append(record.name)
        # the record follows every image, so an interrupted run keeps what it finished
        _write_record(out, model_info, review, images, skipped)
    record = _write_record(out, model_info, review, images, skipped)
    return {**record, "predicted": predicted, "up_to_date": up_to_date}


def _read_record(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"{path} cannot be read ({exc}); remove it or use another --out") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise InvalidInputError(f"{path} is not a colabel predictions record; use another --out")
    return record


def _write_record(out: Path, model_info: dict, review: float, images: dict, skipped: dict) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    record = {"format": FORMAT, "model": model_info, "review_uncertainty": review,
              "images": dict(sorted(images.items())), "skipped": dict(sorted(skipped.items()))}
    atomic_write_json(out / RECORD, record)
    return record
