"""Pre-annotations in the browser: a provider started with a trained segmenter's proposals; the annotator opens
an unsaved image, sees the proposals, deletes one and classifies another, and the saved version holds exactly
the corrected set (real Hypha server, real provider services, headless Chromium; see web_support)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import pytest_asyncio
import tifffile
from web_support import CLASSES, browser, join, page, pixel_of, screenshot  # noqa: F401 - fixtures

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]


@pytest_asyncio.fixture(loop_scope="session")
async def preannotate_stack(hypha_server, tmp_path, tiny_segmenter):
    """A provider registered with a PreAnnotator over the tiny model (what `colabel serve --preannotate` does)."""
    async for stack in _stack(hypha_server, tmp_path, tiny_segmenter):
        yield stack


@pytest_asyncio.fixture(loop_scope="session")
async def ensemble_stack(hypha_server, tmp_path, tiny_ensemble):
    async for stack in _stack(hypha_server, tmp_path, tiny_ensemble):
        yield stack


async def _stack(hypha_server, tmp_path, model_path):
    import secrets

    from hypha_rpc import connect_to_server

    from colabel.apps.provider.preannotate import PreAnnotator
    from colabel.apps.provider.provider import DataProvider
    from colabel.apps.provider.rpc import ProviderServices
    from conftest import make_image_folder

    server = await connect_to_server({"server_url": hypha_server.url, "token": hypha_server.root_token})
    provider = DataProvider(make_image_folder(tmp_path / "images"))
    preannotator = PreAnnotator(provider, model_path)
    services = ProviderServices(provider, server, name=f"p{secrets.token_hex(3)}", public_url=hypha_server.url,
                                preannotator=preannotator)
    await services.register()
    yield provider, services, preannotator
    await server.disconnect()


def _inside(feature: dict) -> tuple[float, float]:
    from shapely.geometry import shape

    point = shape(feature["geometry"]).representative_point()
    return point.x, point.y


async def _click_image(page, x: float, y: float) -> None:
    px, py = await pixel_of(page, x, y)
    await page.mouse.click(px, py)


async def _join_and_wait(page, share_url: str, name: str) -> None:
    """Open the share link, join under ``name`` and wait for the first image's pre-annotations."""
    await join(page, share_url, name, timeout=60_000)
    await page.wait_for_function("document.getElementById('save-status').textContent.includes('pre-annotations')")

async def test_annotator_corrects_preannotations_and_saves_the_corrected_set(preannotate_stack, page, tmp_path):
    provider, services, preannotator = preannotate_stack
    dsb = next(im.image_id for im in provider.list_images() if im.name == "dsb2018_nuclei.tif")
    session, secret = provider.create_session(name="pre", classes=CLASSES, image_ids=[dsb])
    proposed = (await preannotator.pre_annotation(session, dsb))["features"]  # what the page will be sent
    assert len(proposed) >= 20, "the trained model should propose most of the 125 nuclei"
    assert not any("colabel_uncertainty" in f["properties"] for f in proposed)  # one network: no spread
    image_dir = tmp_path / "images" / "annotations" / "sessions" / session.session_id / "images" / dsb

    await _join_and_wait(page, services.share_url(secret), "Pre Annotator")
    assert await page.text_content("#save-status") == (
        f"{len(proposed)} pre-annotations: correct them, or Next image keeps them")
    assert await page.evaluate("window.colabel.source.getFeatures().length") == len(proposed)
    assert not list(image_dir.glob("*/*.geojson")), "proposals must not be stored before the annotator saves"
    await screenshot(page, tmp_path, "preannotate-proposed")

    # delete the largest proposal: the first save holds all the others
    from shapely.geometry import shape

    doomed = max(proposed, key=lambda f: shape(f["geometry"]).area)
    await page.keyboard.press("e")
    await _click_image(page, *_inside(doomed))
    await page.wait_for_function("window.colabel.select.getFeatures().getLength() === 1")
    await page.keyboard.press("Delete")
    await page.wait_for_function("document.getElementById('save-status').textContent === 'saved v1'",
                                 timeout=15_000)
    (annotator_dir,) = image_dir.iterdir()
    first = json.loads((annotator_dir / "v000001.geojson").read_text())["features"]
    assert len(first) == len(proposed) - 1
    # the model's outlines carry no class: they take the current one (the session's first class)
    assert {f["properties"]["classification"]["name"] for f in first} == {CLASSES[0]["name"]}
    x, y = _inside(doomed)
    labels = tifffile.imread(next(annotator_dir.glob("v000001-*.tif")))
    assert labels[int(y), int(x)] == 0  # the deleted outline is gone from the label image too

    # classify another proposal as "other": the second save holds it with that class
    kept = next(f for f in proposed if f is not doomed and np.hypot(*np.subtract(_inside(f), (x, y))) > 20)
    await _click_image(page, *_inside(kept))
    await page.wait_for_function("window.colabel.select.getFeatures().getLength() === 1")
    await page.keyboard.press("2")
    await page.wait_for_function("document.getElementById('save-status').textContent === 'saved v2'",
                                 timeout=15_000)
    await screenshot(page, tmp_path, "preannotate-corrected")
    second = json.loads((annotator_dir / "v000002.geojson").read_text())["features"]
    assert len(second) == len(proposed) - 1
    classified = [f for f in second if (f["properties"].get("classification") or {}).get("name") == "other"]
    assert len(classified) == 1 and CLASSES[1]["name"] == "other"
    kx, ky = _inside(kept)
    labels = tifffile.imread(next(annotator_dir.glob("v000002-*.tif")))
    assert labels[int(ky), int(kx)] > 0
    assert all(f["properties"]["objectType"] == "annotation" for f in second)  # a human's, once saved

    # reopening the image shows the saved set, not the proposals again
    await page.reload()
    await page.wait_for_selector("body[data-state=ready]", timeout=60_000)
    assert await page.text_content("#save-status") == "saved v2"
    assert await page.evaluate("window.colabel.source.getFeatures().length") == len(proposed) - 1


