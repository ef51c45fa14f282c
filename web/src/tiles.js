// Large images at full resolution. The pages show every image from one level loaded whole (`pickLevel`: the
// finest level within 4096 px a side and 48 MiB), an OpenLayers ImageStatic under the drawings. For an image
// larger than that (its level 0 does not fit), that level is only the overview: zoomed in beyond it, a tile layer
// on top of it shows the finer levels, each tile a `get_image(token, image_id, region, level)` call for a
// TILE_SIZE x TILE_SIZE region of the level that matches the zoom (region in pixels of that level), fetched for
// the tiles in view only. Coordinates do not change: the map stays in level-0 image pixels with y up (x, H - y),
// and a tile of level L covers the level-0 pixels its level pixels stand for (L's pixel = W / w by H / h of
// level 0, as the overview is stretched over [0, 0, W, H]).
//
// The helpers up to showTiles are pure (no DOM, no OpenLayers map): tests run them in Node.
import TileLayer from "ol/layer/Tile.js";
import ImageTile from "ol/source/ImageTile.js";
import TileGrid from "ol/tilegrid/TileGrid.js";
import { displayRanges, pickLevel, toCanvas } from "./pixels.js";

/** Tile side in pixels of its level (and in canvas pixels: one level pixel per canvas pixel). */
export const TILE_SIZE = 512;

/** Every level as {level, h, w, fx, fy}: its size, and how many level-0 pixels one of its pixels spans across
 * (fx = W / w) and down (fy = H / h). */
export function levelScales(image) {
  const [H, W] = image.shape;
  const levels = image.levels && image.levels.length ? image.levels : [[H, W]];
  return levels.map(([h, w], level) => ({ level, h, w, fx: W / w, fy: H / h }));
}

/** The levels shown as tiles, coarsest first (z = 0 of the tile grid is the first): the levels finer than the
 * overview, each coarser than the one before it; none when the overview is level 0 (the image fits whole). */
export function tileLevels(image, overview = pickLevel(image)) {
  const scales = levelScales(image);
  const out = [];
  for (const s of scales.slice(0, overview)) {
    if (s.fx < scales[overview].fx && (!out.length || s.fx > out[out.length - 1].fx)) out.push(s);
  }
  return out.reverse();
}

/** The level shown at a view resolution (level-0 pixels per CSS pixel): the overview from its own resolution on
 * (the tiles are hidden there), else the coarsest tile level with at least one of its pixels per screen pixel
 * (fx <= resolution), level 0 when zoomed in further. The tile layer picks its tiles the same way. */
export function levelForResolution(image, resolution, overview = pickLevel(image)) {
  const levels = tileLevels(image, overview);
  if (!levels.length || resolution >= levelScales(image)[overview].fx) return overview;
  const fit = levels.find((s) => s.fx <= resolution);
  return fit ? fit.level : levels[levels.length - 1].level;
}

/** What tile (tx, ty) of a tile level shows (tiles counted from the image's top-left corner, rows down; the tile
 * grid's resolution at that level is its fx): `region`, the pixels of the level to get (integers, inside the
 * level), and `draw`, where they go in the tile's size x size canvas ([left, top, width, height] in canvas pixels;
 * the part of a tile beyond the image stays transparent). null for a tile outside the image. */
export function tileRequest(scale, tx, ty, size = TILE_SIZE) {
  const { w, h, fx, fy } = scale;
  if (tx < 0 || ty < 0) return null;
  const x0 = tx * size;
  const x1 = Math.min(w, (tx + 1) * size);
  const top = (ty * size * fx) / fy; // the tile's top edge in rows of the level (fx = fy: ty * size)
  const y0 = Math.floor(top + 1e-9);
  const y1 = Math.min(h, Math.ceil(((ty + 1) * size * fx) / fy - 1e-9));
  if (x1 <= x0 || y1 <= y0) return null;
  return {
    region: { x: x0, y: y0, width: x1 - x0, height: y1 - y0 },
    draw: [0, ((y0 - top) * fy) / fx, x1 - x0, ((y1 - y0) * fy) / fx],
  };
}

/** The tiles [tx, ty] of a tile level that a view region (level-0 pixels {x, y, width, height}, rows down) meets. */
export function tilesInView(scale, region, size = TILE_SIZE) {
  const span = size * scale.fx; // level-0 pixels a tile spans, across and down
  const last = (v) => Math.ceil(v / span) - 1;
  const x0 = Math.max(0, Math.floor(region.x / span));
  const y0 = Math.max(0, Math.floor(region.y / span));
  const x1 = Math.min(last(scale.w * scale.fx), last(region.x + region.width));
  const y1 = Math.min(last(scale.h * scale.fy), last(region.y + region.height));
  const out = [];
  for (let ty = y0; ty <= y1; ty++) for (let tx = x0; tx <= x1; tx++) out.push([tx, ty]);
  return out;
}

