"""`colabel pull` from a running `colabel serve` with a trainer token, and from a local folder."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import re
import shutil
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


def start_serve(folder, port, **popen):
    process, printed = start_colabel(["serve", str(folder), "--port", str(port), "--models", ""], **popen)
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

    from colabel.apps.provider.images import ImageCatalog

    folder = make_image_folder(tmp_path / "images")
    port = free_port()
    # answers of at most 300,000 bytes: the 512 x 512 images (uint16 grey, 524,288 bytes; RGB, 786,432) come in strips
    process, printed = start_serve(folder, port, env={**os.environ, "COLABEL_MAX_IMAGE_BYTES": "300000"})
    url = f"http://127.0.0.1:{port}"
    out = tmp_path / "pulled"

    async def scenario():
        clients = await prepare(printed, url)
        provider_client, annotator_client, provider, annotator, session, trainer, images, token, ada = clients
        assert trainer["share_url"].endswith(f"#trainer={trainer['token']}")
        with pytest.raises(Exception, match="786432 bytes, more than the limit of 300000"):  # the whole image at once
            await annotator.trainer_image(trainer["token"], images["ihc_ki67.png"])

        first = await asyncio.to_thread(pull, trainer["share_url"], "--out", str(out))
        assert first.returncode == 0, first.stdout + first.stderr
        assert "pulled 3 new annotation versions (0 up to date)" in first.stdout

        root = zarr.open_group(str(out / "labels.zarr"), mode="r")
        dsb = images["dsb2018_nuclei.tif"]
        expected = tifffile.imread(folder / "dsb2018_nuclei.tif")[..., None]
        np.testing.assert_array_equal(root[f"images/{dsb}"][...], expected)
        ihc = images["ihc_ki67.png"]
        np.testing.assert_array_equal(root[f"images/{ihc}"][...], ImageCatalog(folder).read(ihc))
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
        assert {r["finished"] for r in rows} == {"False"}  # nobody went on to a next image
        with open(out / "annotators.csv") as handle:  # who is behind each annotator id of the tables
            people = {r["display_name"]: r for r in csv.DictReader(handle)}
        assert sorted(people) == ["Ada", "Bob"] and {r["annotator_id"] for r in people.values()} == set(annotators)
        assert (people["Ada"]["images"], people["Ada"]["objects"], people["Bob"]["images"]) == ("2", "3", "1")
        assert people["Ada"]["finished"] == "0"
        assert people["Ada"]["joined"].startswith("20")
        coco = json.loads((out / "coco.json").read_text())
        assert [c["name"] for c in coco["categories"]] == ["nucleus", "other", "object"]
        assert len(coco["annotations"]) == 4
        squares = sorted(a["bbox"] for a in coco["annotations"] if a["area"] == 400)  # Ada's and Bob's
        assert squares == [[10.0, 10.0, 20.0, 20.0], [11.0, 10.0, 20.0, 20.0]]
        assert len(list((out / "tiff").glob("*__a-*_mask.tif"))) == 3
        np.testing.assert_array_equal(tifffile.imread(out / "tiff" / "dsb2018_nuclei.tif__consensus_mask.tif"),
                                      consensus)
        agreement = json.loads((out / "agreement.json").read_text())[dsb]
        # Ada drew 2 squares, Bob 1 matching one of them: F1 = 2 * 1 / (2 + 1)
        assert agreement["pairs"][0]["f1"] == pytest.approx(2 / 3)

        await annotator.finish_image(token, ada, dsb)  # a finish without a new version: the tables say it
        again = await asyncio.to_thread(pull, trainer["share_url"], "--out", str(out))
        assert "pulled 0 new annotation versions (3 up to date)" in again.stdout
        with open(out / "cells.csv") as handle:
            finished = {(r["image_id"], r["annotator_id"]): r["finished"] for r in csv.DictReader(handle)}
        assert finished == {(dsb, people["Ada"]["annotator_id"]): "True", (dsb, people["Bob"]["annotator_id"]): "False",
                            (ihc, people["Ada"]["annotator_id"]): "False"}
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


def test_a_trainer_url_of_a_provider_behind_a_proxy_path_names_the_server_under_that_path():
    """`colabel serve --public-url https://host/hypha` prints trainer URLs `https://host/hypha/<ws>/apps/<name>-web/
    #trainer=T`: the pull connects to `https://host/hypha` (refused before as "not a colabel provider URL")."""
    from colabel.apps.pull import RemoteSource
    from colabel.errors import InvalidInputError

    for url, server in (("https://labels.example.org/hypha/ws-x/apps/colabel-web/#trainer=T",
                         "https://labels.example.org/hypha"),
                        ("https://labels.example.org/a/b/ws-x/apps/colabel-web/", "https://labels.example.org/a/b"),
                        ("http://127.0.0.1:9527/ws-x/apps/colabel-web/#trainer=T", "http://127.0.0.1:9527")):
        assert RemoteSource.address(url, None if "#" in url else "T") == (
            server, "ws-x/colabel-annotate", "T", f"{server}/ws-x/apps/colabel-web")
    for bad in ("https://labels.example.org/ws-x/colabel-web/#trainer=T", "ftp://h/ws-x/apps/colabel-web/#trainer=T"):
        with pytest.raises(InvalidInputError, match="not a colabel provider URL"):
            RemoteSource.address(bad)


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
    other = next(r.image_id for r in provider.catalog.records() if r.name == "sub/he_histo.jpg")
    provider.save_annotation(info, other, a.annotator_id, collection(square(5, 5, 10)))
    provider.save_annotation(info, other, b.annotator_id, collection(square(5, 5, 10)))
    report = session_report(folder, info.session_id)
    pair = report["agreement"]["images"][image_id]["pairs"][0]
    assert pair["f1"] == pytest.approx(2 / 3)  # one match (IoU 0.82), one object only A drew
    assert report["agreement"]["images"][other]["pairs"][0]["f1"] == 1.0
    # over the session the objects are pooled: 2 matched, 1 drawn by A only -> F1 4 / 5 (not the mean, 5 / 6)
    (session,) = report["agreement"]["pairs"]
    assert (session["a"], session["b"]) == tuple(sorted([a.annotator_id, b.annotator_id]))
    assert (session["images"], session["matched"], session["f1"]) == (2, 2, pytest.approx(0.8))
    assert sorted([session["only_a"], session["only_b"]]) == [0, 1]
    printed = subprocess.run([*COLABEL, "report", str(folder), info.session_id], capture_output=True, text=True)
    assert printed.returncode == 0 and "F1 0.667" in printed.stdout
    assert f"A ({a.annotator_id})" in printed.stdout and "over 2 images: F1 0.800" in printed.stdout
    assert "agreement on ihc_ki67.png" in printed.stdout and "agreement on sub/he_histo.jpg" in printed.stdout
    both = ", ".join(f"{n} ({i})" for i, n in sorted([(a.annotator_id, "A"), (b.annotator_id, "B")]))  # id order
    assert (f"not finished on ihc_ki67.png: the labels of {both}; counted in the agreement as they are; "
            "--finished-only takes the finished versions only") in printed.stdout

    # A and B finish the JPEG, then B redraws it (a correction not finished again: --finished-only takes B's
    # finished version); on the PNG, B finishes and A is still drawing: --finished-only leaves the PNG no pair,
    # and the session's pooled figures are the JPEG's finished versions alone
    provider.finish_image(info, other, a.annotator_id)
    provider.finish_image(info, other, b.annotator_id)
    provider.save_annotation(info, other, b.annotator_id, collection(square(60, 60, 10)))
    provider.finish_image(info, image_id, b.annotator_id)
    finished = session_report(folder, info.session_id, finished_only=True)["agreement"]
    assert list(finished["images"]) == [other] and finished["images"][other]["pairs"][0]["f1"] == 1.0
    assert sorted(finished["unfinished"], key=lambda e: e["image_id"]) == sorted([
        {"image_id": image_id, "annotator_id": a.annotator_id, "finished_version": None},
        {"image_id": other, "annotator_id": b.annotator_id, "finished_version": 1}], key=lambda e: e["image_id"])
    assert [(p["images"], p["f1"]) for p in finished["pairs"]] == [(1, 1.0)]
    latest = session_report(folder, info.session_id)["agreement"]  # by default: the latest versions, as they are
    assert latest["images"].keys() == {image_id, other} and latest["images"][other]["pairs"][0]["f1"] == 0.0
    printed = subprocess.run([*COLABEL, "report", str(folder), info.session_id, "--finished-only"],
                             capture_output=True, text=True)
    assert printed.returncode == 0 and "agreement on ihc_ki67.png" not in printed.stdout
    assert (f"not finished on ihc_ki67.png: the labels of A ({a.annotator_id}); the agreement takes the finished "
            "versions only: --finished-only") in printed.stdout
    assert (f"not finished on sub/he_histo.jpg: the labels of B ({b.annotator_id}) (finished at version 1, corrected "
            "since)") in printed.stdout


def test_report_help_says_what_it_prints_and_does_not_call_self_validation_effectiveness():
    """`colabel report --help` described the self-validation AUC as the HALS "effectiveness", which the report itself
    says it is not, and left out the agreement it prints."""
    printed = subprocess.run([*COLABEL, "report", "--help"], capture_output=True, text=True, timeout=60)
    text = " ".join(printed.stdout.split())
    assert printed.returncode == 0 and "not the HALS paper's effectiveness" in text and "effectiveness (" not in text
    assert "self-validation accuracy AUC (on a 25% split of its own labels" in text and "agreement" in text


def test_an_object_without_a_class_of_the_session_is_no_class_not_background_in_the_semantic_mask(tmp_path):
    import zarr

    from colabel.apps.provider.provider import DataProvider
    from colabel.apps.pull import labelled_pairs
    from colabel.errors import InvalidInputError

    folder = make_image_folder(tmp_path / "images")
    provider = DataProvider(folder)
    info, _ = provider.create_session(name="classes", classes=[{"name": "nucleus", "color": "#ff0000"}])
    image_id = next(r.image_id for r in provider.catalog.records() if r.name == "ihc_ki67.png")
    a, _ = provider.sessions.join(info.session_id, "A")
    provider.save_annotation(info, image_id, a.annotator_id, collection(
        square(0, 0, 10, "nucleus"), square(40, 40, 10, None)))  # drawn, never classified
    out, args = tmp_path / "pulled", (str(folder), "--session", info.session_id, "--out", str(tmp_path / "pulled"))
    done = pull(*args)
    assert done.returncode == 0 and "pulled 1 new annotation versions (0 up to date)" in done.stdout, done.stderr
    key = f"semantic/{image_id}/{a.annotator_id}"
    semantic = zarr.open_group(str(out / "labels.zarr"), mode="r")[key]
    assert (semantic[5, 5], semantic[45, 45], semantic[30, 30]) == (1, 65535, 0)
    assert semantic.attrs["classes"] == ["nucleus"] and semantic.attrs["no_class"] == 65535

    # a set pulled by a colabel whose semantic masks made such objects background: refused as semantic targets,
    # mended by the next pull, which fetches the annotations again but not the image
    old = zarr.open_group(str(out / "labels.zarr"), mode="r+")[key]
    old[40:50, 40:50] = 0
    del old.attrs["no_class"]
    state = json.loads((out / "pull_state.json").read_text())
    (out / "pull_state.json").write_text(json.dumps({**state, "format": 2}))
    with pytest.raises(InvalidInputError, match="pulled by an earlier colabel, whose semantic masks made objects "
                                                "without a class background: pull it again"):
        labelled_pairs(out, masks="semantic")
    image_file = out / "tiff" / "ihc_ki67.png.tif"
    written = image_file.stat().st_mtime_ns
    assert "pulled 1 new annotation versions (0 up to date)" in pull(*args).stdout
    assert zarr.open_group(str(out / "labels.zarr"), mode="r")[key][45, 45] == 65535
    assert labelled_pairs(out, masks="semantic")[0][2][45, 45] == 65535
    assert image_file.stat().st_mtime_ns == written
    assert "(1 up to date)" in pull(*args).stdout


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
    from colabel.apps.pull import labelled_pairs
    from colabel.apps.report import session_report

    folder, info, image_id, a, b, out = _two_annotators_class_three_squares(tmp_path)
    import zarr

    root = zarr.open_group(str(out / "labels.zarr"), mode="r")
    consensus = root[f"consensus/{image_id}"]
    assert consensus.attrs["classes"] == ["nucleus", None, "other"] and consensus.attrs["ties"] == [2]
    semantic = root[f"consensus_semantic/{image_id}"]
    # the tie is an object of no class (65535: left out of a class loss), not background
    assert (semantic[5, 5], semantic[45, 45], semantic[85, 85], semantic[30, 30]) == (1, 65535, 2, 0)
    assert semantic.attrs["classes"] == ["nucleus", "other"] and semantic.attrs["no_class"] == 65535
    ((_, _, trained),) = labelled_pairs(out, masks="semantic")  # what a trainer gets: the consensus's classes
    np.testing.assert_array_equal(trained, semantic[...])
    with open(out / "consensus_cells.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["label"], r["class"], r["tie"], r["support"]) for r in rows] == [
        ("1", "nucleus", "False", "2"), ("2", "", "True", "2"), ("3", "other", "False", "2")]
    votes = {a.annotator_id: "nucleus", b.annotator_id: "other"}
    assert rows[1]["votes"] == ";".join(f"{k}={votes[k]}" for k in sorted(votes))  # annotators in id order
    drawn = json.loads((out / "geojson" / f"ihc_ki67.png__{b.annotator_id}.geojson").read_text())["features"]
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


def _session(folder, names=("A", "B"), classes=("nucleus",)):
    """A provider over ``folder``, a session with ``classes``, and its annotators ``names``."""
    from colabel.apps.provider.provider import DataProvider

    provider = DataProvider(folder)
    info, _ = provider.create_session(name="mirror", annotators_per_image=2,
                                      classes=[{"name": c, "color": "#ff0000"} for c in classes])
    ids = {r.name: r.image_id for r in provider.catalog.records()}
    return provider, info, ids, [provider.sessions.join(info.session_id, n)[0] for n in names]


def _files(folder):
    """Relative path -> bytes of every file under ``folder``."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_pull_drops_images_and_annotators_the_source_no_longer_has(tmp_path):
    """Pulled: A on three images, B too on the IHC one (a consensus). Then the H&E file is deleted, the DSB file
    becomes junk and B's labels of the IHC image are deleted: the next pull says so and mirrors the folder, and
    once the DSB file is back, its labels are pulled again."""
    import shutil

    import zarr

    from conftest import DATA

    folder = make_image_folder(tmp_path / "images")
    provider, info, ids, (a, b) = _session(folder)
    for name in ("ihc_ki67.png", "dsb2018_nuclei.tif", "sub/he_histo.jpg"):
        provider.save_annotation(info, ids[name], a.annotator_id, collection(square(10, 10, 20)))
    provider.save_annotation(info, ids["ihc_ki67.png"], b.annotator_id, collection(square(11, 10, 20)))
    out = tmp_path / "pulled"
    first = pull(str(folder), "--session", info.session_id, "--out", str(out))
    assert first.returncode == 0 and "pulled 4 new annotation versions" in first.stdout, first.stderr
    assert (out / "tiff" / "ihc_ki67.png__consensus_mask.tif").is_file() and (out / "coco_consensus.json").is_file()

    (folder / "sub" / "he_histo.jpg").unlink()
    (folder / "dsb2018_nuclei.tif").write_bytes(b"II*\x00 not a tiff any more")
    shutil.rmtree(folder / "annotations" / "sessions" / info.session_id / "images" / ids["ihc_ki67.png"]
                  / b.annotator_id)
    second = pull(str(folder), "--session", info.session_id, "--out", str(out))
    assert second.returncode == 0, second.stderr
    lines = [line for line in second.stdout.splitlines() if line.startswith("dropped")]
    assert len(lines) == 4, second.stdout
    assert lines[0].startswith("dropped image dsb2018_nuclei.tif: unreadable in the source")
    assert lines[1] == f"dropped the labels of annotator B ({b.annotator_id}) on ihc_ki67.png: no longer in the source"
    assert lines[2] == "dropped the consensus of ihc_ki67.png: fewer than 2 annotators left"
    assert lines[3] == "dropped image sub/he_histo.jpg: no longer in the source; its labels by 1 annotator removed"
    assert "pulled 0 new annotation versions (1 up to date) of 1 images, 1 objects" in second.stdout

    ihc, mask = ids["ihc_ki67.png"], f"ihc_ki67.png__{a.annotator_id}"
    root = zarr.open_group(str(out / "labels.zarr"), mode="r")
    assert list(root["images"].array_keys()) == [ihc]
    for group in ("instances", "semantic"):
        assert list(root[group].group_keys()) == [ihc]
        assert list(root[f"{group}/{ihc}"].array_keys()) == [a.annotator_id]
    assert not list(root["consensus"].array_keys()) and not list(root["consensus_semantic"].array_keys())
    assert sorted(_files(out / "tiff")) == ["ihc_ki67.png.tif", f"{mask}_mask.tif"]
    assert sorted(_files(out / "geojson")) == [f"{mask}.geojson"]
    assert json.loads((out / "agreement.json").read_text()) == {} and not (out / "coco_consensus.json").exists()
    with open(out / "consensus_cells.csv") as handle:
        assert list(csv.DictReader(handle)) == []
    with open(out / "cells.csv") as handle:
        assert [(r["image_id"], r["annotator_id"]) for r in csv.DictReader(handle)] == [(ihc, a.annotator_id)]
    coco = json.loads((out / "coco.json").read_text())
    assert [i["colabel_image_id"] for i in coco["images"]] == [ihc] and len(coco["annotations"]) == 1
    from colabel.apps.pull import labelled_pairs

    assert [image_id for image_id, _, _ in labelled_pairs(out)] == [ihc]  # trains on A's mask, not a stale consensus

    shutil.copy(DATA / "dsb2018_nuclei.tif", folder / "dsb2018_nuclei.tif")
    third = pull(str(folder), "--session", info.session_id, "--out", str(out))
    assert "pulled 1 new annotation versions (1 up to date) of 2 images" in third.stdout
    assert "dropped" not in third.stdout
    assert sorted(zarr.open_group(str(out / "labels.zarr"), mode="r")["images"].array_keys()) == sorted(
        [ihc, ids["dsb2018_nuclei.tif"]])


