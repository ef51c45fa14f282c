// hypha-rpc ndarrays ({_rtype: "ndarray", _rvalue, _rshape: [h, w, c], _rdtype}) -> RGBA canvas.
const TYPED = {
  uint8: Uint8Array, int8: Int8Array, uint16: Uint16Array, int16: Int16Array, uint32: Uint32Array,
  int32: Int32Array, float32: Float32Array, float64: Float64Array, bool: Uint8Array,
};

export function typedPixels(arr) {
  const Typed = TYPED[arr._rdtype];
  if (!Typed) throw new Error(`pixels of type ${arr._rdtype} cannot be shown`);
  const bytes = arr._rvalue instanceof Uint8Array ? arr._rvalue : new Uint8Array(arr._rvalue);
  const copy = bytes.slice(); // aligned copy: the received view may start at any offset
  let [h, w, c] = arr._rshape;
  if (c === undefined) c = 1;
  return { data: new Typed(copy.buffer, 0, h * w * c), h, w, c, dtype: arr._rdtype };
}

/** The [lo, hi] percentiles of channel ch (sampled: at most ~200k values). */
function percentiles(data, c, ch, lo, hi) {
  const n = data.length / c;
  const step = Math.max(1, Math.floor(n / 200000));
  const sample = new Float64Array(Math.ceil(n / step));
  let k = 0;
  for (let i = 0; i < n; i += step) {
    const v = data[i * c + ch];
    if (Number.isFinite(v)) sample[k++] = v;
  }
  const s = sample.subarray(0, k).sort();
  if (!k) return [0, 1];
  const at = (p) => s[Math.min(k - 1, Math.max(0, Math.round((p / 100) * (k - 1))))];
  return [at(lo), at(hi)];
}

/** Per shown channel (at most 3) [lo, scale]: value v is shown as (v - lo) * scale, clipped to 0..255. */
function rangesOf({ data, c, dtype }) {
  const shown = Math.min(c, 3);
  const asIs = dtype === "uint8" && c >= 3;
  const ranges = [];
  for (let ch = 0; ch < shown; ch++) {
    const [lo, hi] = asIs ? [0, 255] : percentiles(data, c, ch, 0.5, 99.5);
    ranges.push([lo, hi > lo ? 255 / (hi - lo) : 0]);
  }
  return ranges;
}

/** The display ranges toCanvas gives `arr`: pass them to toCanvas for other pixels of the same image (the tiles
 * of a large image) so that they are shown alike, not each stretched by its own percentiles. */
export function displayRanges(arr) {
  return rangesOf(typedPixels(arr));
}

/** RGBA canvas: 8-bit RGB(A) as is; anything else scaled per channel from the 0.5 to 99.5 percentile (of `arr`,
 * or the given `ranges` from displayRanges). */
export function toCanvas(arr, ranges = null) {
  const typed = typedPixels(arr);
  const { data, h, w, c } = typed;
  const canvas = document.createElement("canvas");
  canvas.width = w;
  canvas.height = h;
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(w, h);
  const rgba = img.data;
  const shown = Math.min(c, 3);
  if (!ranges) ranges = rangesOf(typed);
  for (let p = 0, n = h * w; p < n; p++) {
    const src = p * c;
    const dst = p * 4;
    for (let ch = 0; ch < 3; ch++) {
      // grey -> all three; two channels -> red and green
      const from = shown === 1 ? 0 : ch;
      if (from >= shown) { rgba[dst + ch] = 0; continue; }
      const [lo, scale] = ranges[from];
      const v = (data[src + from] - lo) * scale;
      rgba[dst + ch] = v < 0 ? 0 : v > 255 ? 255 : v;
    }
    rgba[dst + 3] = 255;
  }
  ctx.putImageData(img, 0, 0);
  return canvas;
}

const BYTES = { uint8: 1, int8: 1, bool: 1, uint16: 2, int16: 2, uint32: 4, int32: 4, float32: 4, float64: 8 };

/** The finest level whose pixels stay under maxBytes and maxSide (levels: [[H, W], ...], level 0 first): the level
 * the pages load whole (the overview); when it is not level 0, the finer levels are shown as tiles (tiles.js). */
export function pickLevel(image, maxBytes = 48 * 2 ** 20, maxSide = 4096) {
  const per = (BYTES[image.dtype] || 8) * (image.channels || 1);
  const levels = image.levels && image.levels.length ? image.levels : [image.shape.slice(0, 2)];
  for (let i = 0; i < levels.length; i++) {
    const [h, w] = levels[i];
    if (h * w * per <= maxBytes && Math.max(h, w) <= maxSide) return i;
  }
  return levels.length - 1;
}
