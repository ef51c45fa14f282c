"""The browser pages in a real headless Chromium against a real provider on a real Hypha server
(skipped without the built pages, playwright or Chromium: see web_support)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import pytest_asyncio
import tifffile
from web_support import CLASSES, browser, join, new_page, page, pixel_of, sam_provider, screenshot

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
    # the browser keeps the annotator's key for this link, but no other page of the origin finds the share token
    # there (without it the key opens nothing), nor the key in a storage key's name
    ((key, value),) = [(k, v) for k, v in stored if "annotator_key" in v]
    key_of_annotator = json.loads(value)["annotator_key"]
    assert all(secret not in k and secret not in v and key_of_annotator not in k for k, v in stored), stored

    await page.keyboard.press("2")  # class "other"
    # a rectangle far from the image's vertical centre: a missing y flip would put it at rows 362..462
    corners = [(100, 50), (300, 50), (300, 150), (100, 150)]
    for x, y in corners + corners[:1]:
        px, py = await pixel_of(page, x, y)
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
    px, py = await pixel_of(page, 200, 100)
    await page.mouse.click(px, py)
    await page.wait_for_function("window.colabel.select.getFeatures().getLength() === 1")
    await page.keyboard.press("Delete")
    await page.wait_for_function("document.getElementById('save-status').textContent === 'saved v2'",
                                 timeout=15_000)
    assert json.loads((geojson_file.parent / "v000002.geojson").read_text())["features"] == []
    assert stack.provider.store.finished(session.session_id) == {}  # drawing: not finished yet

    await page.click("#next-image")  # going on finishes the image, at its latest version
    await page.wait_for_selector("body[data-state=done]")
    assert "all 1 images done" in await page.text_content("#position")
    ((annotator, mark),) = stack.provider.store.finished(session.session_id)[dsb].items()
    assert annotator == geojson_file.parent.name and mark["version"] == 2
    assert stack.provider.progress(session).images_finished == 1


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
        px, py = await pixel_of(page, x, y)
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
    # the class without a colour gets the palette's (Okabe-Ito) colour
    assert [(c.name, c.color) for c in created.classes] == [("tumour", "#ff0000"), ("stroma", "#56b4e9")]
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
    from sam_fixtures import TINY_ID, build_tiny

    from colabel.services.sam.registry import save_checkpoint
    from colabel.services.sam.service import SamService

    checkpoint = str(save_checkpoint(build_tiny(), tmp_path / "tiny.pt"))
    # one tile for the test images (<= 512 px): the server decodes the same whole-image embedding as the browser
    sam = SamService(default_model=TINY_ID, checkpoints={TINY_ID: checkpoint}, embedding_dir=str(tmp_path / "emb"),
                     tile_size=512)
    async for stack in sam_provider(hypha_server, tmp_path, sam, TINY_ID, "w"):
        yield stack


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
    px, py = await pixel_of(page, 256, 100)
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


# -- helpers of the annotator-page tests -----------------------------------------------------------------------


async def at(page, x: float, y: float) -> tuple[float, float]:
    """The viewport pixel of image pixel (x, y) (rows down)."""
    return await pixel_of(page, x, y)


async def click_at(page, x: float, y: float, pause: int = 150, **kwargs) -> None:
    px, py = await at(page, x, y)
    await page.mouse.click(px, py, **kwargs)
    await page.wait_for_timeout(pause)


async def draw_polygon(page, corners) -> None:
    """Click the corners in draw mode and close the ring on the first one."""
    for x, y in [*corners, corners[0]]:
        await click_at(page, x, y)


async def wait_saved(page, version: int, timeout: int = 30_000) -> None:
    await page.wait_for_function(f"document.getElementById('save-status').textContent === 'saved v{version}'",
                                 timeout=timeout)


async def sam_prompt(page, action) -> dict:
    """Run ``action`` (clicks, a drag) in SAM mode and wait for its result: ``{path, prompt, geometry}``."""
    before = await page.evaluate("window.colabel.samResults")
    await action()
    await page.wait_for_function(f"window.colabel.samResults > {before}", timeout=60_000)
    return await page.evaluate("window.colabel.lastSam")


async def shift_drag(page, a, b) -> None:
    (ax, ay), (bx, by) = await at(page, *a), await at(page, *b)
    await page.keyboard.down("Shift")
    await page.mouse.move(ax, ay)
    await page.mouse.down()
    await page.mouse.move(bx, by, steps=8)
    await page.mouse.up()
    await page.keyboard.up("Shift")


def saved(folder, session_id: str, image: str, annotator_dir, version: int) -> list[dict]:
    image_dir = folder / "annotations" / "sessions" / session_id / "images" / image
    path = image_dir / annotator_dir / f"v{version:06d}.geojson"
    return json.loads(path.read_text())["features"]


def outline(geometry: dict):
    """The filled outer outline of a GeoJSON (Multi)Polygon as a shapely geometry (holes dropped)."""
    from shapely.geometry import Polygon, shape
    from shapely.ops import unary_union

    g = shape(geometry)
    parts = g.geoms if g.geom_type == "MultiPolygon" else [g]
    return unary_union([Polygon(p.exterior) for p in parts])


def iou(a: dict, b: dict) -> float:
    ga, gb = outline(a), outline(b)
    return ga.intersection(gb).area / ga.union(gb).area


def mean_deviation(a: dict, b: dict) -> float:
    """Area between two outlines per unit of outline length (pixels): how far apart they are on average."""
    ga, gb = outline(a), outline(b)
    return ga.symmetric_difference(gb).area / gb.length


def he_image(provider) -> tuple[str, tuple[int, int]]:
    """The non-square H&E image (300 x 500, H x W) of the test folder: id and shape."""
    image = next(im for im in provider.list_images() if im.name.endswith("he_histo.jpg"))
    return image.image_id, tuple(image.shape[:2])


async def settled(page, timeout: int = 60_000) -> int:
    """Wait until every change is saved; returns the page's saved version."""
    await page.wait_for_function(
        "!window.colabel.saver.dirty && document.getElementById('save-status').dataset.state === 'saved'",
        timeout=timeout)
    return await page.evaluate("window.colabel.state.version")