def test_an_image_rewritten_under_the_same_name_is_pulled_again_and_an_unchanged_one_is_not(tmp_path):
    """The IHC image is labelled and pulled; its file is then rewritten with other pixels of the same shape and
    dtype (the provider's catalog sees the same name, id and shape): the next pull fetches the new pixels into the
    zarr array and the TIFF, and a pull after that rewrites neither."""
    import os

    import zarr
    from PIL import Image

    folder = make_image_folder(tmp_path / "images")
    provider, info, ids, (a, _) = _session(folder)
    ihc = ids["ihc_ki67.png"]
    provider.save_annotation(info, ihc, a.annotator_id, collection(square(10, 10, 20)))
    out = tmp_path / "pulled"
    assert pull(str(folder), "--session", info.session_id, "--out", str(out)).returncode == 0
    before = np.asarray(Image.open(folder / "ihc_ki67.png").convert("RGB"))
    Image.fromarray(255 - before).save(folder / "ihc_ki67.png")
    second = pull(str(folder), "--session", info.session_id, "--out", str(out))
    assert second.returncode == 0 and "pulled 0 new annotation versions (1 up to date)" in second.stdout, second.stderr
    root = zarr.open_group(str(out / "labels.zarr"), mode="r")
    np.testing.assert_array_equal(root[f"images/{ihc}"][...], 255 - before)
    np.testing.assert_array_equal(tifffile.imread(out / "tiff" / "ihc_ki67.png.tif"), 255 - before)
    stamp = os.stat(out / "tiff" / "ihc_ki67.png.tif").st_mtime_ns
    assert pull(str(folder), "--session", info.session_id, "--out", str(out)).returncode == 0
    assert os.stat(out / "tiff" / "ihc_ki67.png.tif").st_mtime_ns == stamp


