"""`colabel predict`: a trained segmenter pre-annotates a folder's images into label TIFFs, GeoJSON and a record,
incrementally, and refuses bad input without writing."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import tifffile

from conftest import make_image_folder

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