async def test_sam_decoded_in_the_browser_matches_the_server_and_falls_back_to_it(sam_stack, browser, tmp_path):
    provider, services = sam_stack
    he, (height, width) = he_image(provider)
    assert (height, width) == (300, 500)
    session, secret = provider.create_session(name="sam-paths", classes=CLASSES, image_ids=[he],
                                              annotators_per_image=2)
    info = provider.sessions.authorize(secret)

    # the unquantised decoder: the browser runs exactly the server's decoder on the same embedding
    page = await new_page(browser)
    await join(page, services.share_url(secret) + "&decoder=full", "In Browser")
    await page.wait_for_selector("body[data-sam-path=browser]", timeout=120_000)
    assert await page.text_content("#sam-status") == "SAM: in browser"
    await page.keyboard.press("s")
    # one point: an ambiguous prompt, answered on both paths with the best of SAM's three masks
    single = await sam_prompt(page, lambda: click_at(page, 250, 150))
    server_single = await services.assist.sam_segment(info, he, single["prompt"])
    assert single["path"] == "browser" and server_single["features"]
    assert iou(single["geometry"], server_single["features"][0]["geometry"]) > 0.97
    # two positive points (three prompt tokens with the padding point: SAM's single-mask output on both paths)
    browser_result = await sam_prompt(page, lambda: click_at(page, 320, 110))
    assert browser_result["path"] == "browser"
    assert np.abs(np.array(browser_result["prompt"]["points"]) - [[250, 150], [320, 110]]).max() < 1  # screen pixels
    server_result = await services.assist.sam_segment(info, he, browser_result["prompt"])
    assert server_result["features"], "the tiny model finds something at these points"
    server_geometry = server_result["features"][0]["geometry"]
    assert iou(browser_result["geometry"], server_geometry) > 0.97
    # the outlines differ by well under a pixel on average (random weights: a few logits sit near the threshold)
    assert mean_deviation(browser_result["geometry"], server_geometry) < 0.5
    # image pixels of the non-square image: the same bounding box as the server's mask
    x0, y0, x1, y1 = outline(browser_result["geometry"]).bounds
    assert np.abs(np.array([x0, y0, x1, y1]) - server_result["bbox"]).max() <= 2, (x0, y0, x1, y1)
    assert 0 <= x0 and x1 <= width and 0 <= y0 and y1 <= height
    await screenshot(page, tmp_path, "annotate-sam-browser")
    version = await settled(page)
    (folder,) = (stack_dir := provider.folder / "annotations" / "sessions" / session.session_id / "images" / he).glob(
        "a-*")
    (stored,) = saved(provider.folder, session.session_id, he, folder.name, version)
    assert iou(stored["geometry"], browser_result["geometry"]) > 0.99
    assert not page.errors, page.errors
    await page.context.close()

    # a decoder that cannot load (its wasm runtime unreachable): clicks go to sam_segment on the server
    page = await new_page(browser)
    await page.route("**/*.wasm", lambda route: route.abort())
    await join(page, services.share_url(secret), "On Server")
    await page.wait_for_selector("body[data-sam-path=server]", timeout=120_000)
    assert await page.text_content("#sam-status") == "SAM: on server"
    assert "could not load" in await page.get_attribute("#sam-status", "title")
    await page.keyboard.press("s")
    await sam_prompt(page, lambda: click_at(page, 250, 150))
    fallback = await sam_prompt(page, lambda: click_at(page, 320, 110))
    assert fallback["path"] == "server"
    assert fallback["geometry"] == server_geometry
    await screenshot(page, tmp_path, "annotate-sam-server")
    await settled(page)
    assert len(list(stack_dir.glob("a-*"))) == 2
    assert not page.errors, page.errors
    await page.context.close()