def rle_decode(segmentation) -> np.ndarray:
    """A COCO uncompressed RLE (``{"counts": [...], "size": [h, w]}``, column-major, background first) as a
    boolean (h, w) mask; asserts the runs cover the image exactly."""
    h, w = segmentation["size"]
    counts = segmentation["counts"]
    assert sum(counts) == h * w and all(isinstance(c, int) and c >= 0 for c in counts)
    values = np.zeros(len(counts), bool)
    values[1::2] = True
    return np.repeat(values, counts).reshape((h, w), order="F")


def test_coco_files_are_coco_that_agrees_exactly_with_the_pulled_masks(tmp_path):
    """A draws a nucleus with a hole, an unclassified square and, in the DSB image, nothing; B a nucleus
    overlapping A's. coco.json and coco_consensus.json: every category id exists (unclassified = "object"),
    file names are the pulled TIFFs, the empty image is listed, and each RLE decodes to the zarr mask's object,
    holes included, with its pixel area and box."""
    import zarr
    from PIL import Image

    folder = make_image_folder(tmp_path / "images")
    provider, info, ids, (a, b) = _session(folder)
    ring = [[20, 20], [60, 20], [60, 60], [20, 60], [20, 20]]
    hole = [[30, 30], [30, 50], [50, 50], [50, 30], [30, 30]]
    holed = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring, hole]},
             "properties": {"classification": {"name": "nucleus"}}}
    ihc, dsb = ids["ihc_ki67.png"], ids["dsb2018_nuclei.tif"]
    provider.save_annotation(info, ihc, a.annotator_id, collection(holed, square(100, 100, 15, None)))
    provider.save_annotation(info, ihc, b.annotator_id, collection(square(21, 20, 40)))
    provider.save_annotation(info, dsb, a.annotator_id, collection())
    out = tmp_path / "pulled"
    done = pull(str(folder), "--session", info.session_id, "--out", str(out))
    assert done.returncode == 0, done.stderr
    root = zarr.open_group(str(out / "labels.zarr"), mode="r")

    def check(coco, masks):
        """``masks``: colabel image id -> {annotator id or None: (H, W) labels}."""
        assert [(c["id"], c["name"]) for c in coco["categories"]] == [(1, "nucleus"), (2, "object")]
        images = {i["id"]: i for i in coco["images"]}
        assert sorted(i["colabel_image_id"] for i in images.values()) == sorted(masks)
        for image in images.values():
            pixels = tifffile.imread(out / image["file_name"])  # relative to the COCO file
            stored = root[f"images/{image['colabel_image_id']}"][...]
            np.testing.assert_array_equal(pixels.reshape(stored.shape), stored)
            assert (image["height"], image["width"]) == stored.shape[:2]
        assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])
        seen = {image_id: {who: set() for who in by} for image_id, by in masks.items()}
        for ann in coco["annotations"]:
            image = images[ann["image_id"]]
            who = ann["attributes"].get("annotator_id")
            labels = masks[image["colabel_image_id"]][who]
            assert ann["segmentation"]["size"] == [image["height"], image["width"]] and ann["iscrowd"] == 0
            drawn = rle_decode(ann["segmentation"])
            np.testing.assert_array_equal(drawn, labels == ann["attributes"]["label"])
            rows, cols = np.nonzero(drawn)
            assert ann["area"] == drawn.sum() and ann["bbox"] == [
                cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1]
            seen[image["colabel_image_id"]][who].add(ann["attributes"]["label"])
        for image_id, by in masks.items():
            for who, labels in by.items():
                assert seen[image_id][who] == set(np.unique(labels[labels > 0]).tolist())
        return {(images[ann["image_id"]]["colabel_image_id"], ann["attributes"].get("annotator_id"),
                 ann["attributes"]["label"]): ann for ann in coco["annotations"]}

    instances = {i: {w: root[f"instances/{i}/{w}"][...] for w in root[f"instances/{i}"].array_keys()}
                 for i in (ihc, dsb)}
    by_object = check(json.loads((out / "coco.json").read_text()), instances)
    assert not instances[dsb][a.annotator_id].any() and dsb in instances  # listed without objects
    holed_ann, plain = by_object[(ihc, a.annotator_id, 1)], by_object[(ihc, a.annotator_id, 2)]
    assert holed_ann["category_id"] == 1 and holed_ann["area"] == 40 * 40 - 20 * 20  # the hole is not counted
    assert not rle_decode(holed_ann["segmentation"])[40, 40]
    assert plain["category_id"] == 2 and plain["area"] == 15 * 15
    file_name = next(i["file_name"] for i in json.loads((out / "coco.json").read_text())["images"]
                     if i["colabel_image_id"] == ihc)
    assert file_name == "tiff/ihc_ki67.png.tif"
    np.testing.assert_array_equal(tifffile.imread(out / file_name), np.asarray(Image.open(folder / "ihc_ki67.png")))

    consensus = check(json.loads((out / "coco_consensus.json").read_text()),
                      {ihc: {None: root[f"consensus/{ihc}"][...]}})
    assert len(consensus) == 1 and next(iter(consensus.values()))["attributes"]["support"] == 2


