"""The browser pages in a real headless Chromium against a real provider on a real Hypha server
(skipped without the built pages, playwright or Chromium: see web_support)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import pytest_asyncio
import tifffile
from web_support import CLASSES, browser, page, screenshot

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]


def image_id(stack, name: str) -> str:
    return next(im.image_id for im in stack.provider.list_images() if im.name == name)


async def test_annotator_draws_a_polygon_saved_in_image_coordinates(stack, page, tmp_path):
    dsb = image_id(stack, "dsb2018_nuclei.tif")  # 512 x 512 uint16: the percentile display path
    session, secret = stack.provider.create_session(name="web", classes=CLASSES, image_ids=[dsb])
    await page.goto(stack.services.share_url(secret))

    await page.wait_for_selector("#name-dialog[open]")
    await page.fill("#display-name", "Ada Browser")
    await page.click("#join")
    await page.wait_for_selector("body[data-state=ready]", timeout=30_000)
    assert "image 1 of 1" in await page.text_content("#position")
    stored = await page.evaluate("Object.entries(localStorage)")
    assert any(secret in k and "annotator_key" in v for k, v in stored)

    await page.keyboard.press("2")  # class "other"
    # a rectangle far from the image's vertical centre: a missing y flip would put it at rows 362..462
    corners = [(100, 50), (300, 50), (300, 150), (100, 150)]
    for x, y in corners + corners[:1]:
        px, py = await page.evaluate("([x, y]) => window.colabel.pixelOf(x, y)", [x, y])
        await page.mouse.click(px, py)
        await page.wait_for_timeout(150)
    await screenshot(page, tmp_path, "annotate-drawn")
    await page.wait_for_function("document.getElementById('save-status').textContent === 'saved v1'",
                                 timeout=15_000)

    sdir = stack.folder / "annotations" / "sessions" / session.session_id / "images" / dsb
    (geojson_file,) = sdir.glob("a-*/v000001.geojson")
    saved = json.loads(geojson_file.read_text())
    (feature,) = saved["features"]
    assert feature["properties"]["classification"]["name"] == "other"
    ring = np.array(feature["geometry"]["coordinates"][0])
    assert len(ring) == 5
    # one screen pixel is < 1 image pixel at this zoom
    for corner in corners:
        assert np.abs(ring - corner).sum(axis=1).min() < 2.5, (corner, ring.tolist())
    (label_file,) = geojson_file.parent.glob("v000001-*.tif")
    labels = tifffile.imread(label_file)
    assert labels.shape == (512, 512)
    assert labels[100, 200] == 1 and labels[450, 200] == 0 and labels[100, 20] == 0

    # delete it in edit mode: a second version with no features
    await page.keyboard.press("e")
    px, py = await page.evaluate("([x, y]) => window.colabel.pixelOf(x, y)", [200, 100])
    await page.mouse.click(px, py)
    await page.wait_for_function("window.colabel.select.getFeatures().getLength() === 1")
    await page.keyboard.press("Delete")
    await page.wait_for_function("document.getElementById('save-status').textContent === 'saved v2'",
                                 timeout=15_000)
    assert json.loads((geojson_file.parent / "v000002.geojson").read_text())["features"] == []

    await page.click("#next-image")
    await page.wait_for_selector("body[data-state=done]")
    assert "all 1 images done" in await page.text_content("#position")


async def test_annotator_page_reloads_with_the_same_annotator_and_its_polygons(stack, page, tmp_path):
    ihc = image_id(stack, "ihc_ki67.png")
    session, secret = stack.provider.create_session(name="reload", classes=CLASSES, image_ids=[ihc])
    url = stack.services.share_url(secret)
    await page.goto(url)
    await page.wait_for_selector("#name-dialog[open]")
    await page.fill("#display-name", "Bea")
    await page.click("#join")
    await page.wait_for_selector("body[data-state=ready]", timeout=30_000)
    for x, y in [(10, 10), (60, 10), (60, 40), (10, 10)]:
        px, py = await page.evaluate("([x, y]) => window.colabel.pixelOf(x, y)", [x, y])
        await page.mouse.click(px, py)
        await page.wait_for_timeout(150)
    await page.wait_for_function("document.getElementById('save-status').textContent === 'saved v1'")

    await page.reload()
    await page.wait_for_selector("body[data-state=ready]", timeout=30_000)
    assert not await page.is_visible("#name-dialog[open]")
    assert await page.evaluate("window.colabel.source.getFeatures().length") == 1
    assert "saved v1" in await page.text_content("#save-status")
    assert "image 1 of 1" in await page.text_content("#position")
    assert len(stack.provider.sessions.annotators(session.session_id)) == 1
    await screenshot(page, tmp_path, "annotate-reloaded")


async def test_manager_lists_images_and_creates_a_session_with_a_share_url(stack, page, tmp_path):
    await page.goto(stack.services.manage_url(stack.provider_token))
    await page.wait_for_selector("body[data-state=ready]", timeout=30_000)
    rows = await page.locator("#images tbody tr").all_text_contents()
    assert len(rows) == 4
    assert any("dsb2018_nuclei.tif" in r and "512 × 512 × 1" in r and "uint16" in r for r in rows)
    assert any("broken.png" in r and "unreadable" in r for r in rows)

    await page.fill("#session-name", "from the browser")
    await page.fill("#session-classes", "tumour:#ff0000, stroma")
    await page.fill("#session-per-image", "2")
    await page.click("#create-session")
    card = page.locator(".session", has_text="from the browser")
    await card.wait_for(timeout=15_000)
    share = await card.locator("input.share-url").first.input_value()
    assert "/annotate.html#token=" in share
    await screenshot(page, tmp_path, "manage-created")

    (created,) = [s for s in stack.provider.sessions.list() if s.name == "from the browser"]
    assert [(c.name, c.color) for c in created.classes] == [("tumour", "#ff0000"), ("stroma", "#3cb44b")]
    assert created.annotators_per_image == 2 and created.mode == "segmentation"

    # the share link shown works: an annotator can open it
    await card.locator("button.close").click()
    await page.locator(".session.closed", has_text="from the browser").wait_for()

    # the share link shown opens the annotator page, which refuses to join a closed session
    await page.goto(share)
    await page.wait_for_selector("#name-dialog[open]")
    await page.fill("#display-name", "Late")
    await page.click("#join")
    await page.wait_for_function("document.getElementById('name-error').textContent.includes('is closed')")


@pytest_asyncio.fixture(loop_scope="session")
async def sam_stack(hypha_server, tmp_path):
    """A provider whose annotator service has the AI functions, backed by a tiny random-weight SAM in process."""
    pytest.importorskip("torch")
    import secrets

    from hypha_rpc import connect_to_server
    from sam_fixtures import TINY_ID, build_tiny

    from colabel.apps.provider.assist import ModelAssist
    from colabel.apps.provider.provider import DataProvider
    from colabel.apps.provider.rpc import ProviderServices
    from colabel.services.gateway import LocalBackend, register_model_services
    from colabel.services.sam.registry import save_checkpoint
    from colabel.services.sam.service import SamService
    from conftest import make_image_folder

    checkpoint = str(save_checkpoint(build_tiny(), tmp_path / "tiny.pt"))
    sam = SamService(default_model=TINY_ID, checkpoints={TINY_ID: checkpoint}, embedding_dir=str(tmp_path / "emb"),
                     tile_size=256)
    name = f"w{secrets.token_hex(3)}"
    server = await connect_to_server({"server_url": hypha_server.url, "token": hypha_server.root_token})
    ids = await register_model_services(server, {"sam": LocalBackend("sam", sam)}, prefix=name)
    provider = DataProvider(make_image_folder(tmp_path / "images"))
    services = ProviderServices(provider, server, name=name, public_url=hypha_server.url,
                                assist=ModelAssist(provider, server, ids, sam_model=TINY_ID))
    await services.register()
    yield provider, services
    await server.disconnect()


async def test_sam_click_adds_a_classified_feature_and_saves(sam_stack, page, tmp_path):
    provider, services = sam_stack
    ihc = next(im.image_id for im in provider.list_images() if im.name == "ihc_ki67.png")
    session, secret = provider.create_session(name="sam", classes=CLASSES, image_ids=[ihc])
    await page.goto(services.share_url(secret))
    await page.wait_for_selector("#name-dialog[open]")
    await page.fill("#display-name", "Sam User")
    await page.click("#join")
    await page.wait_for_selector("body[data-state=ready]", timeout=30_000)
    assert await page.is_visible("#tool-sam")
    await page.keyboard.press("s")
    await page.keyboard.press("2")
    px, py = await page.evaluate("([x, y]) => window.colabel.pixelOf(x, y)", [256, 100])
    await page.mouse.click(px, py)
    await page.wait_for_function("document.getElementById('save-status').textContent === 'saved v1'",
                                 timeout=60_000)
    await screenshot(page, tmp_path, "annotate-sam")
    (geojson_file,) = (tmp_path / "images").glob(
        f"annotations/sessions/{session.session_id}/images/{ihc}/a-*/v000001.geojson")
    features = json.loads(geojson_file.read_text())["features"]
    # random weights: the mask may be empty, but anything found is one feature of the chosen class
    assert len(features) <= 1
    assert all(f["properties"]["classification"]["name"] == "other" for f in features)
    assert await page.evaluate("window.colabel.source.getFeatures().length") == len(features)
