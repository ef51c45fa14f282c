"""`colabel predict`: a trained segmenter pre-annotates a folder's images into label TIFFs, GeoJSON and a record,
incrementally, and refuses bad input without writing; an image the model cannot take is skipped by name, there and
in the annotator's pre-annotations."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import tifffile

from conftest import DATA, make_image_folder

pytestmark = pytest.mark.e2e

READABLE = ["dsb2018_nuclei.tif", "ihc_ki67.png", "sub/he_histo.jpg"]


def predict(*args: str) -> int:
    from colabel.apps.cli import main

    return main(["predict", *map(str, args), "--quiet"])


def record(out) -> dict:
    return json.loads((out / "predictions.json").read_text())


def test_every_readable_image_gets_labels_outlines_and_a_record_line(tmp_path, tiny_segmenter, capsys):
    from colabel.apps.provider.annotations import validate_feature_collection
    from colabel.apps.provider.images import ImageCatalog
    from colabel.services.training.proposals import propose
    from colabel.services.training.segmenter_training import TrainedSegmenter

    folder = make_image_folder(tmp_path / "images")
    out = tmp_path / "pred"
    assert predict(tiny_segmenter, folder, "--out", out) == 0
    assert "predicted 3 images" in capsys.readouterr().out

    rec = record(out)
    assert sorted(rec["images"]) == READABLE
    assert list(rec["skipped"]) == ["broken.png"] and "broken.png" not in str(sorted(p.name for p in out.rglob("*")))
    assert rec["model"]["sha256"] == hashlib.sha256(tiny_segmenter.read_bytes()).hexdigest()
    assert rec["model"]["training_set_version"] == TrainedSegmenter.load(tiny_segmenter).training_set_version

    model, catalog = TrainedSegmenter.load(tiny_segmenter), ImageCatalog(folder)
    for name in READABLE:
        entry = rec["images"][name]
        assert set(entry["outputs"]) == {"labels", "geojson"}  # one network: no uncertainty map
        labels = tifffile.imread(out / entry["outputs"]["labels"])
        pixels = catalog.read(next(r.image_id for r in catalog.records() if r.name == name))
        assert labels.dtype == np.uint16 and labels.shape == pixels.shape[:2]
        # the same proposals the annotator is offered for this image
        expected = propose(model, pixels)
        assert np.array_equal(labels, expected.labels)
        collection = json.loads((out / entry["outputs"]["geojson"]).read_text())
        validate_feature_collection(collection, image_shape=pixels.shape[:2])  # savable as an annotation
        assert collection["features"] == expected.features
        assert entry["objects"] == len(collection["features"]) == labels.max() == len(np.unique(labels)) - 1
    assert rec["images"]["dsb2018_nuclei.tif"]["objects"] >= 50  # a trained model finds the nuclei


def test_a_second_run_predicts_only_changed_images_and_a_new_model_all(tmp_path, tiny_segmenter, tiny_ensemble):
    folder = make_image_folder(tmp_path / "images")
    out = folder / "predictions"  # inside the image folder: its own TIFFs are not taken for images
    assert predict(tiny_segmenter, folder, "--out", out) == 0
    first = record(out)

    assert predict(tiny_segmenter, folder, "--out", out) == 0
    assert record(out) == first  # nothing predicted again, nothing of OUT listed as an image

    changed = folder / "dsb2018_nuclei.tif"
    tifffile.imwrite(changed, tifffile.imread(changed)[:256, :384])
    os.utime(changed, ns=(1, 1))
    from colabel.apps.predict import predict_folder

    result = predict_folder(tiny_segmenter, folder, out, progress=False)
    assert result["predicted"] == ["dsb2018_nuclei.tif"] and sorted(result["up_to_date"]) == READABLE[1:]
    assert tifffile.imread(out / "dsb2018_nuclei.tif.labels.tif").shape == (256, 384)

    result = predict_folder(tiny_ensemble, folder, out, progress=False)
    assert sorted(result["predicted"]) == READABLE and result["model"]["ensemble"] == 2
    for name in READABLE:
        entry = result["images"][name]
        uncertainty = tifffile.imread(out / entry["outputs"]["uncertainty"])
        assert uncertainty.dtype == np.float32 and 0 <= uncertainty.min() and uncertainty.max() <= 0.5
        features = json.loads((out / entry["outputs"]["geojson"]).read_text())["features"]
        assert all(0 <= f["properties"]["colabel_uncertainty"] <= 0.5 for f in features)
        flagged = [f for f in features if f["properties"].get("colabel_review")]
        assert entry["review"] == len(flagged)
        assert all(f["properties"]["colabel_uncertainty"] >= 0.03 for f in flagged)

    result = predict_folder(tiny_ensemble, folder, out, overwrite=True, progress=False)
    assert sorted(result["predicted"]) == READABLE

    # back to one network: the ensemble's uncertainty maps go with its outlines
    result = predict_folder(tiny_segmenter, folder, out, progress=False)
    assert sorted(result["predicted"]) == READABLE and not list(out.rglob("*.uncertainty.tif"))


def test_bad_input_is_refused_by_name_and_nothing_is_written(tmp_path, tiny_segmenter, capsys):
    folder = make_image_folder(tmp_path / "images")
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "garbage.pt").write_bytes(b"not a model")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "predictions.json").write_text('{"something": "else"}')
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "broken.tif").write_bytes(b"II*\x00 truncated")
    cases = [
        ((tiny_segmenter, folder, "--out", tmp_path / "file.txt"), "is a file, not a folder"),
        ((tiny_segmenter, folder, "--out", folder), "must not be the image folder itself"),
        ((tmp_path / "missing.pt", folder, "--out", tmp_path / "o1"), "missing.pt does not exist"),
        ((tmp_path / "garbage.pt", folder, "--out", tmp_path / "o2"), "is not a colabel segmenter file"),
        ((tiny_segmenter, tmp_path / "nowhere", "--out", tmp_path / "o3"), "does not exist"),
        ((tiny_segmenter, folder, "--out", foreign, "--review-uncertainty", "0.7"), "must be in (0, 0.5]"),
        ((tiny_segmenter, folder, "--out", foreign), "is not a colabel predictions record"),
    ]
    for args, message in cases:
        assert predict(*args) == 2, args
        assert message in capsys.readouterr().err, message
    assert not any((tmp_path / name).exists() for name in ("o1", "o2", "o3"))
    assert sorted(p.name for p in foreign.iterdir()) == ["predictions.json"]
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before

    assert predict(tiny_segmenter, empty, "--out", tmp_path / "o4") == 2
    err = capsys.readouterr().err
    assert "no readable images" in err and "broken.tif: " in err
    assert not (tmp_path / "o4").exists()


def test_an_out_under_a_file_is_refused_before_predicting_and_nothing_is_written(tmp_path, tiny_segmenter, capsys):
    """`colabel predict --out afile/preds` predicted the first image, then failed with NotADirectoryError."""
    folder = make_image_folder(tmp_path / "images")
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    for out in (afile / "preds", afile / "preds" / "deeper"):
        assert predict(tiny_segmenter, folder, "--out", out) == 2
        assert capsys.readouterr().err.strip() == f"colabel: --out {out}: {afile} is not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "images"] and afile.read_text() == "not a folder"


def test_a_new_review_threshold_flags_an_ensembles_outlines_again_and_the_record_agrees(tmp_path, tiny_ensemble,
                                                                                      tiny_segmenter):
    """The threshold decides every colabel_review: a run with another one kept the old flags, while
    predictions.json recorded the new threshold."""
    from colabel.apps.predict import predict_folder

    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(DATA / "dsb2018_nuclei.tif", folder / "dsb2018_nuclei.tif")
    out = tmp_path / "pred"

    def flags() -> tuple[int, int, float]:
        features = json.loads((out / "dsb2018_nuclei.tif.geojson").read_text())["features"]
        rec = record(out)
        flagged = sum(bool(f["properties"].get("colabel_review")) for f in features)
        assert rec["images"]["dsb2018_nuclei.tif"]["review"] == flagged  # the record and the GeoJSON agree
        # every outline at or above the recorded threshold is flagged, and only those
        assert flagged == sum(f["properties"]["colabel_uncertainty"] >= rec["review_uncertainty"] for f in features)
        return flagged, len(features), rec["review_uncertainty"]

    assert predict_folder(tiny_ensemble, folder, out, review_uncertainty=0.5, progress=False)["predicted"]
    flagged, objects, threshold = flags()
    assert flagged == 0 and objects > 0 and threshold == 0.5
    result = predict_folder(tiny_ensemble, folder, out, review_uncertainty=0.0001, progress=False)
    assert result["predicted"] == ["dsb2018_nuclei.tif"] and result["up_to_date"] == []
    flagged, objects, threshold = flags()
    assert flagged == objects and threshold == 0.0001  # two networks never agree to 1e-4 on a whole outline
    result = predict_folder(tiny_ensemble, folder, out, review_uncertainty=0.0001, progress=False)
    assert result["up_to_date"] == ["dsb2018_nuclei.tif"]  # the same threshold: nothing to do

    # one network flags nothing whatever the threshold: a new one leaves its outputs up to date
    predict_folder(tiny_segmenter, folder, out, progress=False)
    result = predict_folder(tiny_segmenter, folder, out, review_uncertainty=0.2, progress=False)
    assert result["up_to_date"] == ["dsb2018_nuclei.tif"] and record(out)["review_uncertainty"] == 0.2


@pytest.fixture(scope="module")
def rgb_segmenter(tmp_path_factory):
    """A one-network RGB segmenter (the DSB2018 image repeated to RGB, a few steps: a real but weak model)."""
    torch = pytest.importorskip("torch")

    from colabel.services.training.segmenter_training import train_segmenter

    torch.set_num_threads(2)
    image, mask = tifffile.imread(DATA / "dsb2018_nuclei.tif"), tifffile.imread(DATA / "dsb2018_nuclei_mask.tif")
    model = train_segmenter([np.repeat(image[..., None], 3, axis=-1)], [mask], epochs=1, crop=64, batch_size=4,
                            channels=(8, 16, 32), encoder="none", tta=False, progress=False)
    return model.save(tmp_path_factory.mktemp("rgb") / "rgb.pt")


def _two_channel_and_rgb(folder):
    """``a_two_channel.tif`` (the DSB2018 image stored with 2 channels; first in name order) and the RGB IHC image."""
    folder.mkdir()
    image = tifffile.imread(DATA / "dsb2018_nuclei.tif")
    tifffile.imwrite(folder / "a_two_channel.tif", np.stack([image, image]), photometric="minisblack")
    shutil.copy(DATA / "ihc_ki67.png", folder / "b_rgb.png")
    return folder


def test_an_image_the_model_cannot_take_is_skipped_by_name_and_the_others_are_predicted(tmp_path, rgb_segmenter,
                                                                                      capsys):
    """The run stopped at the 2-channel image (an RGB model) with an unnamed "cannot be given 3 channel(s)" and
    predicted nothing after it."""
    folder = _two_channel_and_rgb(tmp_path / "images")
    out = tmp_path / "pred"
    assert predict(rgb_segmenter, folder, "--out", out) == 0
    printed = capsys.readouterr()
    assert "predicted 1 images" in printed.out
    rec = record(out)
    assert list(rec["images"]) == ["b_rgb.png"] and (out / "b_rgb.png.labels.tif").is_file()
    reason = rec["skipped"]["a_two_channel.tif"]
    assert reason == "the model cannot take this image: an image of shape (512, 512, 2) cannot be given 3 channel(s)"
    assert f"skipped a_two_channel.tif: {reason}" in printed.err
    assert not list(out.glob("a_two_channel*"))
    assert predict(rgb_segmenter, folder, "--out", out) == 0  # the next run: the RGB image is up to date
    assert "predicted 0 images (0 objects), 1 up to date" in capsys.readouterr().out
    assert list(record(out)["skipped"]) == ["a_two_channel.tif"]


def test_preannotation_refuses_an_image_the_model_cannot_take_by_name_and_serves_the_others(tmp_path, rgb_segmenter):
    """`colabel serve --preannotate`: the annotator of the 2-channel image is told which image the model cannot take
    (it was an unnamed "cannot be given 3 channel(s)"); the RGB image still gets its proposals."""
    from colabel.apps.provider.preannotate import PreAnnotator
    from colabel.apps.provider.provider import DataProvider
    from colabel.errors import InvalidInputError

    provider = DataProvider(_two_channel_and_rgb(tmp_path / "images"))
    info, _ = provider.create_session(name="pre", classes=[{"name": "nucleus", "color": "#ff0000"}])
    ids = {r.name: r.image_id for r in provider.catalog.records()}
    preannotator = PreAnnotator(provider, rgb_segmenter)
    message = ("the model rgb.pt cannot take a_two_channel.tif: an image of shape (512, 512, 2) cannot be given 3 "
               "channel(s)")
    for _ in range(2):  # refused each time it is opened, by name; the RGB image is predicted once meanwhile
        with pytest.raises(InvalidInputError) as refused:
            asyncio.run(preannotator.pre_annotation(info, ids["a_two_channel.tif"]))
        assert str(refused.value) == message
        proposal = asyncio.run(preannotator.pre_annotation(info, ids["b_rgb.png"]))
        assert proposal["type"] == "FeatureCollection" and proposal["model"] == "rgb.pt"
    assert preannotator.predictions == 1
