"""Drawing on the annotator page, in a real headless Chromium against a real provider on a real Hypha server: an
outline that crosses itself, one drawn across or beside the image's edge, a drawing the provider refuses, Ctrl+Z
and Backspace while a shape is being drawn, a cut line that does not go across, the browser going offline, a
name of spaces in the join dialog, the brush and eraser, and hiding the drawing. Skipped without the built pages,
playwright or Chromium (see web_support)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from shapely.geometry import LineString, Polygon, box, shape
from test_web import at, click_at, draw_polygon, he_image, near, saved, settled
from web_support import CLASSES, browser, join, page, screenshot  # noqa: F401 - fixtures

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]

SQUARE = [(20, 20), (120, 20), (120, 80), (20, 80)]
BOW_TIE = [(150, 50), (250, 150), (250, 50), (150, 150)]  # its edges cross at (200, 100)
OFFLINE = "offline: kept in this browser, saved when back online"
FEATURES = "window.colabel.source.getFeatures().length"


async def open_session(stack, page, name: str) -> tuple[str, str]:
    """A session on the H&E image (300 x 500), joined on ``page``: (session id, image id)."""
    he, _ = he_image(stack.provider)
    session, secret = stack.provider.create_session(name=name, classes=CLASSES, image_ids=[he])
    await join(page, stack.services.share_url(secret), name.capitalize())
    return session.session_id, he


def versions(stack, session_id: str, image: str) -> tuple[str, list[str]]:
    """The only annotator's folder name under the image, and its saved version files."""
    (annotator,) = (stack.folder / "annotations" / "sessions" / session_id / "images" / image).glob("a-*")
    return annotator.name, sorted(p.name for p in annotator.glob("v*.geojson"))


def latest(stack, session_id: str, image: str) -> list[dict]:
    name, files = versions(stack, session_id, image)
    return saved(stack.folder, session_id, image, name, len(files))


async def message(page) -> str:
    return (await page.text_content("#message")) or ""


async def zoom_on_the_top_left_corner(page) -> None:
    """Zoomed in (4 screen pixels per image pixel) on the image's top-left corner, the margin beside it in view."""
    await page.evaluate("""(() => {
      const view = window.colabel.map.getView();
      view.setResolution(0.25);
      view.setCenter([0, window.colabel.state.H]);
    })()""")
    await page.wait_for_timeout(500)


async def test_a_polygon_drawn_crossing_itself_is_kept_as_the_areas_it_encloses_and_saved(stack, page):
    session_id, he = await open_session(stack, page, "bowtie")
    await draw_polygon(page, SQUARE)
    assert await settled(page, timeout=20_000) == 1
    await draw_polygon(page, BOW_TIE)
    assert "crosses itself" in await message(page)
    assert await settled(page, timeout=20_000) == 2
    features = latest(stack, session_id, he)
    assert len(features) == 2
    tie = next(f for f in features if f["geometry"]["type"] == "MultiPolygon")
    outline = shape(tie["geometry"])
    assert outline.is_valid and len(outline.geoms) == 2  # the bow tie's two triangles, one object
    drawn = [(150, 50), (200, 100), (150, 150)], [(250, 50), (200, 100), (250, 150)]
    expected = Polygon(drawn[0]).union(Polygon(drawn[1]))
    assert outline.symmetric_difference(expected).area < 0.05 * expected.area
    assert tie["properties"]["classification"]["name"] == "nucleus"
    # a third polygon is saved as usual: nothing is stuck
    await draw_polygon(page, [(300, 200), (400, 200), (400, 280), (300, 280)])
    assert await settled(page, timeout=20_000) == 3 and len(latest(stack, session_id, he)) == 3


async def test_an_edit_that_makes_a_polygon_cross_itself_is_repaired_when_the_drag_ends(stack, page):
    session_id, he = await open_session(stack, page, "dragged")
    rect = [(100, 50), (300, 50), (300, 150), (100, 150)]
    await draw_polygon(page, rect)
    assert await settled(page, timeout=20_000) == 1
    await page.keyboard.press("e")
    await page.wait_for_timeout(300)  # not a double click (a zoom) with the click that closed the polygon
    await click_at(page, 200, 100)
    await page.wait_for_function("window.colabel.select.getFeatures().getLength() === 1")
    # drag the corner (300, 150) over the left edge: the ring (100,50) (300,50) (50,100) (100,150) crosses itself
    (ax, ay), (bx, by) = await at(page, 300, 150), await at(page, 50, 100)
    await page.mouse.move(ax, ay)
    await page.mouse.down()
    await page.mouse.move(bx, by, steps=10)
    await page.mouse.up()
    assert await settled(page, timeout=20_000) == 2
    assert "crosses itself" in await message(page)
    (feature,) = latest(stack, session_id, he)
    outline = shape(feature["geometry"])
    assert outline.is_valid
    assert outline.bounds == pytest.approx((50, 50, 300, 150), abs=2)


