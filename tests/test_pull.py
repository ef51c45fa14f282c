"""`colabel pull` from a running `colabel serve` with a trainer token, and from a local folder."""

from __future__ import annotations

import asyncio
import csv
import json
import signal
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from colabel.apps.hypha_server import free_port
from conftest import collection, make_image_folder, square, start_colabel

pytestmark = pytest.mark.e2e

COLABEL = [sys.executable, "-m", "colabel.apps.cli"]


def start_serve(folder, port):
    process, printed = start_colabel(["serve", str(folder), "--port", str(port), "--models", ""])
    assert "manage_url" in printed, printed
    return process, printed


async def prepare(printed, url):
    """Two annotators label; the provider issues a trainer token. Returns (trainer URL, ids, share token)."""
    from hypha_rpc import connect_to_server

    workspace_token = printed["manage_url"].split("#token=", 1)[1]
    provider_client = await connect_to_server({"server_url": url, "token": workspace_token})
    provider = await provider_client.get_service(printed["provider_service"])
    session = (await provider.list_sessions())[0]
    trainer = await provider.issue_token(session["session_id"], "trainer for the U-Net", "train")
    annotator_client = await connect_to_server({"server_url": url})
    annotator = await annotator_client.get_service(printed["annotator_service"])
    token = printed["share_url"].split("#token=", 1)[1]
    images = {i["name"]: i["image_id"] for i in await annotator.list_images(token)}
    ada = (await annotator.join(token, "Ada"))["annotator_key"]
    bob = (await annotator.join(token, "Bob"))["annotator_key"]
    await annotator.save_annotation(token, ada, images["dsb2018_nuclei.tif"],
                                    collection(square(10, 10, 20), square(100, 50, 10, "other")))
    await annotator.save_annotation(token, bob, images["dsb2018_nuclei.tif"], collection(square(11, 10, 20)))
    await annotator.save_annotation(token, ada, images["ihc_ki67.png"], collection(square(5, 5, 30)))
    with pytest.raises(Exception, match="train token; it cannot be used to annotate"):
        await annotator.join(trainer["token"], "Mallory")
    with pytest.raises(Exception, match="annotate token; it cannot be used to train"):
        await annotator.trainer_session(token)
    return provider_client, annotator_client, provider, annotator, session, trainer, images, token, ada


def pull(*args):
    return subprocess.run([*COLABEL, "pull", *args], capture_output=True, text=True, timeout=120)


def test_remote_pull_with_a_trainer_token_is_complete_and_incremental(tmp_path):
    import zarr

    folder = make_image_folder(tmp_path / "images")
    port = free_port()
    process, printed = start_serve(folder, port)
    url = f"http://127.0.0.1:{port}"
    out = tmp_path / "pulled"

    async def scenario():
        clients = await prepare(printed, url)
        provider_client, annotator_client, provider, annotator, session, trainer, images, token, ada = clients
        assert trainer["share_url"].endswith(f"#trainer={trainer['token']}")

        first = await asyncio.to_thread(pull, trainer["share_url"], "--out", str(out))
        assert first.returncode == 0, first.stdout + first.stderr
        assert "pulled 3 new annotation versions (0 up to date)" in first.stdout

        root = zarr.open_group(str(out / "labels.zarr"), mode="r")
        dsb = images["dsb2018_nuclei.tif"]
        expected = tifffile.imread(folder / "dsb2018_nuclei.tif")[..., None]
        np.testing.assert_array_equal(root[f"images/{dsb}"][...], expected)
        annotators = sorted(root[f"instances/{dsb}"].array_keys())
        assert len(annotators) == 2
        ada_labels = None
        for a in annotators:
            labels = root[f"instances/{dsb}/{a}"][...]
            semantic = root[f"semantic/{dsb}/{a}"][...]
            if labels.max() == 2:
                ada_labels = labels
                assert semantic[15, 15] == 1 and semantic[55, 105] == 2  # nucleus -> 1, other -> 2
        assert ada_labels is not None and (ada_labels == 1).sum() == 400
        consensus = root[f"consensus/{dsb}"][...]
        assert consensus.max() == 1  # the square both drew; Ada's second object has no majority
        assert consensus[15, 15] == 1 and consensus[55, 105] == 0
        with open(out / "cells.csv") as handle:
            rows = list(csv.DictReader(handle))
        assert len(rows) == 4 and {r["class"] for r in rows} == {"nucleus", "other"}
        coco = json.loads((out / "coco.json").read_text())
        assert [c["name"] for c in coco["categories"]] == ["nucleus", "other"] and len(coco["annotations"]) == 4
        square_ann = next(a for a in coco["annotations"] if a["area"] == 400.0)
        assert square_ann["bbox"] == [10.0, 10.0, 20.0, 20.0]
        assert len(list((out / "tiff").glob("*_mask.tif"))) == 3
        agreement = json.loads((out / "agreement.json").read_text())[dsb]
        # Ada drew 2 squares, Bob 1 matching one of them: F1 = 2 * 1 / (2 + 1)
        assert agreement["pairs"][0]["f1"] == pytest.approx(2 / 3)

        again = await asyncio.to_thread(pull, trainer["share_url"], "--out", str(out))
        assert "pulled 0 new annotation versions (3 up to date)" in again.stdout
        await annotator.save_annotation(token, ada, images["ihc_ki67.png"],
                                        collection(square(5, 5, 30), square(50, 50, 9)))
        third = await asyncio.to_thread(pull, trainer["share_url"], "--out", str(out))
        assert "pulled 1 new annotation versions (2 up to date)" in third.stdout

        await provider.revoke_token(session["session_id"], trainer["token_id"])
        refused = await asyncio.to_thread(pull, trainer["share_url"], "--out", str(tmp_path / "nope"))
        assert refused.returncode == 2 and "invalid or revoked session token" in refused.stderr
        await provider_client.disconnect()
        await annotator_client.disconnect()

    try:
        asyncio.run(scenario())
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0

    from colabel.apps.pull import PulledDataset

    dataset = PulledDataset(out, crop=64, length=8)
    image, mask = dataset[0]
    assert tuple(image.shape)[1:] == (64, 64) and tuple(mask.shape) == (64, 64)
    assert float(image.max()) <= 1.0