async def test_moving_on_without_a_change_keeps_every_proposal_as_the_annotators_version(preannotate_stack, page,
                                                                                        tmp_path):
    from shapely.geometry import shape

    provider, services, preannotator = preannotate_stack
    ids = {im.name: im.image_id for im in provider.list_images()}
    dsb, he = ids["dsb2018_nuclei.tif"], ids["sub/he_histo.jpg"]
    session, secret = provider.create_session(name="accept", classes=CLASSES, image_ids=[dsb, he])
    proposed = (await preannotator.pre_annotation(session, dsb))["features"]

    await _join_and_wait(page, services.share_url(secret), "Quick Annotator")
    assert await page.evaluate("window.colabel.state.image.image_id") == dsb
    image_dir = tmp_path / "images" / "annotations" / "sessions" / session.session_id / "images" / dsb
    assert not list(image_dir.glob("*/*.geojson"))
    await page.click("#next-image")
    await page.wait_for_function(f"window.colabel.state.image?.image_id === '{he}'", timeout=30_000)

    (annotator_dir,) = image_dir.iterdir()
    (version,) = annotator_dir.glob("*.geojson")
    saved = json.loads(version.read_text())["features"]
    assert len(saved) == len(proposed) and all(f["properties"]["objectType"] == "annotation" for f in saved)
    areas = sorted(shape(f["geometry"]).area for f in saved)
    assert areas == pytest.approx(sorted(shape(f["geometry"]).area for f in proposed), abs=1.0)


async def test_proposals_the_ensemble_disagrees_on_are_dashed_until_the_annotator_classifies_them(ensemble_stack,
                                                                                                   page):
    provider, services, preannotator = ensemble_stack
    dsb = next(im.image_id for im in provider.list_images() if im.name == "dsb2018_nuclei.tif")
    session, secret = provider.create_session(name="unsure", classes=CLASSES, image_ids=[dsb])
    proposed = (await preannotator.pre_annotation(session, dsb))["features"]
    spread = [f["properties"]["colabel_uncertainty"] for f in proposed]
    assert len(spread) == len(proposed) and all(0 <= u <= 0.5 for u in spread)
    review = [f for f in proposed if f["properties"].get("colabel_review")]
    assert [f for f in proposed if f["properties"]["colabel_uncertainty"] >= 0.03] == review
    assert 0 < len(review) < len(proposed), "a two-network tiny ensemble disagrees on some outlines, not all"

    await _join_and_wait(page, services.share_url(secret), "Careful Annotator")
    assert await page.text_content("#save-status") == (
        f"{len(proposed)} pre-annotations ({len(review)} dashed: the models disagree, check them first): "
        "correct them, or Next image keeps them")
    dashed = """() => window.colabel.source.getFeatures().filter((f) => {
        const stroke = window.colabel.styleOf(f).getStroke();
        return Boolean(f.get("review")) && (stroke.getLineDash() || []).length > 0;
      }).length"""
    assert await page.evaluate(dashed) == len(review)

    # classifying one of them is checking it: it is drawn solid from then on
    await page.keyboard.press("e")
    await _click_image(page, *_inside(review[0]))
    await page.wait_for_function("window.colabel.select.getFeatures().getLength() === 1")
    await page.keyboard.press("2")
    await page.wait_for_function("document.getElementById('save-status').textContent === 'saved v1'",
                                 timeout=15_000)
    assert await page.evaluate(dashed) == len(review) - 1