async def test_two_quick_sam_clicks_are_two_points_decoded_in_order_without_a_zoom(sam_stack, page, tmp_path):
    provider, services = sam_stack
    he, _ = he_image(provider)
    session, secret = provider.create_session(name="quick", classes=CLASSES, image_ids=[he])
    await join(page, services.share_url(secret) + "&decoder=full", "Quick Clicker")
    await page.wait_for_selector("body[data-sam-path=browser]", timeout=120_000)
    await page.keyboard.press("s")
    resolution = await page.evaluate("window.colabel.map.getView().getResolution()")
    (ax, ay), (bx, by) = await at(page, 250, 150), await at(page, 320, 110)
    # within the 250 ms double-click delay: as map `singleclick`s both points were dropped and the view zoomed
    await page.mouse.click(ax, ay)
    await page.mouse.click(bx, by)
    await page.wait_for_function("(window.colabel.lastSam?.prompt?.points || []).length === 2", timeout=60_000)
    last = await page.evaluate("window.colabel.lastSam")
    assert last["path"] == "browser" and last["geometry"], last
    assert np.abs(np.array(last["prompt"]["points"]) - [[250, 150], [320, 110]]).max() < 1
    assert last["prompt"]["labels"] == [1, 1]
    assert await page.evaluate("window.colabel.map.getView().getResolution()") == resolution
    await settled(page)
    # one object from both points: the decode of the first point alone never replaced the newer result
    assert await page.evaluate("window.colabel.source.getFeatures().length") == 1
    info = provider.sessions.authorize(secret)
    expected = await services.assist.sam_segment(info, he, last["prompt"])
    assert iou(last["geometry"], expected["features"][0]["geometry"]) > 0.97


def annotator_dirs(provider, session_id: str, image: str) -> dict[str, str]:
    """display name -> the annotator's folder name under the image."""
    annotators = provider.sessions.annotators(session_id)
    names = {a.annotator_id: a.display_name for a in (annotators.values() if isinstance(annotators, dict)
                                                         else annotators)}
    folder = provider.folder / "annotations" / "sessions" / session_id / "images" / image
    return {names[d.name]: d.name for d in folder.glob("a-*")}


def near(ring, corners, tolerance: float = 2.5) -> bool:
    """Every corner has a vertex of ring within tolerance (L1, image pixels)."""
    ring = np.asarray(ring)
    return all(np.abs(ring - c).sum(axis=1).min() < tolerance for c in corners)