async def test_a_drawing_the_server_refuses_stops_the_retries_selects_the_polygon_and_says_how_to_fix_it(
        stack, page):
    """A polygon the page did not mend (here made to cross itself behind the page's back) is refused by the
    provider: no endless retry, the polygon is selected, the banner says what to do, and the next change saves."""
    session_id, he = await open_session(stack, page, "refused")
    await draw_polygon(page, SQUARE)
    assert await settled(page, timeout=20_000) == 1
    await draw_polygon(page, [(150, 50), (250, 50), (250, 150), (150, 150)])
    assert await settled(page, timeout=20_000) == 2
    await page.keyboard.press("e")
    await page.wait_for_timeout(300)  # not a double click (a zoom) with the click that closed the polygon
    await click_at(page, 200, 100)
    await page.wait_for_function("window.colabel.select.getFeatures().getLength() === 1")
    bad = await page.evaluate("""(tie) => {
      const c = window.colabel;
      const f = c.select.getFeatures().item(0);
      f.getGeometry().setCoordinates([[...tie, tie[0]].map(([x, y]) => [x, c.state.H - y])]);
      return f.getId();
    }""", BOW_TIE)
    await page.keyboard.press("2")  # a change: the class of the selected polygon, saved with its crossing outline

    await page.wait_for_selector("#banner:not([hidden])", timeout=20_000)
    banner = await page.text_content("#banner-text")
    assert "crosses itself" in banner and "delete it" in banner, banner
    status = await page.text_content("#save-status")
    assert status == "not saved: a polygon crosses itself", status
    assert await page.get_attribute("#save-status", "data-state") == "failed"
    selected = await page.evaluate("window.colabel.select.getFeatures().getArray().map((f) => f.getId())")
    assert selected == [bad]
    await page.wait_for_timeout(4000)  # no retry comes: the same drawing would be refused again
    assert await page.evaluate("window.colabel.saver.stopped !== null && window.colabel.saver.timer === null")
    assert "retry" not in await page.text_content("#save-status")
    assert versions(stack, session_id, he)[1] == ["v000001.geojson", "v000002.geojson"]
    await page.click("#next-image")  # not stuck "retrying": the banner says again what is wrong
    await page.wait_for_timeout(500)
    assert await page.is_visible("#banner") and "crosses itself" in await page.text_content("#banner-text")

    await page.keyboard.press("Delete")  # the fix: the next change saves
    assert await settled(page, timeout=20_000) == 3
    assert await page.is_hidden("#banner")
    (kept,) = latest(stack, session_id, he)
    assert near(kept["geometry"]["coordinates"][0], SQUARE)
    await page.click("#next-image")
    await page.wait_for_selector("body[data-state=done]", timeout=20_000)


async def test_a_polygon_drawn_across_the_image_corner_is_clipped_to_the_image(stack, page):
    session_id, he = await open_session(stack, page, "corner")
    await zoom_on_the_top_left_corner(page)
    quad = [(24, -4), (8, 24), (-6, 8), (-17, 10)]  # a valid outline, over the image's top-left corner
    await draw_polygon(page, quad)
    assert "outside the image is cut off" in await message(page)
    assert await settled(page, timeout=20_000) == 1
    (feature,) = latest(stack, session_id, he)
    outline = shape(feature["geometry"])
    assert outline.is_valid and outline.bounds[0] >= 0 and outline.bounds[1] >= 0
    expected = Polygon(quad).intersection(box(0, 0, 500, 300))
    assert outline.symmetric_difference(expected).area < 0.05 * expected.area


async def test_a_polygon_drawn_beside_the_image_is_dropped_with_a_note(stack, page):
    session_id, he = await open_session(stack, page, "beside")
    await zoom_on_the_top_left_corner(page)
    await draw_polygon(page, [(-40, 20), (-10, 20), (-10, 60), (-40, 60)])
    assert "outside the image: not kept" in await message(page)
    await page.wait_for_timeout(1000)
    assert await page.evaluate(FEATURES) == 0
    assert await page.evaluate("!window.colabel.saver.dirty && window.colabel.state.version === 0")
    # a polygon drawn on the image then is saved as usual
    await draw_polygon(page, [(5, 5), (40, 5), (40, 40), (5, 40)])
    assert await settled(page, timeout=20_000) == 1
    assert len(latest(stack, session_id, he)) == 1


