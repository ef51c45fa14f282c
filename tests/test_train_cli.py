"""`colabel train` on a pulled set, and its outlines offered as pre-annotations."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from conftest import DATA, make_image_folder

pytestmark = pytest.mark.e2e

COLABEL = [sys.executable, "-m", "colabel.apps.cli"]


def test_train_on_a_pulled_set_then_preannotate_an_unsaved_image(tmp_path):
    from colabel.apps.provider.annotations import validate_feature_collection
    from colabel.apps.provider.preannotate import PreAnnotator
    from colabel.apps.provider.provider import DataProvider
    from colabel.services.nuclei import measure_nuclei

    folder = make_image_folder(tmp_path / "images")
    provider = DataProvider(folder)
    info, _ = provider.create_session(name="train", classes=[{"name": "nucleus", "color": "#ff0000"}])
    annotator, _ = provider.sessions.join(info.session_id, "Ada")
    dsb = next(r.image_id for r in provider.catalog.records() if r.name == "dsb2018_nuclei.tif")
    _, nuclei = measure_nuclei(tifffile.imread(DATA / "dsb2018_nuclei_mask.tif"))
    fc = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": n.polygon, "properties": {"classification": {"name": "nucleus"}}}
        for n in nuclei]}
    provider.save_annotation(info, dsb, annotator.annotator_id, fc)

    pulled, model = tmp_path / "pulled", tmp_path / "unet.pt"
    done = subprocess.run([*COLABEL, "pull", str(folder), "--session", info.session_id, "--out", str(pulled)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    trained = subprocess.run([*COLABEL, "train", str(pulled), "--out", str(model), "--epochs", "3"],
                             capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stdout + trained.stderr
    assert model.is_file() and "training on 1 images" in trained.stdout

    preannotator = PreAnnotator(provider, model)
    ihc = next(r.image_id for r in provider.catalog.records() if r.name == "ihc_ki67.png")
    proposal = asyncio.run(preannotator.pre_annotation(info, ihc))
    assert proposal["type"] == "FeatureCollection" and proposal["model"] == "unet.pt"
    validate_feature_collection(proposal, image_shape=(512, 512))  # valid, editable polygons in image pixels
    assert all(f["properties"]["colabel_source"] == "preannotation" for f in proposal["features"])
    assert not list((folder / "annotations").rglob(f"images/{ihc}/*/*.geojson"))  # nothing stored
    with pytest.raises(Exception, match="unknown image id"):
        asyncio.run(preannotator.pre_annotation(info, "img-0000000000000000"))
    assert np.isfinite(len(proposal["features"]))