async def test_two_annotators_draw_and_use_sam_points_and_boxes_saved_in_pixel_coordinates(
        sam_stack, browser, tmp_path):
    import asyncio

    provider, services = sam_stack
    he, (height, width) = he_image(provider)  # 300 x 500: a missing y flip or x/y swap shows
    session, secret = provider.create_session(name="two", classes=CLASSES, image_ids=[he], annotators_per_image=2)
    info = provider.sessions.authorize(secret)
    rectangles = {"Ann": [(40, 30), (180, 30), (180, 90), (40, 90)],
                  "Ben": [(300, 200), (460, 200), (460, 270), (300, 270)]}

    # Ann's page decodes with the full decoder (the server's own numbers), Ben's with the default quantised one
    fragments = {"Ann": "&decoder=full", "Ben": ""}
    agreement = {"Ann": 0.97, "Ben": 0.7}  # IoU; uint8 weights move random-weight masks' flat logits more

    async def annotate(name: str, page) -> dict:
        await join(page, services.share_url(secret) + fragments[name], name)
        await draw_polygon(page, rectangles[name])
        await settled(page)
        await page.keyboard.press("s")
        await page.wait_for_selector("body[data-sam-path=browser]", timeout=120_000)
        results = []
        if name == "Ann":  # a positive click, a second one; then a box with a positive point inside it
            await sam_prompt(page, lambda: click_at(page, 250, 150, pause=400))
            results.append(await sam_prompt(page, lambda: click_at(page, 320, 110, pause=400)))
            await page.keyboard.press("n")
            await page.keyboard.press("2")
            await sam_prompt(page, lambda: shift_drag(page, (60, 120), (220, 260)))
            results.append(await sam_prompt(page, lambda: click_at(page, 140, 200, pause=400)))
        else:  # a box, then a negative point (right click); then a positive and an alt-click negative point
            await sam_prompt(page, lambda: shift_drag(page, (280, 40), (480, 180)))
            results.append(await sam_prompt(page, lambda: click_at(page, 300, 60, pause=400, button="right")))
            await page.keyboard.press("n")

            async def alt_click():
                await page.keyboard.down("Alt")
                await click_at(page, 120, 250, pause=50)
                await page.keyboard.up("Alt")

            await sam_prompt(page, lambda: click_at(page, 60, 200, pause=400))
            results.append(await sam_prompt(page, alt_click))
        await page.keyboard.press("n")
        version = await settled(page)
        assert (await page.locator("header").bounding_box())["height"] < 50  # one row at 1280 x 800
        await screenshot(page, tmp_path, f"annotate-two-{name}")
        return {"version": version, "results": results}

    pages = {name: await new_page(browser) for name in rectangles}
    done = dict(zip(pages, await asyncio.gather(*(annotate(n, p) for n, p in pages.items())), strict=True))

    dirs = annotator_dirs(provider, session.session_id, he)
    assert set(dirs) == {"Ann", "Ben"}
    prompts_seen = {"Ann": ({"points", "labels"}, {"points", "labels", "box"}),
                    "Ben": ({"points", "labels", "box"}, {"points", "labels"})}
    for name, outcome in done.items():
        features = saved(provider.folder, session.session_id, he, dirs[name], outcome["version"])
        assert len(features) == 1 + len(outcome["results"]), features
        drawn = features[0]
        assert drawn["properties"]["classification"]["name"] == "nucleus"
        assert near(drawn["geometry"]["coordinates"][0], rectangles[name])
        for result, feature, keys in zip(outcome["results"], features[1:], prompts_seen[name], strict=True):
            assert result["path"] == "browser" and set(result["prompt"]) == keys
            assert result["prompt"]["labels"] == ([1, 1] if name == "Ann" and "box" not in keys else
                                                  [1] if name == "Ann" else [0] if "box" in keys else [1, 0])
            assert iou(feature["geometry"], result["geometry"]) > 0.99
            # the browser decoder and the server agree on the object (three prompt tokens or more)
            server = await services.assist.sam_segment(info, he, result["prompt"])
            assert server["features"]
            assert iou(result["geometry"], server["features"][0]["geometry"]) > agreement[name], name
            x0, y0, x1, y1 = outline(result["geometry"]).bounds
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        classes = [f["properties"]["classification"]["name"] for f in features[1:]]
        assert classes == (["nucleus", "other"] if name == "Ann" else ["nucleus", "nucleus"])
    for annotator_page in pages.values():
        assert not annotator_page.errors, annotator_page.errors
        await annotator_page.context.close()