async def test_ctrl_z_and_backspace_while_drawing_remove_the_last_point_not_the_previous_polygon(stack, page):
    session_id, he = await open_session(stack, page, "sketch")
    await draw_polygon(page, SQUARE)
    assert await settled(page, timeout=20_000) == 1
    for x, y in [(150, 200), (250, 200), (250, 280), (400, 290)]:  # the last point is misplaced
        await click_at(page, x, y)
    await page.keyboard.press("Control+z")
    await page.wait_for_timeout(1000)
    assert await page.evaluate(FEATURES) == 1  # the finished polygon is still there, and nothing was saved
    assert await page.evaluate("!window.colabel.saver.dirty && window.colabel.state.version === 1")
    await click_at(page, 420, 100)  # misplaced again
    await page.keyboard.press("Backspace")
    for x, y in [(150, 280), (150, 200)]:  # the last corner, then close on the first
        await click_at(page, x, y)
    assert await settled(page, timeout=20_000) == 2
    features = latest(stack, session_id, he)
    assert len(features) == 2
    ring = next(f for f in features if not near(f["geometry"]["coordinates"][0], SQUARE))["geometry"]["coordinates"][0]
    assert len(ring) == 5 and near(ring, [(150, 200), (250, 200), (250, 280), (150, 280)])
    await page.keyboard.press("?")
    await page.wait_for_selector("#help[open]")
    assert "Backspace while drawing" in await page.text_content("#help")


async def test_a_cut_line_that_does_not_go_across_says_so_and_a_successful_cut_clears_the_note(stack, page):
    session_id, he = await open_session(stack, page, "cutnote")
    await draw_polygon(page, [(100, 50), (300, 50), (300, 150), (100, 150)])
    assert await settled(page, timeout=20_000) == 1
    await page.keyboard.press("c")

    async def cut(*points):
        for x, y in points:
            await click_at(page, x, y)
        await page.keyboard.press("Enter")
        await page.wait_for_timeout(300)

    await cut((50, 100), (200, 100))  # into the polygon, stopping inside
    assert await message(page) == "the line must cross the polygon from side to side to split it"
    await cut((350, 20), (350, 180))  # beside it
    assert await message(page) == "the cut line touches no polygon"
    await cut((200, 20), (200, 180))  # across: two pieces
    assert await settled(page, timeout=20_000) == 2
    assert len(latest(stack, session_id, he)) == 2
    assert await message(page) == "" and await page.is_hidden("#message")


async def test_going_offline_says_so_at_once_and_saves_when_back_online(stack, page):
    session_id, he = await open_session(stack, page, "offline")
    await draw_polygon(page, SQUARE)
    assert await settled(page, timeout=20_000) == 1
    await page.context.set_offline(True)
    try:
        await draw_polygon(page, [(200, 150), (400, 150), (400, 280), (200, 280)])
        await page.wait_for_function(f"document.getElementById('save-status').textContent === {OFFLINE!r}",
                                     timeout=3000)
        assert await page.get_attribute("#save-status", "data-state") == "offline"
        await page.wait_for_timeout(3500)  # retries waited 1 and 2 s: the next one would wait 4 s
        assert await page.text_content("#save-status") == OFFLINE
    finally:
        await page.context.set_offline(False)
    assert await settled(page, timeout=2500) == 2  # at once on `online`, not after the next wait of 4 s
    await page.wait_for_timeout(1000)
    assert versions(stack, session_id, he)[1] == ["v000001.geojson", "v000002.geojson"]
    assert len(latest(stack, session_id, he)) == 2


async def test_the_join_dialog_asks_for_a_name_when_only_spaces_are_entered(stack, page):
    he, _ = he_image(stack.provider)
    _, secret = stack.provider.create_session(name="spaces", classes=CLASSES, image_ids=[he])
    await page.goto(stack.services.share_url(secret))
    await page.wait_for_selector("#name-dialog[open]")
    await page.fill("#display-name", "   ")
    await page.click("#join")
    await page.wait_for_function("document.getElementById('name-error').textContent === 'enter your name'",
                                 timeout=5000)
    assert await page.is_visible("#name-dialog[open]")
    await page.fill("#display-name", "Ann")
    await page.click("#join")
    await page.wait_for_selector("body[data-state=ready]", timeout=30_000)