/** The OpenLayers tile grid of the tile levels: origin the image's top-left corner (map [0, H]), z = index in
 * tileLevels, resolution = the level's fx. */
export function tileGridOf(image, levels) {
  const [H, W] = image.shape;
  return new TileGrid({ extent: [0, 0, W, H], origin: [0, H], resolutions: levels.map((s) => s.fx),
    tileSize: TILE_SIZE });
}

// -- the tile layer of a map ---------------------------------------------------------------------------------
const layers = new WeakMap(); // map -> its tile layer
const retries = new WeakMap(); // tile layer -> {pending: a tile failed since the last retry, n}
const MAX_LOGGED = 500;
/** For tests and debugging: the tile requests made ({image_id, level, region}), newest last, and failures. */
const log = { requests: [], failed: 0, lastError: "" };

/** Shows `image` on `map` from tiles above `base` (the layer of the overview) when the overview is not level 0;
 * otherwise, and for `opts` null (no image), takes the tiles away. `opts`: {image, overview (its level),
 * pixels (the overview's, for the display ranges), projection (the view's), fetch(region, level) (a promise of
 * the level's pixels of region, an ndarray)}. Returns the tile layer, or null. */
export function showTiles(map, base, opts) {
  let layer = layers.get(map) || null;
  const levels = opts ? tileLevels(opts.image, opts.overview) : [];
  if (!levels.length) {
    if (layer) layer.setSource(null);
    return null;
  }
  if (!layer) {
    // above the overview, under everything else: ordered by z-index (the layers' list keeps its order)
    base.setZIndex(-2);
    layer = new TileLayer({ zIndex: -1, cacheSize: 256 });
    map.addLayer(layer);
    layers.set(map, layer);
    const retry = { pending: false, n: 0 };
    retries.set(layer, retry);
    // OpenLayers keeps a failed tile as failed: after a failure, the next pan or zoom asks for the view's tiles
    // again (a new source key; the tiles shown stay until their new copies are in)
    map.on("moveend", () => {
      const source = layer.getSource();
      if (!retry.pending || !source) return;
      retry.pending = false;
      source.setKey(`retry-${++retry.n}`);
    });
  }
  const { image, overview, pixels, projection, fetch } = opts;
  const [H, W] = image.shape;
  const ranges = displayRanges(pixels); // tiles shown like the overview, not each stretched by its own percentiles
  const loader = async (z, tx, ty) => {
    const scale = levels[z];
    const request = tileRequest(scale, tx, ty);
    if (!request) throw new Error(`tile ${tx}, ${ty} of level ${scale.level} is outside the image`);
    log.requests.push({ image_id: image.image_id, level: scale.level, region: request.region });
    if (log.requests.length > MAX_LOGGED) log.requests.shift();
    let pixels;
    try {
      pixels = await fetch(request.region, scale.level);
    } catch (err) {
      log.failed++;
      log.lastError = String(err && err.message ? err.message : err);
      throw err; // the tile is not shown: the overview stays visible there, and the next pan or zoom asks again
    }
    const part = toCanvas(pixels, ranges);
    const canvas = document.createElement("canvas");
    canvas.width = canvas.height = TILE_SIZE;
    const ctx = canvas.getContext("2d");
    ctx.imageSmoothingEnabled = false; // the level's pixels as they are (stretched only where fy != fx)
    ctx.drawImage(part, 0, 0, part.width, part.height, ...request.draw);
    return canvas;
  };
  layer.setExtent([0, 0, W, H]);
  // hidden from the overview's resolution on: there the overview is as fine as the screen
  layer.setMaxResolution(levelScales(image)[overview].fx);
  const source = new ImageTile({
    loader, projection, tileGrid: tileGridOf(image, levels), wrapX: false,
    interpolate: false, // level 0 zoomed in: sharp pixels, as the ImageStatic of an image that fits shows them
    zDirection: -1, // the coarsest level with at least one pixel per screen pixel (levelForResolution)
  });
  const retry = retries.get(layer);
  retry.pending = false;
  source.on("tileloaderror", () => { retry.pending = true; });
  layer.setSource(source);
  return layer;
}

// for tests and debugging
if (typeof window !== "undefined") {
  window.colabelTiles = {
    log, levelScales, tileLevels, levelForResolution, tileRequest, tilesInView, TILE_SIZE,
    layerOf: (map) => layers.get(map) || null,
  };
}