def test_images_that_differ_only_in_extension_or_spelling_get_files_of_their_own(tmp_path):
    """cell.png and cell.tif, "a b.png" and "a_b.png": four image TIFFs and four mask TIFFs, each holding its own
    image's pixels and labels; the consensus of cell.png has its mask TIFF too."""
    import shutil

    import zarr

    from conftest import DATA

    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(DATA / "ihc_ki67.png", folder / "cell.png")
    shutil.copy(DATA / "dsb2018_nuclei.tif", folder / "cell.tif")
    shutil.copy(DATA / "ihc_ki67.png", folder / "a b.png")
    shutil.copy(DATA / "he_histo.jpg", folder / "a_b.png")  # a JPEG named .png is still read
    provider, info, ids, (a, b) = _session(folder)
    for n, image_id in enumerate(ids.values()):
        provider.save_annotation(info, image_id, a.annotator_id, collection(square(5 + 10 * n, 5, 8)))
    n = list(ids).index("cell.png")
    provider.save_annotation(info, ids["cell.png"], b.annotator_id, collection(square(6 + 10 * n, 5, 8)))
    out = tmp_path / "pulled"
    done = pull(str(folder), "--session", info.session_id, "--out", str(out))
    assert done.returncode == 0 and "pulled 5 new annotation versions" in done.stdout, done.stderr
    root = zarr.open_group(str(out / "labels.zarr"), mode="r")
    stems = {"cell.png": "cell.png", "cell.tif": "cell.tif", "a b.png": f"a_b.png@{ids['a b.png']}",
             "a_b.png": f"a_b.png@{ids['a_b.png']}"}
    assert len(list((out / "tiff").glob("*"))) == 4 + 5 + 1
    for name, stem in stems.items():
        image_id = ids[name]
        stored = root[f"images/{image_id}"][...]
        np.testing.assert_array_equal(tifffile.imread(out / "tiff" / f"{stem}.tif").reshape(stored.shape), stored)
        np.testing.assert_array_equal(tifffile.imread(out / "tiff" / f"{stem}__{a.annotator_id}_mask.tif"),
                                      root[f"instances/{image_id}/{a.annotator_id}"][...])
    consensus = tifffile.imread(out / "tiff" / "cell.png__consensus_mask.tif")
    assert consensus.max() == 1
    np.testing.assert_array_equal(consensus, root[f"consensus/{ids['cell.png']}"][...])
    coco = json.loads((out / "coco.json").read_text())
    assert len({i["file_name"] for i in coco["images"]}) == 4


def test_pulling_another_session_or_source_into_a_pulled_set_is_refused_and_writes_nothing(tmp_path):
    import shutil

    folder = make_image_folder(tmp_path / "images")
    provider, info, ids, (a,) = _session(folder, names=("A",))
    other, _ = provider.create_session(name="other", classes=[{"name": "tumour", "color": "#00ff00"}])
    ada, _ = provider.sessions.join(other.session_id, "Ada")
    provider.save_annotation(info, ids["ihc_ki67.png"], a.annotator_id, collection(square(1, 1, 8)))
    provider.save_annotation(other, ids["ihc_ki67.png"], ada.annotator_id, collection(square(1, 1, 8, "tumour")))
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    out = tmp_path / "pulled"
    assert pull(str(folder), "--session", info.session_id, "--out", str(out)).returncode == 0
    before = _files(out)

    refused = pull(str(folder), "--session", other.session_id, "--out", str(out))
    assert refused.returncode == 2 and not refused.stdout, refused.stdout
    assert f"holds a pull of session {info.session_id} from {folder.resolve()}" in refused.stderr
    assert f"not of session {other.session_id} from {folder.resolve()}" in refused.stderr
    assert "pull into another --out" in refused.stderr
    moved = pull(str(copy), "--session", info.session_id, "--out", str(out))
    assert moved.returncode == 2 and f"not of session {info.session_id} from {copy.resolve()}" in moved.stderr
    assert _files(out) == before

    (out / "pull_state.json").unlink()  # a set pulled before the source was recorded: its zarr names the session
    assert pull(str(folder), "--session", other.session_id, "--out", str(out)).returncode == 2
    again = pull(str(folder), "--session", info.session_id, "--out", str(out))
    assert again.returncode == 0 and "pulled 1 new annotation versions" in again.stdout
    state = json.loads((out / "pull_state.json").read_text())
    assert (state["source"], state["session_id"]) == (str(folder.resolve()), info.session_id)


def test_an_image_its_masks_and_its_consensus_share_one_zarr_chunk_grid(tmp_path):
    """A crop of a large image reads the same chunks of the image, each annotator's masks and the consensus."""
    import imageio.v3 as iio
    import zarr

    from colabel.apps.provider.provider import DataProvider

    folder = make_image_folder(tmp_path / "images")
    ihc = iio.imread(folder / "ihc_ki67.png")
    iio.imwrite(folder / "large.png", np.tile(ihc, (3, 2, 1))[:1200, :900])  # the real IHC image, tiled
    provider = DataProvider(folder)
    info, _ = provider.create_session(name="large", classes=[{"name": "nucleus", "color": "#ff0000"}],
                                      annotators_per_image=2)
    image_id = next(r.image_id for r in provider.catalog.records() if r.name == "large.png")
    for name, x in (("A", 600), ("B", 602)):
        annotator, _ = provider.sessions.join(info.session_id, name)
        provider.save_annotation(info, image_id, annotator.annotator_id, collection(square(x, 700, 30)))
    out = tmp_path / "pulled"
    done = pull(str(folder), "--session", info.session_id, "--out", str(out))
    assert done.returncode == 0, done.stderr
    root = zarr.open_group(str(out / "labels.zarr"), mode="r")
    grids = {path: root[path].chunks[:2] for path in
             [f"images/{image_id}", f"consensus/{image_id}", f"consensus_semantic/{image_id}",
              *(f"{group}/{image_id}/{a}" for group in ("instances", "semantic")
                for a in root[f"instances/{image_id}"].array_keys())]}
    assert len(grids) == 7 and set(grids.values()) == {(512, 512)}, grids
    assert root[f"images/{image_id}"].chunks == (512, 512, 3)