async def test_a_drawing_over_the_size_limit_stops_the_retries_and_says_so_not_access_denied(stack, page):
    session_id, he = await open_session(stack, page, "too large")
    await draw_polygon(page, SQUARE)
    assert await settled(page, timeout=20_000) == 1
    stack.provider.config.max_annotation_bytes = 600  # about two polygons
    await draw_polygon(page, [(150, 50), (250, 50), (250, 150), (150, 150)])
    await draw_polygon(page, [(300, 50), (400, 50), (400, 150), (300, 150)])
    await page.wait_for_selector("#banner:not([hidden])", timeout=20_000)
    status = await page.text_content("#save-status")
    assert status == "not saved: the drawing is larger than the provider takes", status
    assert "exceeds the limit of 600 bytes" in await page.text_content("#banner-text")
    assert await page.evaluate("window.colabel.saver.stopped !== null && window.colabel.saver.timer === null")
    assert versions(stack, session_id, he)[1] == ["v000001.geojson"]
    stack.provider.config.max_annotation_bytes = 16 * 2**20
    await page.keyboard.press("Control+z")  # any change saves again
    assert await settled(page, timeout=20_000) == 2


async def stroke(page, points, *, alt: bool = False, button: str = "left", before_release=None) -> None:
    """Drag the mouse through image pixels ``points`` (a brush stroke; with Alt held or the right button: the
    eraser); ``before_release``: a coroutine function awaited with the button still down."""
    first = await at(page, *points[0])
    await page.mouse.move(*first)
    if alt:
        await page.keyboard.down("Alt")
    await page.mouse.down(button=button)
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        for t in np.linspace(0, 1, 11)[1:]:  # small steps, as a hand moves
            await page.mouse.move(*(await at(page, x0 + t * (x1 - x0), y0 + t * (y1 - y0))))
    if before_release is not None:
        await before_release()
    await page.mouse.up(button=button)
    if alt:
        await page.keyboard.up("Alt")
    await page.wait_for_timeout(200)


async def test_the_brush_paints_a_polygon_grows_it_from_inside_and_alt_erases_across_it(stack, page, tmp_path):
    session_id, he = await open_session(stack, page, "brush")
    await page.keyboard.press("b")
    await page.keyboard.press("]")  # 12 -> 15 screen pixels
    radius = await page.evaluate("window.colabel.state.brushRadius * window.colabel.map.getView().getResolution()")
    assert await page.evaluate("window.colabel.state.brushRadius") == 15 and radius > 3
    await stroke(page, [(100, 100), (250, 100)])  # on nothing: a new polygon of the current class
    assert await settled(page, timeout=20_000) == 1
    (bar,) = latest(stack, session_id, he)
    swept = LineString([(100, 100), (250, 100)]).buffer(radius)
    assert shape(bar["geometry"]).symmetric_difference(swept).area < 0.1 * swept.area
    assert bar["properties"]["classification"]["name"] == "nucleus"

    await stroke(page, [(175, 100), (175, 220)])  # from inside it: the same polygon grows
    assert await settled(page, timeout=20_000) == 2
    (grown,) = latest(stack, session_id, he)
    assert grown["id"] == bar["id"] and shape(grown["geometry"]).geom_type == "Polygon"
    expected = swept.union(LineString([(175, 100), (175, 220)]).buffer(radius))
    assert shape(grown["geometry"]).symmetric_difference(expected).area < 0.1 * expected.area

    await stroke(page, [(140, 170), (210, 170)], alt=True,  # Alt: erased across the stem, which falls in two
                 before_release=lambda: screenshot(page, tmp_path, "annotate-brush"))
    assert await settled(page, timeout=20_000) == 3
    parts = sorted((shape(f["geometry"]) for f in latest(stack, session_id, he)), key=lambda p: p.bounds[1])
    assert len(parts) == 2 and parts[0].bounds[3] < 170 - radius / 2 < 170 + radius / 2 < parts[1].bounds[1]
    await stroke(page, [(400, 250), (450, 250)], alt=True)
    assert await message(page) == "the eraser touched no polygon"
    await stroke(page, [(130, 60), (130, 140)], button="right")  # the right button erases too: the bar's end off
    assert await settled(page, timeout=20_000) == 4
    parts = sorted((shape(f["geometry"]) for f in latest(stack, session_id, he)), key=lambda p: p.bounds[0])
    assert len(parts) == 3 and parts[0].bounds[2] < 130 - radius / 2
    assert await page.evaluate(FEATURES) == 3 and not page.errors, page.errors