async def test_a_save_while_the_provider_is_down_fails_visibly_then_retries_without_losing_the_polygon(
        stack, page, tmp_path):
    he, _ = he_image(stack.provider)
    session, secret = stack.provider.create_session(name="down", classes=CLASSES, image_ids=[he])
    await join(page, stack.services.share_url(secret), "Dora")
    first = [(20, 20), (120, 20), (120, 80), (20, 80)]
    await draw_polygon(page, first)
    assert await settled(page) == 1

    annotate_id = f"{stack.services.name}-annotate"
    await stack.server.unregister_service(annotate_id)  # the provider's annotator service goes away
    second = [(200, 150), (400, 150), (400, 280), (200, 280)]
    await draw_polygon(page, second)
    await page.wait_for_selector("#save-status[data-state=failed]", timeout=30_000)
    status = await page.text_content("#save-status")
    assert status.startswith("not saved: provider unreachable; retry in "), status
    assert (await page.locator("header").bounding_box())["height"] < 50  # still one row at 1280 x 800
    assert await page.evaluate("window.colabel.source.getFeatures().length") == 2  # nothing dropped
    await screenshot(page, tmp_path, "annotate-save-failed")
    # closing the tab now asks first (beforeunload), and staying keeps the page
    dialogs = []

    async def stay(dialog):
        dialogs.append(dialog.type)
        await dialog.dismiss()

    page.once("dialog", stay)
    await page.close(run_before_unload=True)
    await page.wait_for_timeout(500)
    assert dialogs == ["beforeunload"] and not page.is_closed()

    await stack.server.register_service({  # the provider is back
        "id": annotate_id, "config": {"visibility": "public"}, **stack.services.annotator_functions()})
    assert await settled(page, timeout=45_000) == 2
    await screenshot(page, tmp_path, "annotate-save-retried")
    (folder,) = (stack.folder / "annotations" / "sessions" / session.session_id / "images" / he).glob("a-*")
    features = saved(stack.folder, session.session_id, he, folder.name, 2)
    assert len(features) == 2
    assert near(features[0]["geometry"]["coordinates"][0], first)
    assert near(features[1]["geometry"]["coordinates"][0], second)
    assert not (folder / "v000003.geojson").exists()