def test_local_pull_needs_a_session_and_reads_the_folder(tmp_path):
    from colabel.apps.provider.provider import DataProvider

    folder = make_image_folder(tmp_path / "images")
    provider = DataProvider(folder)
    info, _ = provider.create_session(name="local", classes=[{"name": "nucleus", "color": "#ff0000"}])
    annotator, _ = provider.sessions.join(info.session_id, "Ada")
    image_id = next(r.image_id for r in provider.catalog.records() if r.name == "ihc_ki67.png")
    provider.save_annotation(info, image_id, annotator.annotator_id, collection(square(1, 1, 8)))
    missing = pull(str(folder), "--out", str(tmp_path / "a"))
    assert missing.returncode == 2 and "--session" in missing.stderr
    done = pull(str(folder), "--session", info.session_id, "--out", str(tmp_path / "b"))
    assert done.returncode == 0 and "pulled 1 new annotation versions" in done.stdout
    bad_url = pull("http://127.0.0.1:1/not-a-provider", "--out", str(tmp_path / "c"))
    assert bad_url.returncode == 2 and "not a colabel provider URL" in bad_url.stderr


def test_report_gives_agreement_per_image_and_annotator_pair(tmp_path):
    from colabel.apps.provider.provider import DataProvider
    from colabel.apps.report import session_report

    folder = make_image_folder(tmp_path / "images")
    provider = DataProvider(folder)
    info, _ = provider.create_session(name="pairs", classes=[{"name": "nucleus", "color": "#ff0000"}],
                                      annotators_per_image=2)
    image_id = next(r.image_id for r in provider.catalog.records() if r.name == "ihc_ki67.png")
    a, _ = provider.sessions.join(info.session_id, "A")
    b, _ = provider.sessions.join(info.session_id, "B")
    provider.save_annotation(info, image_id, a.annotator_id, collection(square(0, 0, 10), square(40, 40, 10)))
    provider.save_annotation(info, image_id, b.annotator_id, collection(square(1, 0, 10)))
    report = session_report(folder, info.session_id)
    pair = report["agreement"]["images"][image_id]["pairs"][0]
    assert pair["f1"] == pytest.approx(2 / 3)  # one match (IoU 0.82), one object only A drew
    printed = subprocess.run([*COLABEL, "report", str(folder), info.session_id], capture_output=True, text=True)
    assert printed.returncode == 0 and "F1 0.667" in printed.stdout