def test_zarr_format_2_holds_the_same_arrays_and_a_later_switch_rewrites_the_store(tmp_path):
    """`--zarr-format 2` (for readers that predate zarr v3) writes the arrays and attributes a format 3 pull writes;
    a later pull keeps the store's format, and asking for the other one rewrites the store whole."""
    import zarr

    from colabel.apps.pull import labelled_pairs

    folder = make_image_folder(tmp_path / "images")
    provider, info, ids, (a, b) = _session(folder)
    image_id = ids["ihc_ki67.png"]
    provider.save_annotation(info, image_id, a.annotator_id, collection(square(10, 10, 12), square(40, 40, 9)))
    provider.save_annotation(info, image_id, b.annotator_id, collection(square(11, 10, 12)))
    v3, v2 = tmp_path / "v3", tmp_path / "v2"
    assert pull(str(folder), "--session", info.session_id, "--out", str(v3)).returncode == 0
    done = pull(str(folder), "--session", info.session_id, "--out", str(v2), "--zarr-format", "2")
    assert done.returncode == 0, done.stderr
    assert (v2 / "labels.zarr" / ".zgroup").is_file() and not (v2 / "labels.zarr" / "zarr.json").exists()
    array_meta = json.loads((v2 / "labels.zarr" / "consensus" / image_id / ".zarray").read_text())
    assert array_meta["zarr_format"] == 2 and array_meta["dtype"] == "<u4"

    def arrays(out):
        root = zarr.open_group(str(out / "labels.zarr"), mode="r")
        found = {path: (node[...], dict(node.attrs)) for path, node in root.members(max_depth=None)
                 if isinstance(node, zarr.Array)}
        return found, dict(root.attrs)

    (got, got_attrs), (want, want_attrs) = arrays(v2), arrays(v3)
    assert sorted(got) == sorted(want) and len(got) == 7 and got_attrs == want_attrs
    for path, (data, attrs) in want.items():
        np.testing.assert_array_equal(got[path][0], data)
        assert got[path][0].dtype == data.dtype and got[path][1] == attrs, path
    (pair,), (want_pair,) = labelled_pairs(v2), labelled_pairs(v3)  # the consensus: the square both drew
    assert pair[0] == want_pair[0] == image_id and pair[2].max() == 1
    np.testing.assert_array_equal(pair[2], want_pair[2])

    again = pull(str(folder), "--session", info.session_id, "--out", str(v2))
    assert again.returncode == 0 and "pulled 0 new annotation versions (2 up to date)" in again.stdout
    assert (v2 / "labels.zarr" / ".zgroup").is_file()
    switched = pull(str(folder), "--session", info.session_id, "--out", str(v2), "--zarr-format", "3")
    assert switched.returncode == 0 and "pulled 2 new annotation versions" in switched.stdout, switched.stdout
    assert "dropped labels.zarr in zarr format 2: rewriting it in format 3" in switched.stdout
    assert (v2 / "labels.zarr" / "zarr.json").is_file() and not (v2 / "labels.zarr" / ".zgroup").exists()
    got, _ = arrays(v2)
    assert sorted(got) == sorted(want)

    before = _files(v2)
    refused = pull(str(folder), "--session", info.session_id, "--out", str(v2), "--zarr-format", "4")
    assert refused.returncode == 2 and "invalid choice: 4" in refused.stderr and _files(v2) == before


