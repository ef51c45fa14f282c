"""``colabel train``: the U-Net segmenter trained on a pulled set, saved with its record and optionally exported as
a bioimage.io package.

Every check that can fail is made before training, so a refused command writes nothing; refusals are
:class:`~colabel.errors.InvalidInputError` sentences (the command line prints them, exit code 2).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from colabel.errors import InvalidInputError


def training_image(image):
    """A pulled ``(H, W, C)`` image as the segmenter takes it: ``(H, W)`` for one channel, and RGBA whose alpha
    is fully opaque (a PNG saved with an alpha channel it does not use) as RGB. Other images unchanged."""
    if image.shape[-1] == 1:
        return image[..., 0]
    opaque = (1 << 8 * image.dtype.itemsize) - 1 if image.dtype.kind == "u" else None
    if image.shape[-1] == 4 and opaque is not None and (image[..., 3] == opaque).all():
        return image[..., :3]
    return image


_CONVERSIONS = {(1, 3): "grey repeated to RGB", (4, 3): "alpha dropped", (3, 1): "RGB averaged to grey",
                (4, 1): "RGB averaged to grey, alpha dropped"}


def training_sources(folder: Path, image_ids: list[str], annotator: str | None) -> dict:
    """What each image's training mask is, for the model's record: ``sources`` in ``train-classifier``'s shape.

    Returns
    -------
    dict
        ``sources``: list of ``[image_id, annotator_id, version]``, the annotator's pulled (latest) version, as
        ``labelled_pairs`` chose it (``annotator``; else the consensus where the image has one, else its first
        annotator in sorted order); a consensus is ``[image_id, "consensus", 0]``, as ``train-classifier``
        records it; ``version`` is ``None`` for a set pulled without ``pull_state.json``.
        ``consensus_of`` (when a consensus is used): image_id -> {annotator_id: version} it was computed from.
        ``image_names`` (when the pull recorded them): image_id -> the image's name in the source.
    """
    import json

    import zarr

    from .pull import CONSENSUS_FILE, mask_source

    state_path = folder / "pull_state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    versions, basis = state.get("versions", {}), state.get("consensus_basis", {})
    names = {i: info["name"] for i, info in state.get("images", {}).items() if i in image_ids and "name" in info}
    root = zarr.open_group(str(folder / "labels.zarr"), mode="r")
    sources, consensus_of = [], {}
    for image_id in image_ids:
        who = mask_source(root, image_id, annotator)
        if who == CONSENSUS_FILE:
            sources.append([image_id, "consensus", 0])
            consensus_of[image_id] = basis.get(image_id) or {
                a: versions.get(f"{image_id}/{a}") for a in root[f"consensus/{image_id}"].attrs.get("annotators", [])}
            continue
        sources.append([image_id, who, versions.get(f"{image_id}/{who}")])
    return {"sources": sources, **({"consensus_of": consensus_of} if consensus_of else {}),
            **({"image_names": names} if names else {})}


def export_test_image(images: list, divisor: int) -> int:
    """Index of the training image that gives the bioimage.io package the largest test input (the first of
    equals): ``export_bioimageio`` cuts its test input to :func:`input_crop_shape` and needs
    :func:`min_input_side` on each side.

    Raises
    ------
    InvalidInputError
        No image is large enough (said before training, so nothing is trained or written).
    """
    from colabel.services.training.bioimageio_export import input_crop_shape, min_input_side

    least = min_input_side(divisor)
    sides = [input_crop_shape(image.shape, divisor) for image in images]
    fits = [i for i, (h, w) in enumerate(sides) if h >= least and w >= least]
    if not fits:
        largest = max(images, key=lambda im: im.shape[0] * im.shape[1]).shape[:2]
        raise InvalidInputError(f"--bioimageio needs a training image of at least {least} x {least} pixels for the "
                                f"package's test input; the largest is {largest[0]} x {largest[1]}")
    return max(fits, key=lambda i: (sides[i][0] * sides[i][1], -i))


def check_writable_folder(folder: str | os.PathLike, what: str) -> None:
    """Refuse, before any work, a folder that outputs are to be written into (and created with its missing parents):
    the nearest of ``folder`` and its ancestors that exists must be a folder this process can write in. ``what``
    starts the sentence (e.g. ``"--out afile/unet.pt"``).

    Raises
    ------
    InvalidInputError
        ``"--out afile/unet.pt: afile is not a folder"``, or ``"...: cannot write in FOLDER"``.
    """
    folder = Path(folder).expanduser()
    where = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))  # "." and "/" exist
    if not where.is_dir():
        raise InvalidInputError(f"{what}: {where} is not a folder")
    if not os.access(where, os.W_OK | os.X_OK):
        raise InvalidInputError(f"{what}: cannot write in {where}")


def image_label(image_id: str, names: dict[str, str]) -> str:
    """How refusals name a pulled image: ``image NAME (ID)`` when the pull recorded its name, else ``image ID``."""
    return f"image {names[image_id]} ({image_id})" if image_id in names else f"image {image_id}"


def pulled_image_names(folder: Path) -> dict[str, str]:
    """image_id -> the image's name in the source, as the pull recorded it (``pull_state.json``); {} without it."""
    import json

    path = folder / "pull_state.json"
    try:
        state = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    images = state.get("images", {}) if isinstance(state, dict) else {}
    return {i: info["name"] for i, info in images.items() if isinstance(info, dict) and "name" in info}