def _two_annotators_class_three_squares(tmp_path):
    """A and B draw three 10 px squares of the IHC image, B's first 2 px to the right (IoU 0.67); classes
    (nucleus, nucleus), (nucleus, other), (other, other); pulled from the folder.
    Returns (folder, session, image id, A, B, pulled folder)."""
    from colabel.apps.provider.provider import DataProvider

    folder = make_image_folder(tmp_path / "images")
    provider = DataProvider(folder)
    info, _ = provider.create_session(name="classes", annotators_per_image=2, classes=[
        {"name": "nucleus", "color": "#ff0000"}, {"name": "other", "color": "#0000ff"}])
    image_id = next(r.image_id for r in provider.catalog.records() if r.name == "ihc_ki67.png")
    a, _ = provider.sessions.join(info.session_id, "A")
    b, _ = provider.sessions.join(info.session_id, "B")
    provider.save_annotation(info, image_id, a.annotator_id, collection(
        square(0, 0, 10, "nucleus"), square(40, 40, 10, "nucleus"), square(80, 80, 10, "other")))
    provider.save_annotation(info, image_id, b.annotator_id, collection(
        square(2, 0, 10, "nucleus"), square(40, 40, 10, "other"), square(80, 80, 10, "other")))
    out = tmp_path / "pulled"
    done = pull(str(folder), "--session", info.session_id, "--out", str(out))
    assert done.returncode == 0, done.stderr
    return folder, info, image_id, a, b, out


def test_pulled_set_and_report_carry_consensus_classes_ties_and_class_kappa(tmp_path):
    """Two annotators class three squares: (nucleus, nucleus), (nucleus, other), (other, other). Consensus: three
    objects, the second a tie. Kappa over them: A = (n, n, o), B = (n, o, o): p_o = 2/3, p_e = 4/9, kappa 0.4."""
    from colabel.apps.report import session_report

    folder, info, image_id, a, b, out = _two_annotators_class_three_squares(tmp_path)
    import zarr

    root = zarr.open_group(str(out / "labels.zarr"), mode="r")
    consensus = root[f"consensus/{image_id}"]
    assert consensus.attrs["classes"] == ["nucleus", None, "other"] and consensus.attrs["ties"] == [2]
    semantic = root[f"consensus_semantic/{image_id}"][...]
    assert (semantic[5, 5], semantic[45, 45], semantic[85, 85], semantic[30, 30]) == (1, 0, 2, 0)
    with open(out / "consensus_cells.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["label"], r["class"], r["tie"], r["support"]) for r in rows] == [
        ("1", "nucleus", "False", "2"), ("2", "", "True", "2"), ("3", "other", "False", "2")]
    votes = {a.annotator_id: "nucleus", b.annotator_id: "other"}
    assert rows[1]["votes"] == ";".join(f"{k}={votes[k]}" for k in sorted(votes))  # annotators in id order
    drawn = json.loads((out / "geojson" / f"ihc_ki67__{b.annotator_id}.geojson").read_text())["features"]
    assert [f["properties"]["classification"]["name"] for f in drawn] == ["nucleus", "other", "other"]
    agreement = json.loads((out / "agreement.json").read_text())[image_id]
    assert agreement["pairs"][0]["kappa"] == pytest.approx(0.4) and agreement["pairs"][0]["n_cells"] == 3
    assert agreement["consensus"] == {"objects": 3, "classified": 2, "ties": [2]}

    report = session_report(folder, info.session_id)["agreement"]["images"][image_id]
    assert report["pairs"][0]["kappa"] == pytest.approx(0.4) and report["consensus"]["ties"] == [2]
    printed = subprocess.run([*COLABEL, "report", str(folder), info.session_id], capture_output=True, text=True)
    assert printed.returncode == 0 and "F1 1.000 kappa 0.400" in printed.stdout
    assert "consensus: 3 objects, 2 with a majority class, 1 ties (objects 2)" in printed.stdout


def test_classifier_cells_can_come_from_the_consensus_with_ties_left_out(tmp_path):
    """The HALS classifier's training cells from the consensus: majority classes, the tie counted as unclassified,
    centroids from the consensus outlines (the intersection of the two annotators' squares)."""
    from colabel.services.training.classifier_training import read_pulled_cells

    _, _, image_id, _, _, out = _two_annotators_class_three_squares(tmp_path)

    cells = read_pulled_cells(out, annotator="consensus")
    assert cells.class_counts() == {"nucleus": 1, "other": 1} and cells.skipped_unclassified == 1
    np.testing.assert_allclose(cells.centroids[image_id], [[6.0, 5.0], [85.0, 85.0]])  # x 2..10 (both), y 0..10
    assert cells.ids[image_id].tolist() == [1, 3] and cells.sources == [(image_id, "consensus", 0)]
    first = read_pulled_cells(out)  # the default: the first annotator's own cells, the tie's square included
    assert sum(first.class_counts().values()) == 3
