"""Images larger than the pages load whole (over 4096 px a side) in a real headless Chromium against a real
provider: zoomed in, the annotator and classification pages show level-0 pixels from tiles (web/src/tiles.js,
each tile a ``get_image`` call of the level that matches the zoom), and a polygon drawn there is saved in image
coordinates; plus the pure tile helpers in Node (skipped without the built pages, playwright or Chromium: see
web_support; the Node test also without node and web/node_modules)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from test_web import draw_polygon, wait_saved
from web_support import CLASSES, browser, join, new_page, page, screenshot  # noqa: F401 - fixtures

from conftest import DATA, make_image_folder

E2E = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]
WEB = Path(__file__).resolve().parents[1] / "web"
LARGE = "large_he.tif"
TILE = 512


def large_he() -> np.ndarray:
    """A 2400 x 6000 RGB H&E mosaic of the real 300 x 500 test image: 8 x 12 copies, every other one rotated by
    180 degrees and every third row of them with its channels reversed, so that no two neighbouring blocks (nor
    two tiles) hold the same pixels."""
    he = np.asarray(Image.open(DATA / "he_histo.jpg").convert("RGB"))
    rows = []
    for by in range(8):
        row = []
        for bx in range(12):
            block = he[::-1, ::-1] if (bx + by) % 2 else he
            row.append(block[:, :, ::-1] if by % 3 == 1 else block)
        rows.append(np.concatenate(row, axis=1))
    return np.ascontiguousarray(np.concatenate(rows, axis=0))


def halved(image: np.ndarray) -> np.ndarray:
    h, w, c = image.shape
    return image.reshape(h // 2, 2, w // 2, 2, c).mean(axis=(1, 3)).round().astype(np.uint8)


def write_pyramid(path: Path, level0: np.ndarray) -> list[np.ndarray]:
    """A tiled pyramid TIFF (as scanners write them): level 0 and two halved levels as SubIFDs; returns the levels."""
    levels = [level0, halved(level0), halved(halved(level0))]
    with tifffile.TiffWriter(path) as tif:
        tif.write(levels[0], subifds=2, tile=(256, 256), photometric="rgb")
        for level in levels[1:]:
            tif.write(level, subfiletype=1, tile=(256, 256), photometric="rgb")
    return levels


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """The test images plus the large pyramid (this module's ``stack`` serves this folder)."""
    folder = make_image_folder(tmp_path / "images")
    write_pyramid(folder / LARGE, large_he())
    return folder


def record_get_image(monkeypatch, provider) -> list[tuple]:
    """Every get_image the provider answers, as (image_id, region, level)."""
    calls = []
    original = provider.get_image

    def get_image(image_id, **kwargs):
        calls.append((image_id, kwargs.get("region"), kwargs.get("level", 0)))
        return original(image_id, **kwargs)

    monkeypatch.setattr(provider, "get_image", get_image)
    return calls


def tiles_of_view(extent, W: int, H: int) -> list[dict]:
    """The level-0 tile regions (512 x 512 from the top-left corner, cut at the image's edge) that an OpenLayers view
    extent [minx, miny, maxx, maxy] (y up) meets."""
    minx, miny, maxx, maxy = extent
    top, bottom = H - maxy, H - miny
    out = []
    for ty in range(max(0, int(top // TILE)), min(-(-H // TILE), int(np.ceil(bottom / TILE)))):
        for tx in range(max(0, int(minx // TILE)), min(-(-W // TILE), int(np.ceil(maxx / TILE)))):
            out.append({"x": tx * TILE, "y": ty * TILE, "width": min(TILE, W - tx * TILE),
                        "height": min(TILE, H - ty * TILE)})
    return out


# the tile layer's pixel (RGBA, or null while its tile is not loaded) and the page pixel of image points (rows down)
TILE_PIXELS = """([name, points]) => {
    const map = window[name].map;
    const H = map.getView().getProjection().getExtent()[3];
    const layer = window.colabelTiles.layerOf(map);
    const box = map.getTargetElement().getBoundingClientRect();
    return points.map(([x, y]) => {
        const pixel = map.getPixelFromCoordinate([x + 0.5, H - y - 0.5]);
        const data = layer && layer.getData(pixel);
        return {rgba: data ? Array.from(data) : null, page: [box.left + pixel[0], box.top + pixel[1]]};
    });
}"""


async def zoom_to(page, name: str, x: float, y: float, resolution: float) -> list[float]:
    """Centre the view on image point (x, y) at `resolution` image pixels per screen pixel; returns its extent."""
    return await page.evaluate("""([name, x, y, resolution]) => {
        const map = window[name].map;
        const view = map.getView();
        view.setCenter([x, view.getProjection().getExtent()[3] - y]);
        view.setResolution(resolution);
        map.renderSync();
        return view.calculateExtent(map.getSize());
    }""", [name, x, y, resolution])


def points_in(extent, H: int, n: int, seed: int) -> list[list[int]]:
    """n image pixels (x, y) in the middle half of the view."""
    minx, miny, maxx, maxy = extent
    rng = np.random.default_rng(seed)
    xs = rng.integers(int(minx + (maxx - minx) / 4), int(maxx - (maxx - minx) / 4), n)
    ys = rng.integers(int(H - maxy + (maxy - miny) / 4), int(H - miny - (maxy - miny) / 4), n)
    return [[int(x), int(y)] for x, y in zip(xs, ys, strict=True)]


async def shown_tile_pixels(page, name: str, points) -> list[dict]:
    await page.wait_for_function(f"(arg) => ({TILE_PIXELS})(arg).every((p) => p.rgba !== null)",
                                 arg=[name, points], timeout=60_000)
    await page.wait_for_timeout(400)  # the tiles fade in over 250 ms
    return await page.evaluate(TILE_PIXELS, [name, points])


@pytest.mark.e2e
@pytest.mark.asyncio(loop_scope="session")
async def test_zoomed_in_a_large_image_is_shown_from_level_0_tiles_and_a_polygon_drawn_there_is_saved_in_place(
        stack, page, monkeypatch, tmp_path):
    large = next(im for im in stack.provider.list_images() if im.name == LARGE)
    H, W = large.shape[:2]
    assert (H, W) == (2400, 6000) and large.levels == [[2400, 6000], [1200, 3000], [600, 1500]]
    level0 = large_he()
    level1 = halved(level0)
    calls = record_get_image(monkeypatch, stack.provider)
    session, secret = stack.provider.create_session(name="large", classes=CLASSES, image_ids=[large.image_id])
    await join(page, stack.services.share_url(secret), "Zoomer")

    # the whole image in view: its 3000 x 1250 overview only, loaded whole (as before), no tiles
    await page.wait_for_timeout(1000)
    assert [(c[1], c[2]) for c in calls if c[0] == large.image_id] == [(None, 1)]
    assert await page.evaluate("window.colabelTiles.log.requests.length") == 0
    assert await page.evaluate("window.colabel.map.getView().getResolution()") > 2  # coarser than the overview

    # zoomed in on the corner of four tiles, 4 screen pixels per image pixel: level-0 tiles of the view, each one
    # get_image call of a 512 x 512 region of level 0
    await page.mouse.move(1, 1)  # the draw tool's cursor dot stays off the map
    extent = await zoom_to(page, "colabel", 3072, 1024, 0.25)
    points = points_in(extent, H, 24, seed=1)
    shown = await shown_tile_pixels(page, "colabel", points)
    expected = tiles_of_view(extent, W, H)
    assert len(expected) == 4
    asked = [c[1] for c in calls if c[0] == large.image_id and c[2] == 0]
    assert sorted(asked, key=json.dumps) == sorted(expected, key=json.dumps)
    assert not [c for c in calls if c[0] == large.image_id and c[2] not in (0, 1)]

    # the tile layer holds level 0's pixels at those points (not the overview's), and the screen shows them
    assert [p["rgba"] for p in shown] == [[*level0[y, x].tolist(), 255] for x, y in points]
    assert sum(bool((level0[y, x] != level1[y // 2, x // 2]).any()) for x, y in points) >= len(points) // 2
    screen = np.asarray(Image.open(io.BytesIO(await page.screenshot())).convert("RGB"))
    on_screen = [screen[int(p["page"][1]), int(p["page"][0])].tolist() for p in shown]
    assert on_screen == [level0[y, x].tolist() for x, y in points]
    await screenshot(page, tmp_path, "tiles-level0")

    # a polygon drawn there, across the four tiles: saved where it was drawn, in level-0 image pixels
    corners = [(3020, 985), (3130, 990), (3125, 1065), (3015, 1060)]
    await draw_polygon(page, corners)
    await wait_saved(page, 1)
    sdir = stack.folder / "annotations" / "sessions" / session.session_id / "images" / large.image_id
    (geojson_file,) = sdir.glob("a-*/v000001.geojson")
    (feature,) = json.loads(geojson_file.read_text())["features"]
    ring = np.array(feature["geometry"]["coordinates"][0])
    assert len(ring) == 5
    for corner in corners:
        assert np.abs(ring - corner).max(axis=1).min() < 0.5, (corner, ring.tolist())

    # zoomed out a little, between levels 0 and 1 (1.5 image pixels per screen pixel): still level 0, the
    # finest level not shown enlarged; a whole view still asks nothing but tiles of level 0
    extent = await zoom_to(page, "colabel", 1500, 1700, 1.5)
    points = points_in(extent, H, 12, seed=2)
    shown = await shown_tile_pixels(page, "colabel", points)
    assert [p["rgba"] for p in shown] == [[*level0[y, x].tolist(), 255] for x, y in points]
    assert await page.evaluate("window.colabelTiles.levelForResolution(window.colabel.state.image, 1.5)") == 0
    asked = [c[1] for c in calls if c[0] == large.image_id and c[2] == 0]
    assert all(r in asked for r in tiles_of_view(extent, W, H))
    assert not [c for c in calls if c[0] == large.image_id and c[2] not in (0, 1)]


@pytest.mark.e2e
@pytest.mark.asyncio(loop_scope="session")
async def test_an_image_that_fits_is_still_loaded_whole_once_with_no_tiles(stack, page, monkeypatch):
    he = next(im for im in stack.provider.list_images() if im.name.endswith("he_histo.jpg"))
    calls = record_get_image(monkeypatch, stack.provider)
    session, secret = stack.provider.create_session(name="small", classes=CLASSES, image_ids=[he.image_id])
    await join(page, stack.services.share_url(secret), "Small")
    await zoom_to(page, "colabel", 250, 150, 0.1)
    await page.wait_for_timeout(1500)
    assert calls == [(he.image_id, None, 0)]
    assert await page.evaluate("window.colabelTiles.log.requests.length") == 0
    assert await page.evaluate("window.colabelTiles.layerOf(window.colabel.map)") is None


@pytest.mark.e2e
@pytest.mark.asyncio(loop_scope="session")
async def test_the_classification_page_shows_a_large_image_zoomed_in_from_level_0_tiles(stack, page, monkeypatch):
    large = next(im for im in stack.provider.list_images() if im.name == LARGE)
    H, W = large.shape[:2]
    level0 = large_he()
    calls = record_get_image(monkeypatch, stack.provider)
    session, secret = stack.provider.create_session(name="large cells", classes=CLASSES, mode="classification",
                                                    image_ids=[large.image_id])
    await join(page, stack.services.share_url(secret), "Cell Zoomer")  # no model services: the image alone
    await page.wait_for_selector("#classify-map canvas", state="visible", timeout=10_000)
    assert [(c[1], c[2]) for c in calls] == [(None, 1)]

    extent = await zoom_to(page, "colabelClassify", 5800, 2300, 0.5)  # the bottom-right corner: edge tiles
    points = points_in(extent, H, 16, seed=3)
    shown = await shown_tile_pixels(page, "colabelClassify", points)
    assert [p["rgba"] for p in shown] == [[*level0[y, x].tolist(), 255] for x, y in points]
    asked = [c[1] for c in calls if c[2] == 0]
    assert sorted(asked, key=json.dumps) == sorted(tiles_of_view(extent, W, H), key=json.dumps)
    assert {"x": 5632, "y": 2048, "width": 368, "height": 352} in asked


@pytest.mark.e2e
@pytest.mark.asyncio(loop_scope="session")
async def test_tiles_that_failed_to_load_leave_the_overview_and_are_asked_again_at_the_next_pan(
        stack, page, monkeypatch):
    from colabel.errors import StorageError

    large = next(im for im in stack.provider.list_images() if im.name == LARGE)
    H, W = large.shape[:2]
    level0 = large_he()
    failing = {"on": True}
    original = stack.provider.get_image

    def get_image(image_id, **kwargs):
        if failing["on"] and kwargs.get("level") == 0:
            raise StorageError("the slide's disk did not answer")
        return original(image_id, **kwargs)

    monkeypatch.setattr(stack.provider, "get_image", get_image)
    session, secret = stack.provider.create_session(name="flaky", classes=CLASSES, image_ids=[large.image_id])
    await join(page, stack.services.share_url(secret), "Patient Zoomer")
    extent = await zoom_to(page, "colabel", 2000, 600, 0.5)
    n_tiles = len(tiles_of_view(extent, W, H))
    await page.wait_for_function(f"window.colabelTiles.log.failed >= {n_tiles}", timeout=30_000)
    points = points_in(extent, H, 8, seed=4)
    assert all(p["rgba"] is None for p in await page.evaluate(TILE_PIXELS, ["colabel", points]))
    assert "did not answer" in await page.evaluate("window.colabelTiles.log.lastError")
    assert await page.evaluate("document.body.dataset.state") == "ready"  # the page works on, on the overview

    # the disk is back: nothing is asked until the view moves; a small pan asks for the view's tiles again
    failing["on"] = False
    await page.wait_for_timeout(1000)
    assert all(p["rgba"] is None for p in await page.evaluate(TILE_PIXELS, ["colabel", points]))
    await zoom_to(page, "colabel", 2010, 600, 0.5)
    shown = await shown_tile_pixels(page, "colabel", points)
    assert [p["rgba"] for p in shown] == [[*level0[y, x].tolist(), 255] for x, y in points]


NODE = shutil.which("node")

HELPERS = """
import { levelScales, tileLevels, levelForResolution, tileRequest, tilesInView } from "./src/tiles.js";
const out = input.images.map((image) => ({
  tileLevels: tileLevels(image).map((s) => s.level),
  levels: input.resolutions.map((r) => levelForResolution(image, r)),
  requests: input.tiles.map(([level, tx, ty]) => level < image.levels.length
    ? tileRequest(levelScales(image)[level], tx, ty) : "no such level"),
  inView: tilesInView(levelScales(image)[0], input.view),
}));
console.log(JSON.stringify(out));
"""


@pytest.mark.unit
@pytest.mark.skipif(NODE is None or not (WEB / "node_modules" / "ol").is_dir(),
                    reason="needs node and web/node_modules (npm --prefix web ci)")
def test_the_tile_helpers_pick_the_level_of_the_zoom_and_the_regions_of_each_tile():
    big = {"shape": [2400, 6000, 3], "dtype": "uint8", "channels": 3,
           "levels": [[2400, 6000], [1200, 3000], [600, 1500]]}
    # a whole-slide-sized image: levels of odd sizes (computed levels are ceil(H / 2**n)), overview level 4
    slide = {"shape": [50001, 70001, 3], "dtype": "uint8", "channels": 3,
             "levels": [[-(-50001 // 2 ** n), -(-70001 // 2 ** n)] for n in range(8)]}
    fits = {"shape": [300, 500, 3], "dtype": "uint8", "channels": 3, "levels": [[300, 500]]}
    data = {"images": [big, slide, fits], "resolutions": [40, 17, 16.1, 9, 3, 2, 1.99, 1.5, 1, 0.25],
            "tiles": [[0, 0, 0], [0, 11, 4], [0, 12, 0], [1, 5, 2], [1, 6, 0]],
            "view": {"x": 5000, "y": 2000, "width": 1000, "height": 400}}
    code = "import { readFileSync } from 'node:fs';\nconst input = JSON.parse(readFileSync(0, 'utf8'));\n" + HELPERS
    result = subprocess.run([NODE, "--input-type=module", "-e", code], input=json.dumps(data), cwd=WEB,
                            capture_output=True, text=True, timeout=60, check=True)
    big_out, slide_out, fits_out = json.loads(result.stdout)

    # 6000 x 2400: overview level 1 (3000 x 1200); tiles of level 0 below 2 image pixels per screen pixel
    assert big_out["tileLevels"] == [0]
    assert big_out["levels"] == [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]
    assert big_out["requests"][:3] == [
        {"region": {"x": 0, "y": 0, "width": 512, "height": 512}, "draw": [0, 0, 512, 512]},
        {"region": {"x": 5632, "y": 2048, "width": 368, "height": 352}, "draw": [0, 0, 368, 352]},  # the corner
        None]  # beyond the right edge
    assert big_out["inView"] == [[9, 3], [10, 3], [11, 3], [9, 4], [10, 4], [11, 4]]

    # the slide: overview level 5 (level 4, 4376 x 3126, is over 4096 px; 2188 x 1563 fits); levels 4..0 as tiles,
    # each from its own resolution down (fx a little under 2**n: the levels are rounded up)
    assert slide_out["tileLevels"] == [4, 3, 2, 1, 0]
    assert slide_out["levels"] == [5, 4, 4, 3, 1, 1, 0, 0, 0, 0]
    # level 1 (25001 rows, fy = 50001 / 25001): tile rows start at whole level rows and cover the tile exactly
    (x, y, w, h), draw = slide_out["requests"][3]["region"].values(), slide_out["requests"][3]["draw"]
    fx, fy = 70001 / 35001, 50001 / 25001
    assert (x, w) == (5 * 512, 512) and y <= 2 * 512 * fx / fy < y + 1 and h in (512, 513)
    assert draw[0] == 0 and draw[2] == 512 and -1 < draw[1] <= 0 and draw[1] + draw[3] >= 512
    assert abs(draw[1] - (y - 2 * 512 * fx / fy) * fy / fx) < 1e-9

    # an image that fits: no tile levels, level 0 at every zoom
    assert fits_out["tileLevels"] == [] and set(fits_out["levels"]) == {0}