async def test_h_hides_the_drawing_until_pressed_again_or_drawn_on_and_f_leaves_outlines_only(stack, page):
    await open_session(stack, page, "view")
    await draw_polygon(page, SQUARE)
    assert await settled(page, timeout=20_000) == 1
    layer_visible = "window.colabel.map.getLayers().item(1).getVisible()"
    fill = "window.colabel.styleOf(window.colabel.source.getFeatures()[0]).getFill().getColor()"
    assert (await page.evaluate(fill)).endswith(",0.25)")
    await page.keyboard.press("f")  # outlines only: a fill faint enough to see through, still hit by clicks
    assert (await page.evaluate(fill)).endswith(",0.01)")
    await page.keyboard.press("e")
    await page.wait_for_timeout(300)  # not a double-click (a zoom) with the polygon's closing click
    await click_at(page, 70, 50)
    assert await page.evaluate("window.colabel.select.getFeatures().getLength()") == 1
    await page.keyboard.press("Escape")
    await page.keyboard.press("f")
    assert (await page.evaluate(fill)).endswith(",0.25)")

    await page.keyboard.press("h")
    assert not await page.evaluate(layer_visible)
    assert await page.text_content("#view-status") == "labels hidden (H shows them)"
    await page.keyboard.press("h")
    assert await page.evaluate(layer_visible) and await page.is_hidden("#view-status")
    await page.keyboard.press("h")
    await page.keyboard.press("d")
    await draw_polygon(page, [(300, 200), (400, 200), (400, 280), (300, 280)])  # drawing shows the drawing again
    assert await settled(page, timeout=20_000) == 2
    assert await page.evaluate(layer_visible) and await page.is_hidden("#view-status")
    assert not page.errors, page.errors


async def test_the_brush_grows_the_smallest_polygon_under_it_and_survives_a_tool_key_pressed_mid_stroke(stack, page):
    session_id, he = await open_session(stack, page, "brushing")
    await draw_polygon(page, [(50, 50), (300, 50), (300, 250), (50, 250)])  # a tissue region
    assert await settled(page, timeout=20_000) == 1
    await page.wait_for_timeout(300)
    await draw_polygon(page, [(120, 120), (200, 120), (200, 180), (120, 180)])  # a nucleus inside it
    assert await settled(page, timeout=20_000) == 2
    region, nucleus = (f["id"] for f in latest(stack, session_id, he))
    await page.keyboard.press("b")
    await stroke(page, [(60, 60), (60, 20)])  # out through the region's edge, along vertices of the hand-drawn side
    assert await settled(page, timeout=20_000) == 3
    await stroke(page, [(290, 150), (340, 150)])  # the region grows past its right edge (re-indexed in the source)
    assert await settled(page, timeout=20_000) == 4
    await page.reload()  # the features come back in another order
    await page.wait_for_selector("body[data-state=ready]", timeout=30_000)
    await page.keyboard.press("b")
    await stroke(page, [(160, 150), (160, 100)])  # from inside the nucleus, the smaller: the nucleus grows
    assert await settled(page, timeout=20_000) == 5
    grown = {f["id"]: shape(f["geometry"]) for f in latest(stack, session_id, he)}
    assert grown[nucleus].bounds[1] < 110 and grown[region].bounds[1] < 40 and grown[region].bounds[2] > 330

    center = "window.colabel.map.getView().getCenter()"
    before = await page.evaluate(center)
    first = await at(page, 100, 280)
    await page.mouse.move(*first)
    await page.mouse.down()
    await page.mouse.move(first[0] + 30, first[1])
    await page.keyboard.press("e")  # a tool key mid-stroke: the stroke is dropped
    await page.mouse.move(first[0] + 60, first[1])
    await page.mouse.up()
    await page.keyboard.press("b")
    await stroke(page, [(400, 280), (450, 280)])  # the next stroke paints, and the map does not pan
    assert await settled(page, timeout=20_000) == 6
    assert len(latest(stack, session_id, he)) == 3 and await page.evaluate(center) == before

    await page.keyboard.press("d")
    await draw_polygon(page, [(380, 150), (480, 250), (480, 150), (380, 250)])  # a bow tie: one object of 2 parts
    assert await settled(page, timeout=20_000) == 7
    await page.keyboard.press("b")
    await stroke(page, [(400, 160), (400, 200)], alt=True)  # a nick in one part: still one object
    assert await settled(page, timeout=20_000) == 8
    assert len(latest(stack, session_id, he)) == 4
    assert not page.errors, page.errors