async def test_undo_redo_and_the_cutter_change_the_saved_geometry(stack, page, tmp_path):
    he, (height, width) = he_image(stack.provider)
    session, secret = stack.provider.create_session(name="cut", classes=CLASSES, image_ids=[he])
    await join(page, stack.services.share_url(secret), "Cora")
    image_dir = stack.folder / "annotations" / "sessions" / session.session_id / "images" / he

    def latest(version: int) -> list[list]:
        (folder,) = image_dir.glob("a-*")
        return [f["geometry"]["coordinates"][0] for f in saved(stack.folder, session.session_id, he, folder.name,
                                                                    version)]

    def xs(ring) -> tuple[float, float]:
        """The x range of a ring, rounded to whole pixels (clicks land within a screen pixel)."""
        x = np.asarray(ring)[:, 0]
        return round(float(x.min())), round(float(x.max()))

    def split_at(rings, *ranges) -> bool:
        """The rings span these x ranges (the cut line is a click, 0.1 px wide, within a pixel of x = 200)."""
        got = sorted(xs(r) for r in rings)
        return len(got) == len(ranges) and bool(np.abs(np.subtract(got, ranges)).max() <= 1)

    rect = [(100, 50), (300, 50), (300, 150), (100, 150)]
    await draw_polygon(page, rect)
    assert await settled(page) == 1

    # cut: a line across the rectangle splits it in two
    await page.keyboard.press("c")
    await click_at(page, 200, 20)
    await click_at(page, 200, 180)
    await page.keyboard.press("Enter")
    assert await settled(page) == 2
    await screenshot(page, tmp_path, "annotate-cut")
    assert split_at(latest(2), (100, 200), (200, 300)), latest(2)
    left, right = sorted(latest(2), key=lambda r: np.asarray(r)[:, 0].min())
    gap = np.asarray(right)[:, 0].min() - np.asarray(left)[:, 0].max()
    assert 0 < gap < 0.5  # a cut, not a slab: the pieces keep all but a sliver of the area

    await page.keyboard.press("Control+z")  # undo: one rectangle again
    assert await settled(page) == 3
    assert split_at(latest(3), (100, 300)) and near(latest(3)[0], rect)
    await page.keyboard.press("Control+Shift+z")  # redo: two pieces
    assert await settled(page) == 4
    assert split_at(latest(4), (100, 200), (200, 300))

    # subtract: a polygon over the right piece's right half
    await page.keyboard.press("x")
    await draw_polygon(page, [(250, 30), (330, 30), (330, 170), (250, 170)])
    assert await settled(page) == 5
    assert split_at(latest(5), (100, 200), (200, 250))
    await screenshot(page, tmp_path, "annotate-subtracted")

    # a class change, undone with Ctrl+Z and redone with Ctrl+Y
    await page.keyboard.press("e")
    await click_at(page, 150, 100)
    await page.wait_for_function("window.colabel.select.getFeatures().getLength() === 1")
    await page.keyboard.press("2")
    assert await settled(page) == 6
    (folder,) = image_dir.glob("a-*")

    def classes(version: int) -> list[str]:
        features = saved(stack.folder, session.session_id, he, folder.name, version)
        return sorted(f["properties"]["classification"]["name"] for f in features)

    assert classes(6) == ["nucleus", "other"]
    await page.keyboard.press("Control+z")
    assert await settled(page) == 7 and classes(7) == ["nucleus", "nucleus"]
    await page.keyboard.press("Control+y")
    assert await settled(page) == 8 and classes(8) == ["nucleus", "other"]
    # delete, undone
    await click_at(page, 150, 100)
    await page.wait_for_function("window.colabel.select.getFeatures().getLength() === 1")
    await page.keyboard.press("Delete")
    assert await settled(page) == 9 and len(latest(9)) == 1
    await page.click("#undo")
    assert await settled(page) == 10 and len(latest(10)) == 2
    assert 0 <= min(min(xs(r)) for r in latest(10)) and max(max(xs(r)) for r in latest(10)) <= width


async def test_help_panel_lists_the_shortcuts_and_the_page_fits_1280_by_800(stack, page, tmp_path):
    ihc = image_id(stack, "ihc_ki67.png")
    _, secret = stack.provider.create_session(name="help", classes=CLASSES, image_ids=[ihc])
    await join(page, stack.services.share_url(secret), "Hal")
    for selector in ("#tool-draw", "#tool-edit", "#tool-cut", "#tool-subtract", "#undo", "#redo", "#save-status",
                     "#next-image", "#help-button"):
        box = await page.locator(selector).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 1280 and box["y"] + box["height"] <= 120, selector
    assert (await page.locator("header").bounding_box())["height"] < 50  # one row
    map_box = await page.locator("#map").bounding_box()
    assert map_box["width"] == 1280 and map_box["height"] >= 700
    await page.keyboard.press("?")
    await page.wait_for_selector("#help[open]")
    text = await page.text_content("#help")
    for shortcut in ("Ctrl+Z", "Ctrl+Shift+Z / Ctrl+Y", "Shift-drag = box", "right click", "cut", "subtract"):
        assert shortcut in text, shortcut
    await screenshot(page, tmp_path, "annotate-help")
    await page.keyboard.press("Escape")
    await page.wait_for_function("!document.getElementById('help').open")
    await page.click("#help-button")
    await page.wait_for_selector("#help[open]")
    await page.click("#help-close")
    await page.wait_for_function("!document.getElementById('help').open")