def check_train_outputs(args: argparse.Namespace) -> None:
    """Refuse, before training, the ``--out`` and ``--bioimageio`` settings that would fail after it."""
    if Path(args.out).is_dir():
        raise InvalidInputError(f"--out {args.out} is a folder; give the model file to write")
    if Path(args.out).exists() and not args.overwrite:
        raise InvalidInputError(f"{args.out} exists; pass --overwrite to replace it")
    check_writable_folder(Path(args.out).parent, f"--out {args.out}")
    if not args.bioimageio:
        return
    from colabel.services.training.bioimageio_export import check_model_name

    try:
        check_model_name(args.name)
    except InvalidInputError as exc:
        raise InvalidInputError(f"--name {exc}") from None
    if not args.author.strip() or "/" in args.author:
        raise InvalidInputError(f"--author {args.author!r} is not a bioimage.io author name: not empty, no '/'")
    package = Path(args.bioimageio)
    if package.exists() and (not package.is_dir() or any(package.iterdir())):
        raise InvalidInputError(f"--bioimageio {package} exists and is not an empty folder")
    check_writable_folder(package.parent, f"--bioimageio {package}")


def run_train(args: argparse.Namespace) -> int:
    """Train the U-Net segmenter on a pulled set; save it (and optionally a bioimage.io package).

    Every check that can fail is made before training (export settings included, and every image, the held-out
    ones too), so a refused command writes nothing; a refused image is named. Images of mixed channel counts are
    converted to the model's (``model_channels`` over the training and held-out images / ``to_model_channels``:
    prediction's own conversion) and the command says which.
    """
    import numpy as np

    from colabel.services.nuclei.base import validate_image
    from colabel.services.training.segmenter_training import model_channels, to_model_channels, train_segmenter

    from .pull import labelled_pairs

    check_train_outputs(args)
    pairs = labelled_pairs(Path(args.pulled), args.annotator)
    if not pairs:
        raise InvalidInputError(f"no labelled images in {args.pulled}")
    if len(pairs) == 1 and args.hold_out:
        raise InvalidInputError(f"--hold-out needs at least 2 labelled images (the set has 1), got {args.hold_out}")
    if not 0 <= args.hold_out < len(pairs):
        raise InvalidInputError(f"--hold-out must be between 0 and {len(pairs) - 1} (the set has {len(pairs)} labelled "
                       f"images), got {args.hold_out}")
    init = None
    if args.init:
        from colabel.services.training.segmenter_training import TrainedSegmenter

        if not Path(args.init).is_file():
            raise InvalidInputError(f"--init model {args.init} does not exist")
        init = TrainedSegmenter.load(args.init)
    order = np.random.default_rng(args.seed).permutation(len(pairs))
    held = [pairs[i] for i in sorted(order[:args.hold_out])]
    pairs = [pairs[i] for i in sorted(order[args.hold_out:])]
    # every image, held-out ones included, is checked and converted before training (a refusal names it)
    names = pulled_image_names(Path(args.pulled))
    every = pairs + held
    labels = [image_label(image_id, names) for image_id, _, _ in every]
    stored = {}
    for (image_id, image, mask), label in zip(every, labels, strict=True):
        try:
            stored[image_id] = validate_image(training_image(image))
        except InvalidInputError as exc:
            raise InvalidInputError(f"{label}: {exc}") from None
        if np.shape(mask) != stored[image_id].shape[:2]:
            raise InvalidInputError(f"{label}: its mask has shape {np.shape(mask)} but the image has "
                                    f"{stored[image_id].shape[:2]}")
    channels = model_channels([stored[image_id] for image_id, _, _ in every], encoder=args.encoder, init=init,
                              names=labels)
    model_images = {}
    for (image_id, _, _), label in zip(every, labels, strict=True):
        try:
            model_images[image_id] = to_model_channels(stored[image_id], channels)
        except InvalidInputError:
            whose = f"the model to fine-tune ({args.init})" if init else "the model"
            raise InvalidInputError(f"{label}, of shape {stored[image_id].shape}, cannot be given the {channels} "
                                    f"channel(s) of {whose}") from None
    images = [model_images[image_id] for image_id, _, _ in pairs]
    masks = [mask for _, _, mask in pairs]
    counts = {image_id: 1 if image.ndim == 2 else image.shape[2] for image_id, image in stored.items()}
    converted = {image_id: [counts[image_id], channels] for image_id, _, _ in every if counts[image_id] != channels}
    test_index = None
    if args.bioimageio:
        from colabel.services.training.unet import default_channels, divisor

        test_index = export_test_image(images, init.divisor if init else divisor(default_channels(args.encoder),
                                                                                   args.encoder))
    record = training_sources(Path(args.pulled), [image_id for image_id, _, _ in pairs], args.annotator)
    if converted:
        kinds = sorted({_CONVERSIONS.get(tuple(c), f"{c[0]} -> {c[1]} channels") for c in converted.values()})
        print(f"converted {len(converted)} of {len(every)} images to the model's {channels} channel(s) "
              f"({', '.join(kinds)}), as prediction does")
    print(f"training on {len(images)} images ({sum(int(m.max() > 0) for m in masks)} with objects)"
          + (f", fine-tuning {args.init}" if init else "") + " ...")
    trained = train_segmenter(images, masks, epochs=args.epochs, ensemble=args.ensemble, seed=args.seed,
                              crop=args.crop, maps=args.maps, encoder=args.encoder, tta=not args.no_flips, init=init)
    trained.metrics.update(record)
    if converted:
        trained.metrics["converted_channels"] = converted
    if init:
        trained.config["init"]["file"] = Path(args.init).name
    if held:
        from colabel.services.training.segmenter_training import validation_scores

        scores = validation_scores(trained, [model_images[image_id] for image_id, _, _ in held],
                                   [mask for _, _, mask in held])
        trained.metrics["validation"] = {**scores, "image_ids": [image_id for image_id, _, _ in held],
                                         **training_sources(Path(args.pulled), [i for i, _, _ in held], args.annotator)}
        print(f"held out {len(held)} images ({scores['tp'] + scores['fn']} objects): F1 {scores['f1']:.3f} at IoU "
              f"0.5 (precision {scores['precision']:.3f}, recall {scores['recall']:.3f}); objects to fix "
              f"{scores['objects_to_fix']:.1%} of drawing from scratch")
    path = trained.save(Path(args.out))
    print(f"saved {path}")
    if args.bioimageio:
        from colabel.services.training.bioimageio_export import export_bioimageio

        package = export_bioimageio(trained, args.bioimageio, name=args.name.strip(), authors=[args.author],
                                    description=f"U-Net nucleus segmenter trained with colabel on {len(images)} "
                                    "annotated images", test_image=images[test_index])
        print(f"bioimage.io package {package} (test input: {pairs[test_index][0]})")
    return 0