def _tree(folder):
    """Relative path -> (bytes, mtime in ns) of every file under ``folder``, and every folder (None): what a reader
    must leave exactly as it was."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


def report(folder, session_id):
    return subprocess.run([*COLABEL, "report", str(folder), session_id], capture_output=True, text=True, timeout=120)


def test_report_and_a_local_pull_beside_a_saving_provider_leave_its_writes_in_flight_alone(tmp_path):
    """`colabel report` and a local `colabel pull` run on a folder while its provider saves in a loop (a real writer,
    in a thread): no save fails, and the temporary files of writes in flight (planted, as a save, a session-manifest
    write and a secrets write leave them mid-write) are all still there, untouched, afterwards."""
    import threading

    folder = make_image_folder(tmp_path / "images")
    provider, info, ids, (a, b) = _session(folder)
    ihc, dsb = ids["ihc_ki67.png"], ids["dsb2018_nuclei.tif"]
    provider.save_annotation(info, ihc, a.annotator_id, collection(square(10, 10, 20)))
    provider.save_annotation(info, ihc, b.annotator_id, collection(square(11, 10, 20)))
    session_dir = folder / "annotations" / "sessions" / info.session_id
    in_flight = [session_dir / "images" / ihc / a.annotator_id / ".v000002-0123abcd.tif.00ff.tmp",
                 session_dir / ".session.json.00ff.tmp", folder / "annotations" / "..colabel-secrets.json.00ff.tmp"]
    for path in in_flight:
        path.write_bytes(b"being written")
    stamps = {path: path.stat().st_mtime_ns for path in in_flight}
    stop, saved, errors = threading.Event(), [], []

    def save_in_a_loop():
        while not stop.is_set():
            try:
                saved.append(provider.save_annotation(info, dsb, a.annotator_id,
                                                      collection(*[square(5 + 7 * i, 5, 6) for i in range(30)])))
            except Exception as exc:  # noqa: BLE001 - counted: there must be none
                errors.append(repr(exc))

    writer = threading.Thread(target=save_in_a_loop)
    writer.start()
    try:
        for _ in range(2):
            reported = report(folder, info.session_id)
            assert reported.returncode == 0 and "agreement" in reported.stdout, reported.stderr
            pulled = pull(str(folder), "--session", info.session_id, "--out", str(tmp_path / "pulled"))
            assert pulled.returncode == 0, pulled.stderr
    finally:
        stop.set()
        writer.join(60)
    assert errors == [] and len(saved) > 2
    assert [v.version for v in saved] == list(range(1, len(saved) + 1))
    for path in in_flight:
        assert path.read_bytes() == b"being written" and path.stat().st_mtime_ns == stamps[path], path


def test_a_local_pull_or_report_writes_nothing_in_the_folder_and_a_refused_pull_says_why(tmp_path):
    """A pull from a folder that is not a colabel folder, or of a session it does not have, is refused in one
    sentence and creates nothing (no annotations/sessions, no --out); a pull and a report that succeed leave the
    folder exactly as it was."""
    from conftest import DATA

    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy(DATA / "ihc_ki67.png", plain / "ihc_ki67.png")
    before = _tree(plain)
    refused = pull(str(plain), "--session", "s-000000000000", "--out", str(tmp_path / "x"))
    assert refused.returncode == 2 and refused.stderr == (
        f"colabel: {plain} is not a colabel folder (it has no annotations/sessions): pull from the folder a colabel "
        "serve saves annotations in\n")
    assert _tree(plain) == before and not (tmp_path / "x").exists()

    folder = make_image_folder(tmp_path / "images")
    provider, info, ids, (a, b) = _session(folder)
    provider.save_annotation(info, ids["ihc_ki67.png"], a.annotator_id, collection(square(10, 10, 20)))
    provider.save_annotation(info, ids["ihc_ki67.png"], b.annotator_id, collection(square(11, 10, 20)))
    before = _tree(folder)
    unknown = pull(str(folder), "--session", "s-000000000000", "--out", str(tmp_path / "y"))
    sessions = f"the sessions are: {info.session_id} 'mirror'"  # the refusals list what there is to choose from
    assert unknown.returncode == 2 and unknown.stderr == (
        f"colabel: no session 's-000000000000' (by id or name); {sessions} (in {folder})\n")
    unknown = report(folder, "session 1")
    assert unknown.returncode == 2 and unknown.stderr == (
        f"colabel: no session 'session 1' (by id or name); {sessions} (in {folder})\n")
    done = pull(str(folder), "--session", info.session_id, "--out", str(tmp_path / "z"))
    assert done.returncode == 0 and "pulled 2 new annotation versions" in done.stdout, done.stderr
    by_name = pull(str(folder), "--session", "mirror", "--out", str(tmp_path / "n"))  # the name the manage page shows
    assert by_name.returncode == 0 and "pulled 2 new annotation versions" in by_name.stdout, by_name.stderr
    assert report(folder, info.session_id).returncode == 0
    named = report(folder, "mirror")
    assert named.returncode == 0 and named.stdout == report(folder, info.session_id).stdout
    assert _tree(folder) == before and not (tmp_path / "y").exists()


def test_a_pull_into_the_source_folder_a_file_or_a_set_with_an_unreadable_state_is_refused_in_one_sentence(tmp_path):
    """--out inside the folder pulled from (its catalog took the pulled TIFFs for images to annotate), --out a file,
    and a pull_state.json that is not JSON (both said only `pull failed: [Errno 17] ...` or a bare JSON error): each
    is refused in a sentence naming the path, and writes nothing."""
    from colabel.apps.provider.provider import DataProvider

    folder = make_image_folder(tmp_path / "images")
    provider, info, ids, (a, _) = _session(folder)
    provider.save_annotation(info, ids["ihc_ki67.png"], a.annotator_id, collection(square(10, 10, 20)))
    before = _tree(folder)
    for inside in (folder / "pulled", folder):
        refused = pull(str(folder), "--session", info.session_id, "--out", str(inside))
        assert refused.returncode == 2 and refused.stderr == (
            f"colabel: {inside} is inside {folder}, the folder pulled from: its TIFFs would become images of that "
            "folder; pull into a folder outside it\n")
    assert _tree(folder) == before
    assert sorted(r.name for r in DataProvider(folder, read_only=True).catalog.records()) == [
        "broken.png", "dsb2018_nuclei.tif", "ihc_ki67.png", "sub/he_histo.jpg"]

    (tmp_path / "a-file").write_text("not a folder")
    refused = pull(str(folder), "--session", info.session_id, "--out", str(tmp_path / "a-file"))
    assert refused.returncode == 2 and refused.stderr == (
        f"colabel: {tmp_path / 'a-file'} is not a folder: pull into a new folder, or one an earlier pull wrote\n")

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "pull_state.json").write_text("{not json")
    refused = pull(str(folder), "--session", info.session_id, "--out", str(broken))
    assert refused.returncode == 2 and refused.stderr.startswith(
        f"colabel: {broken / 'pull_state.json'} cannot be read as the record of an earlier pull: ")
    assert refused.stderr.endswith("; pull into another --out\n") and len(refused.stderr.splitlines()) == 1
    assert sorted(p.name for p in broken.iterdir()) == ["pull_state.json"]


def test_a_pull_fetches_labels_drawn_again_after_the_annotators_versions_were_deleted(tmp_path):
    """A's labels of the IHC image are pulled, then deleted from the folder by hand, and A draws again: the new save
    is version 2 (numbers are never given out again) and the pull fetches it. A source whose numbers did restart (a
    folder whose version marks are gone too, as one saved by an earlier colabel) is pulled right all the same: the
    pull tells saves apart by their label files. A pull_state.json without them (an earlier colabel's) has every
    annotation fetched again once."""
    import zarr

    from colabel.apps.provider.provider import DataProvider

    folder = make_image_folder(tmp_path / "images")
    provider, info, ids, (a, b) = _session(folder)
    ihc = ids["ihc_ki67.png"]
    provider.save_annotation(info, ihc, a.annotator_id, collection(square(10, 10, 20)))
    provider.save_annotation(info, ihc, b.annotator_id, collection(square(11, 10, 20)))
    out, args = tmp_path / "pulled", (str(folder), "--session", info.session_id, "--out", str(tmp_path / "pulled"))
    assert "pulled 2 new annotation versions (0 up to date)" in pull(*args).stdout
    session_dir = folder / "annotations" / "sessions" / info.session_id
    annotator_dir = session_dir / "images" / ihc / a.annotator_id

    def pulled_a():
        """A's pixels in labels.zarr, A's rows of cells.csv, and the image's F1 in agreement.json."""
        mask = zarr.open_group(str(out / "labels.zarr"), mode="r")[f"instances/{ihc}/{a.annotator_id}"][...]
        with open(out / "cells.csv") as handle:
            rows = [r for r in csv.DictReader(handle) if r["annotator_id"] == a.annotator_id]
        f1 = json.loads((out / "agreement.json").read_text())[ihc]["pairs"][0]["f1"]
        return int((mask > 0).sum()), len(rows), f1

    shutil.rmtree(annotator_dir)
    record = DataProvider(folder).save_annotation(info, ihc, a.annotator_id,
                                                  collection(square(100, 100, 50), square(200, 200, 30)))
    assert record.version == 2
    second = pull(*args)
    assert "pulled 1 new annotation versions (1 up to date)" in second.stdout, second.stdout + second.stderr
    assert pulled_a() == (50 * 50 + 30 * 30, 2, 0.0)

    shutil.rmtree(annotator_dir)
    shutil.rmtree(session_dir / "version_marks")
    restarted = DataProvider(folder)
    restarted.save_annotation(info, ihc, a.annotator_id, collection(square(300, 300, 10)))
    record = restarted.save_annotation(info, ihc, a.annotator_id, collection(square(10, 10, 20)))
    assert record.version == 2  # numbers restarted (no version mark): the version the set holds, of another save
    third = pull(*args)
    assert "pulled 1 new annotation versions (1 up to date)" in third.stdout, third.stdout + third.stderr
    assert pulled_a() == (400, 1, pytest.approx(1.0))

    state = json.loads((out / "pull_state.json").read_text())
    del state["saves"]
    (out / "pull_state.json").write_text(json.dumps(state))
    assert "pulled 2 new annotation versions (0 up to date)" in pull(*args).stdout
    assert "pulled 0 new annotation versions (2 up to date)" in pull(*args).stdout


def _coco_agrees_with_its_images(out):
    """Every COCO annotation's RLE covers its image exactly and its bbox lies inside the image."""
    coco = json.loads((out / "coco.json").read_text())
    sizes = {i["id"]: (i["height"], i["width"]) for i in coco["images"]}
    for annotation in coco["annotations"]:
        height, width = sizes[annotation["image_id"]]
        assert annotation["segmentation"]["size"] == [height, width]
        assert sum(annotation["segmentation"]["counts"]) == height * width
        x, y, w, h = annotation["bbox"]
        assert 0 <= x and 0 <= y and x + w <= width and y + h <= height
    return coco


def test_labels_drawn_on_an_image_since_replaced_by_one_of_another_size_are_dropped_naming_both_sizes(tmp_path):
    """A and B labelled the IHC image (512 x 512), A the DSB one too; the IHC file is then replaced by a 256 x 200
    crop. The pull drops both annotators' IHC labels, saying so with both sizes, and the image with them; what it
    writes (zarr, TIFFs, cells, COCO) is consistent. Once B draws on the new image, B's labels are back and A's
    stay out; a first pull into a new set does the same."""
    import zarr
    from PIL import Image

    from colabel.apps.provider.provider import DataProvider

    folder = make_image_folder(tmp_path / "images")
    provider, info, ids, (a, b) = _session(folder)
    ihc, dsb = ids["ihc_ki67.png"], ids["dsb2018_nuclei.tif"]
    provider.save_annotation(info, ihc, a.annotator_id, collection(square(10, 10, 20), square(300, 300, 40)))
    provider.save_annotation(info, ihc, b.annotator_id, collection(square(11, 10, 20)))
    provider.save_annotation(info, dsb, a.annotator_id, collection(square(10, 10, 20)))
    out, args = tmp_path / "pulled", (str(folder), "--session", info.session_id, "--out", str(tmp_path / "pulled"))
    assert "pulled 3 new annotation versions" in pull(*args).stdout
    Image.open(folder / "ihc_ki67.png").crop((0, 0, 256, 200)).save(folder / "ihc_ki67.png")

    def line(who):
        return (f"dropped the labels of annotator {who.display_name} ({who.annotator_id}) on ihc_ki67.png: they were "
                "drawn on an image 512 pixels wide and 512 high, and the file is now 256 pixels wide and 200 high")

    second = pull(*args)
    assert second.returncode == 0, second.stderr
    assert [x for x in second.stdout.splitlines() if x.startswith("dropped")] == [
        line(who) for who in sorted((a, b), key=lambda who: who.annotator_id)]  # annotators in id order
    root = zarr.open_group(str(out / "labels.zarr"), mode="r")
    assert list(root["images"].array_keys()) == [dsb] and list(root["instances"].group_keys()) == [dsb]
    assert not list(root["consensus"].array_keys())
    assert sorted(_files(out / "tiff")) == ["dsb2018_nuclei.tif.tif", f"dsb2018_nuclei.tif__{a.annotator_id}_mask.tif"]
    assert [i["colabel_image_id"] for i in _coco_agrees_with_its_images(out)["images"]] == [dsb]
    with open(out / "cells.csv") as handle:
        assert {r["image_id"] for r in csv.DictReader(handle)} == {dsb}

    DataProvider(folder).save_annotation(info, ihc, b.annotator_id, collection(square(5, 5, 30)))
    third = pull(*args)
    assert [x for x in third.stdout.splitlines() if x.startswith("dropped")] == [line(a)], third.stdout
    root = zarr.open_group(str(out / "labels.zarr"), mode="r")
    assert root[f"images/{ihc}"].shape == (200, 256, 3)
    assert list(root[f"instances/{ihc}"].array_keys()) == [b.annotator_id]
    assert root[f"instances/{ihc}/{b.annotator_id}"].shape == (200, 256) and not list(root["consensus"].array_keys())
    coco = _coco_agrees_with_its_images(out)
    assert sorted(i["colabel_image_id"] for i in coco["images"]) == sorted([ihc, dsb]) and len(coco["annotations"]) == 2

    fresh = pull(str(folder), "--session", info.session_id, "--out", str(tmp_path / "fresh"))
    assert [x for x in fresh.stdout.splitlines() if x.startswith("dropped")] == [line(a)]
    assert "pulled 2 new annotation versions" in fresh.stdout
    _coco_agrees_with_its_images(tmp_path / "fresh")


def test_report_leaves_out_labels_drawn_on_an_image_since_replaced_by_one_of_another_size(tmp_path):
    """A labelled the IHC image (512 x 512); its file is then replaced by a 256 x 200 crop, which B and C label. The
    report (which refused the whole session before: masks of different shapes) gives the agreement of B and C on it
    and says A's labels are left out, naming both sizes."""
    from PIL import Image

    from colabel.apps.provider.provider import DataProvider
    from colabel.apps.report import session_report

    folder = make_image_folder(tmp_path / "images")
    provider, info, ids, (a, b, c) = _session(folder, names=("A", "B", "C"))
    ihc = ids["ihc_ki67.png"]
    provider.save_annotation(info, ihc, a.annotator_id, collection(square(10, 10, 20)))
    Image.open(folder / "ihc_ki67.png").crop((0, 0, 256, 200)).save(folder / "ihc_ki67.png")
    provider = DataProvider(folder)
    provider.save_annotation(info, ihc, b.annotator_id, collection(square(10, 10, 20), square(100, 100, 20)))
    provider.save_annotation(info, ihc, c.annotator_id, collection(square(10, 10, 20)))

    agreement = session_report(folder, info.session_id)["agreement"]
    assert agreement["left_out"] == [{"image_id": ihc, "annotator_id": a.annotator_id, "shape": [512, 512],
                                      "latest_shape": [200, 256]}]
    assert agreement["images"][ihc]["annotators"] == sorted([b.annotator_id, c.annotator_id])
    assert agreement["images"][ihc]["pairs"][0]["f1"] == pytest.approx(2 / 3)
    printed = report(folder, info.session_id)
    assert printed.returncode == 0, printed.stderr
    assert (f"left out of the agreement on ihc_ki67.png: the labels of A ({a.annotator_id}): they were drawn on an "
            "image 512 pixels wide and 512 high, the image's latest save on one 256 pixels wide and 200 high (its "
            "file was replaced)") in printed.stdout


def test_a_pull_that_fails_while_switching_zarr_format_leaves_the_previous_set_as_it_was(tmp_path, monkeypatch):
    """A pull asking for zarr format 2 fails (the connection drops while images, or labels, are fetched): the set's
    format 3 labels.zarr and pull_state.json are exactly as before, no temporary store is left, and the set still
    trains. A later switch succeeds."""
    from colabel.apps import pull as pulling
    from colabel.apps.pull import LocalSource, labelled_pairs, run_pull

    folder = make_image_folder(tmp_path / "images")
    provider, info, ids, (a, _) = _session(folder)
    for name in ("ihc_ki67.png", "dsb2018_nuclei.tif"):
        provider.save_annotation(info, ids[name], a.annotator_id, collection(square(10, 10, 20)))
    out = tmp_path / "pulled"
    run_pull(str(folder), out, session=info.session_id, echo=None)
    before, state = _files(out / "labels.zarr"), (out / "pull_state.json").read_bytes()
    pairs = labelled_pairs(out)

    class LostWhileImages(LocalSource):
        async def image(self, image_id):
            raise ConnectionError("connection lost")

    class LostWhileLabels(LocalSource):
        async def labels(self, image_id, annotator_id, version):
            raise ConnectionError("connection lost")

    for flaky in (LostWhileImages, LostWhileLabels):
        with pytest.raises(ConnectionError):
            asyncio.run(pulling.pull(flaky(folder, info.session_id), out, zarr_format=2, progress=False))
        assert _files(out / "labels.zarr") == before and (out / "pull_state.json").read_bytes() == state
        assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
        assert [(i, m.sum()) for i, _, m in labelled_pairs(out)] == [(i, m.sum()) for i, _, m in pairs]

    result = run_pull(str(folder), out, session=info.session_id, echo=None, zarr_format=2)
    assert result["dropped"] == ["dropped labels.zarr in zarr format 3: rewriting it in format 2"]
    assert (out / "labels.zarr" / ".zgroup").is_file() and not (out / "labels.zarr" / "zarr.json").exists()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    assert [(i, m.sum()) for i, _, m in labelled_pairs(out)] == [(i, m.sum()) for i, _, m in pairs]


def test_training_on_a_set_without_instance_masks_is_refused_in_one_sentence(tmp_path):
    """A session pulled before anything was labelled has a labels.zarr without an instances group: labelled_pairs and
    `colabel train` say so in one sentence."""
    import zarr

    from colabel.apps.pull import labelled_pairs
    from colabel.errors import InvalidInputError

    folder = make_image_folder(tmp_path / "images")
    _, info, _, _ = _session(folder)
    out = tmp_path / "pulled"
    done = pull(str(folder), "--session", info.session_id, "--out", str(out))
    assert done.returncode == 0 and "pulled 0 new annotation versions" in done.stdout, done.stderr
    assert "instances" not in zarr.open_group(str(out / "labels.zarr"), mode="r")
    message = f"{out} holds no labelled images (its labels.zarr has no instances group)"
    with pytest.raises(InvalidInputError, match=re.escape(message)):
        labelled_pairs(out)
    train = subprocess.run([*COLABEL, "train", str(out), "--out", str(tmp_path / "m.pt")], capture_output=True,
                           text=True, timeout=300)
    assert train.returncode == 2 and train.stderr.startswith(f"colabel: {message}"), train.stderr
    assert len(train.stderr.strip().splitlines()) == 1 and not (tmp_path / "m.pt").exists()


def test_classifier_cells_of_a_set_missing_an_instance_mask_are_refused_naming_it(tmp_path):
    """A pulled set damaged by hand (cells.csv names a mask labels.zarr lacks) is refused, not taken for cells
    covered by later outlines."""
    import zarr

    from colabel.errors import InvalidInputError
    from colabel.services.training.classifier_training import read_pulled_cells

    _, _, image_id, a, _, out = _two_annotators_class_three_squares(tmp_path)
    del zarr.open_group(str(out / "labels.zarr"), mode="a")[f"instances/{image_id}/{a.annotator_id}"]
    with pytest.raises(InvalidInputError, match=f"labels.zarr has no instances/{image_id}/{a.annotator_id}"):
        read_pulled_cells(out, annotator=a.annotator_id)


def test_training_pairs_take_the_consensus_alone_when_asked_and_pull_refuses_options_of_the_other_source(tmp_path):
    """`colabel train --annotator consensus` (as `train-classifier` takes it): the consensus masks of the images that
    have one, not the first annotator's masks of the others; `--session` with a trainer URL, or `--token` with a
    folder, is refused in one sentence (it was ignored)."""
    from colabel.apps.pull import labelled_pairs

    folder = make_image_folder(tmp_path / "images")
    provider, info, ids, (a, b) = _session(folder)
    ihc, dsb = ids["ihc_ki67.png"], ids["dsb2018_nuclei.tif"]
    provider.save_annotation(info, ihc, a.annotator_id, collection(square(10, 10, 12), square(40, 40, 9)))
    provider.save_annotation(info, ihc, b.annotator_id, collection(square(11, 10, 12)))
    provider.save_annotation(info, dsb, a.annotator_id, collection(square(5, 5, 8)))
    out = tmp_path / "pulled"
    assert pull(str(folder), "--session", info.session_id, "--out", str(out)).returncode == 0

    by_default = {image_id: mask for image_id, _, mask in labelled_pairs(out)}
    assert sorted(by_default) == sorted([ihc, dsb]) and by_default[ihc].max() == 1  # ihc: the square both drew
    ((only, _, mask),) = labelled_pairs(out, "consensus")
    assert only == ihc
    np.testing.assert_array_equal(mask, by_default[ihc])
    assert [i for i, _, _ in labelled_pairs(out, a.annotator_id)] == sorted([ihc, dsb])
    assert labelled_pairs(out, a.annotator_id)[sorted([ihc, dsb]).index(ihc)][2].max() == 2  # A's own two squares

    for args, message in ((["http://127.0.0.1:9/ws/apps/colabel-web/#trainer=T", "--session", info.session_id],
                           "--session is for a local folder"),
                          ([str(folder), "--session", info.session_id, "--token", "T"],
                           "--token is for a trainer URL")):
        refused = pull(*args, "--out", str(tmp_path / "other"))
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1 and not (tmp_path / "other").exists()


def test_a_finished_only_pull_holds_the_labels_of_finished_images_alone_and_their_consensus(tmp_path):
    """An annotator who left an image midway (saved, never finished) stays out of a `--finished-only` set and its
    consensus; a plain pull holds everyone and says in `cells.csv` and `annotators.csv` who finished what."""
    import zarr

    from colabel.apps.pull import run_pull

    folder = make_image_folder(tmp_path / "images")
    provider, info, ids, (ada, bob, cy) = _session(folder, names=("Ada", "Bob", "Cy"))
    ihc, dsb = ids["ihc_ki67.png"], ids["dsb2018_nuclei.tif"]
    provider.save_annotation(info, dsb, ada.annotator_id, collection(square(10, 10, 20), square(60, 60, 20)))
    provider.save_annotation(info, dsb, bob.annotator_id, collection(square(11, 10, 20), square(61, 60, 20)))
    provider.save_annotation(info, dsb, cy.annotator_id, collection(square(10, 10, 20)))  # left midway
    provider.save_annotation(info, ihc, ada.annotator_id, collection(square(5, 5, 9)))  # still drawing
    for annotator in (ada, bob):
        provider.finish_image(info, dsb, annotator.annotator_id)

    every = tmp_path / "every"
    run_pull(str(folder), every, session=info.session_id, echo=None)
    with open(every / "cells.csv") as handle:
        finished = {(r["image_id"], r["annotator_id"], r["finished"]) for r in csv.DictReader(handle)}
    assert finished == {(dsb, ada.annotator_id, "True"), (dsb, bob.annotator_id, "True"),
                        (dsb, cy.annotator_id, "False"), (ihc, ada.annotator_id, "False")}
    with open(every / "annotators.csv") as handle:
        people = {r["display_name"]: (r["images"], r["finished"]) for r in csv.DictReader(handle)}
    assert people == {"Ada": ("2", "1"), "Bob": ("1", "1"), "Cy": ("1", "0")}
    root = zarr.open_group(str(every / "labels.zarr"), mode="r")
    assert root[f"consensus/{dsb}"][...].max() == 2  # 3 annotators: both squares have a majority

    done = tmp_path / "finished"
    printed = pull(str(folder), "--session", info.session_id, "--out", str(done), "--finished-only")
    assert printed.returncode == 0, printed.stderr
    assert "pulled 2 new annotation versions (0 up to date) of 1 images" in printed.stdout
    assert ("--finished-only: left out 2 annotators' labels not finished (work in progress, left midway or "
            "returned for changes); pulled 0 at the version finished, not the change saved since"
            ) in printed.stdout  # Cy's and Ada's PNG
    root = zarr.open_group(str(done / "labels.zarr"), mode="r")
    assert list(root["images"].array_keys()) == [dsb]
    assert sorted(root[f"instances/{dsb}"].array_keys()) == sorted([ada.annotator_id, bob.annotator_id])
    assert root[f"consensus/{dsb}"][...].max() == 2 and root[f"consensus/{dsb}"].attrs["annotators"] == sorted(
        [ada.annotator_id, bob.annotator_id])
    with open(done / "annotators.csv") as handle:
        assert sorted(r["display_name"] for r in csv.DictReader(handle)) == ["Ada", "Bob"]

    provider.finish_image(info, dsb, cy.annotator_id)  # Cy says the one square is all there is
    provider.save_annotation(info, dsb, ada.annotator_id, collection(square(100, 100, 20)))  # Ada redraws, unfinished
    again = run_pull(str(folder), done, session=info.session_id, echo=None, finished_only=True)
    assert (again["pulled"], again["skipped"], again["unfinished"], again["corrected"]) == (1, 2, 1, 1)
    root = zarr.open_group(str(done / "labels.zarr"), mode="r")
    assert len(root[f"consensus/{dsb}"].attrs["annotators"]) == 3 and root[f"consensus/{dsb}"][...].max() == 2
    with open(done / "cells.csv") as handle:  # Ada's finished version 1, not the correction (version 2)
        assert {(r["annotator_id"], r["version"], r["finished"]) for r in csv.DictReader(handle)
                if r["annotator_id"] == ada.annotator_id} == {(ada.annotator_id, "1", "True")}
    run_pull(str(folder), every, session=info.session_id, echo=None)  # a plain pull: the correction, unfinished
    with open(every / "cells.csv") as handle:
        assert {(r["version"], r["finished"]) for r in csv.DictReader(handle)
                if (r["image_id"], r["annotator_id"]) == (dsb, ada.annotator_id)} == {("2", "False")}

    provider.return_image(info, dsb, bob.annotator_id, "split the touching pair")  # the provider sends it back
    lines: list[str] = []
    run_pull(str(folder), done, session=info.session_id, echo=lines.append, finished_only=True)
    assert lines == [f"dropped the labels of annotator Bob ({bob.annotator_id}) on dsb2018_nuclei.tif: returned to "
                     "them for changes"]
    root = zarr.open_group(str(done / "labels.zarr"), mode="r")
    assert sorted(root[f"instances/{dsb}"].array_keys()) == sorted([ada.annotator_id, cy.annotator_id])

    before = _files(done)  # a set is pulled one way: the other way into it is refused, nothing written
    for out, finished_only, held in ((done, False, "finished images only (--finished-only): pull without"),
                                     (every, True, "every saved annotation: pull with")):
        with pytest.raises(Exception, match=re.escape(f"{out} holds a pull of {held} --finished-only into another "
                                                      "--out")):
            run_pull(str(folder), out, session=info.session_id, echo=None, finished_only=finished_only)
    assert _files(done) == before
