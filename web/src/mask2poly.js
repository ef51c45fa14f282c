// Binary mask -> GeoJSON polygon geometry in image pixel coordinates (pure functions, no DOM).
//
// Conventions as on the server (colabel.coords): [x, y] with x = column, y = row, origin at the top-left
// corner of the top-left pixel; pixel (r, c) covers [c, c + 1) x [r, r + 1). Outlines follow the pixel edges
// (crack following), so a single pixel becomes its unit square, then Douglas-Peucker simplification, then
// polygon-clipping's union makes the result valid (a traced ring may touch itself where pixels meet corner to
// corner, and simplification may make it cross itself).
import polygonClipping from "polygon-clipping";

/**
 * 4-connected components of a mask.
 * @param {Uint8Array} mask (h * w) row-major, non-zero = object
 * @returns {{labels: Int32Array, sizes: number[]}} labels (h * w), 0 = background, 1..n; sizes[k] pixels of k
 */
export function components(mask, w, h) {
  const labels = new Int32Array(w * h);
  const sizes = [0];
  const stack = new Int32Array(w * h);
  for (let start = 0; start < w * h; start++) {
    if (!mask[start] || labels[start]) continue;
    const k = sizes.length;
    let top = 0;
    let size = 0;
    stack[top++] = start;
    labels[start] = k;
    while (top) {
      const p = stack[--top];
      size++;
      const r = (p / w) | 0;
      const c = p - r * w;
      if (c > 0 && mask[p - 1] && !labels[p - 1]) { labels[p - 1] = k; stack[top++] = p - 1; }
      if (c < w - 1 && mask[p + 1] && !labels[p + 1]) { labels[p + 1] = k; stack[top++] = p + 1; }
      if (r > 0 && mask[p - w] && !labels[p - w]) { labels[p - w] = k; stack[top++] = p - w; }
      if (r < h - 1 && mask[p + w] && !labels[p + w]) { labels[p + w] = k; stack[top++] = p + w; }
    }
    sizes.push(size);
  }
  return { labels, sizes };
}

/**
 * The outer boundary of component k, traced along pixel edges with the object on the right-hand side.
 * @returns {number[][]} closed ring [[x, y], ...] (first == last), vertices at pixel corners only where it turns
 */
export function traceOuter(labels, w, h, k) {
  const start = labels.indexOf(k);
  if (start < 0) return [];
  const inside = (r, c) => r >= 0 && r < h && c >= 0 && c < w && labels[r * w + c] === k;
  const x0 = start % w;
  const y0 = (start / w) | 0;
  let x = x0;
  let y = y0;
  let dx = 1;
  let dy = 0; // east along the top edge of the first pixel (raster order): object below = on the right
  const ring = [[x0, y0]];
  const limit = 4 * (w + 1) * (h + 1);
  for (let steps = 0; steps < limit; steps++) {
    x += dx;
    y += dy;
    if (x === x0 && y === y0) break;
    // the two pixels ahead of vertex (x, y): right-hand normal (-dy, dx)
    const nx = -dy;
    const ny = dx;
    const right = inside(Math.floor(y + (dy + ny) / 2), Math.floor(x + (dx + nx) / 2));
    const left = inside(Math.floor(y + (dy - ny) / 2), Math.floor(x + (dx - nx) / 2));
    let ndx = dx;
    let ndy = dy;
    if (!right) { ndx = -dy; ndy = dx; } // turn right (4-connectivity: a diagonal pixel is not ours)
    else if (left) { ndx = dy; ndy = -dx; } // turn left
    if (ndx !== dx || ndy !== dy) ring.push([x, y]);
    dx = ndx;
    dy = ndy;
  }
  ring.push([x0, y0]);
  return ring;
}

function segmentDistance(p, a, b) {
  const vx = b[0] - a[0];
  const vy = b[1] - a[1];
  const len2 = vx * vx + vy * vy;
  let t = len2 ? ((p[0] - a[0]) * vx + (p[1] - a[1]) * vy) / len2 : 0;
  t = Math.max(0, Math.min(1, t));
  return Math.hypot(p[0] - a[0] - t * vx, p[1] - a[1] - t * vy);
}

/** Douglas-Peucker on an open polyline; tolerance in pixels. */
export function simplifyLine(points, tolerance) {
  if (points.length <= 2) return points.slice();
  const keep = new Uint8Array(points.length);
  keep[0] = keep[points.length - 1] = 1;
  const stack = [[0, points.length - 1]];
  while (stack.length) {
    const [i, j] = stack.pop();
    let worst = -1;
    let at = -1;
    for (let m = i + 1; m < j; m++) {
      const d = segmentDistance(points[m], points[i], points[j]);
      if (d > worst) { worst = d; at = m; }
    }
    if (worst > tolerance) {
      keep[at] = 1;
      stack.push([i, at], [at, j]);
    }
  }
  return points.filter((_, i) => keep[i]);
}

/** Simplify a closed ring (first == last), split at its farthest vertex from the start; keeps >= 4 points. */
export function simplifyRing(ring, tolerance) {
  if (ring.length <= 5 || tolerance <= 0) return ring.slice();
  let far = 1;
  let best = -1;
  for (let i = 1; i < ring.length - 1; i++) {
    const d = Math.hypot(ring[i][0] - ring[0][0], ring[i][1] - ring[0][1]);
    if (d > best) { best = d; far = i; }
  }
  const a = simplifyLine(ring.slice(0, far + 1), tolerance);
  const b = simplifyLine(ring.slice(far), tolerance);
  const out = a.concat(b.slice(1));
  return out.length >= 4 ? out : ring.slice();
}

/**
 * The object a SAM mask shows, as GeoJSON geometry: the 4-connected parts holding a positive point, else the
 * largest part, each by its outer boundary (holes are not kept).
 * @param {Uint8Array|Float32Array} mask (h * w) row-major; > threshold = object
 * @param {number} w, h image width and height (pixels)
 * @param {number[][]} positives [[x, y], ...] positive points (image pixels)
 * @returns {object|null} {type: "Polygon"|"MultiPolygon", coordinates} or null when the mask is empty
 */
export function maskToGeometry(mask, w, h, { positives = [], threshold = 0, tolerance = 0.5 } = {}) {
  const bin = new Uint8Array(w * h);
  let any = false;
  for (let i = 0; i < w * h; i++) if (mask[i] > threshold) { bin[i] = 1; any = true; }
  if (!any) return null;
  const { labels, sizes } = components(bin, w, h);
  const keep = new Set();
  for (const [x, y] of positives) {
    const r = Math.min(h - 1, Math.max(0, Math.floor(y)));
    const c = Math.min(w - 1, Math.max(0, Math.floor(x)));
    if (labels[r * w + c]) keep.add(labels[r * w + c]);
  }
  if (!keep.size) {
    let largest = 1;
    for (let k = 2; k < sizes.length; k++) if (sizes[k] > sizes[largest]) largest = k;
    keep.add(largest);
  }
  const rings = [...keep].sort((a, b) => a - b).map((k) => simplifyRing(traceOuter(labels, w, h, k), tolerance));
  const polygons = polygonClipping.union(...rings.map((r) => [r]));
  if (!polygons.length) return null;
  if (polygons.length === 1) return { type: "Polygon", coordinates: polygons[0] };
  return { type: "MultiPolygon", coordinates: polygons };
}
