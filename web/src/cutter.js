// The polygon cutter (pure geometry on coordinate arrays, no OpenLayers): split polygons along a drawn line,
// or subtract a drawn polygon. Polygons are GeoJSON-style coordinate arrays: Polygon [ring, ...holes],
// MultiPolygon [[ring, ...], ...]; any consistent x/y frame (image or map pixels).
import polygonClipping from "polygon-clipping";

/** Polygons of a Polygon or MultiPolygon coordinate array, as a MultiPolygon coordinate array. */
function asMulti(geometry) {
  return geometry.type === "MultiPolygon" ? geometry.coordinates : [geometry.coordinates];
}

/**
 * A thin polygon (a MultiPolygon coordinate array) around a polyline: one quad per segment and a small
 * square at each vertex, half-width `halfWidth`; segments are extended by `halfWidth` at both ends.
 */
export function lineBand(line, halfWidth) {
  const parts = [];
  for (let i = 0; i + 1 < line.length; i++) {
    const [ax, ay] = line[i];
    const [bx, by] = line[i + 1];
    const len = Math.hypot(bx - ax, by - ay);
    if (!len) continue;
    const ux = ((bx - ax) / len) * halfWidth;
    const uy = ((by - ay) / len) * halfWidth;
    const [px, py] = [-uy, ux];
    const a = [ax - ux, ay - uy];
    const b = [bx + ux, by + uy];
    parts.push([[
      [a[0] + px, a[1] + py], [b[0] + px, b[1] + py], [b[0] - px, b[1] - py], [a[0] - px, a[1] - py],
      [a[0] + px, a[1] + py],
    ]]);
  }
  for (const [x, y] of line) {
    const d = halfWidth;
    parts.push([[[x - d, y - d], [x + d, y - d], [x + d, y + d], [x - d, y + d], [x - d, y - d]]]);
  }
  return parts.length > 1 ? polygonClipping.union(...parts) : parts;
}

/**
 * Split a polygon along a polyline that crosses it.
 * @param {{type: "Polygon"|"MultiPolygon", coordinates}} geometry
 * @param {number[][]} line [[x, y], ...] at least 2 points
 * @param {number} [gap] width of the cut (same units), default 0.1
 * @returns {number[][][][]|null} the pieces as Polygon coordinate arrays (>= 2), or null when the line does
 *   not cut the polygon into pieces
 */
export function splitByLine(geometry, line, gap = 0.1) {
  if (line.length < 2) return null;
  const before = asMulti(geometry);
  const pieces = polygonClipping.difference(before, lineBand(line, gap / 2));
  return pieces.length > before.length ? pieces : null;
}

/**
 * Subtract a polygon (Polygon coordinate array) from a geometry.
 * @returns {number[][][][]|null} the remaining pieces as Polygon coordinate arrays ([] when nothing is left),
 *   or null when they do not overlap
 */
export function subtractPolygon(geometry, polygon) {
  const before = asMulti(geometry);
  if (!polygonClipping.intersection(before, polygon).length) return null;
  return polygonClipping.difference(before, polygon);
}

/**
 * True when a line that does not split the geometry still meets its area or outline (it crosses an edge, or lies
 * inside): the annotator aimed at this polygon, but the line must go across it from side to side.
 */
export function lineTouches(geometry, line, gap = 0.1) {
  if (line.length < 2) return false;
  return polygonClipping.intersection(asMulti(geometry), lineBand(line, gap / 2)).length > 0;
}

// -- validity of hand-drawn and edited outlines ---------------------------------------------------------------

/** A ring's distinct vertices, in order: consecutive repeats and the closing vertex dropped. */
function openRing(ring) {
  const out = [];
  for (const p of ring) {
    const last = out[out.length - 1];
    if (!last || last[0] !== p[0] || last[1] !== p[1]) out.push(p);
  }
  while (out.length > 1 && out[0][0] === out[out.length - 1][0] && out[0][1] === out[out.length - 1][1]) out.pop();
  return out;
}

const cross = (o, a, b) => (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0]);
const within = (a, b, p) => Math.min(a[0], b[0]) <= p[0] && p[0] <= Math.max(a[0], b[0])
  && Math.min(a[1], b[1]) <= p[1] && p[1] <= Math.max(a[1], b[1]);

/** How segments ab and cd meet: "none", "touch" (at one point, an end of one on the other) or "cross"
 * (a proper crossing, or a collinear overlap longer than a point). */
function meet(a, b, c, d) {
  const d1 = cross(c, d, a);
  const d2 = cross(c, d, b);
  const d3 = cross(a, b, c);
  const d4 = cross(a, b, d);
  if (((d1 > 0 && d2 < 0) || (d1 < 0 && d2 > 0)) && ((d3 > 0 && d4 < 0) || (d3 < 0 && d4 > 0))) return "cross";
  if (d1 === 0 && d2 === 0 && d3 === 0 && d4 === 0) { // collinear: overlapping over a length, at a point, or apart
    const horizontal = Math.abs(b[0] - a[0]) >= Math.abs(b[1] - a[1]);
    const k = horizontal ? 0 : 1;
    const lo = Math.max(Math.min(a[k], b[k]), Math.min(c[k], d[k]));
    const hi = Math.min(Math.max(a[k], b[k]), Math.max(c[k], d[k]));
    return hi > lo ? "cross" : hi === lo ? "touch" : "none";
  }
  if ((d1 === 0 && within(c, d, a)) || (d2 === 0 && within(c, d, b))
    || (d3 === 0 && within(a, b, c)) || (d4 === 0 && within(a, b, d))) return "touch";
  return "none";
}

/**
 * Why a Polygon or MultiPolygon is not a valid outline, or null when it is: "crossing" (a ring crosses or
 * touches itself, doubles back on itself, or crosses another ring) or "degenerate" (a ring of fewer than 3
 * distinct vertices, or of no area). The checks the provider makes on a saved outline, short of where holes
 * and parts lie (a hole drawn outside its polygon without crossing it is not seen here).
 */
export function outlineProblem(geometry) {
  const segments = [];
  let ringIndex = 0;
  let degenerate = false;
  for (const polygon of asMulti(geometry)) {
    for (const ring of polygon) {
      const v = openRing(ring);
      if (v.length < 3) { degenerate = true; continue; }
      let area = 0;
      for (let i = 0; i < v.length; i++) area += cross([0, 0], v[i], v[(i + 1) % v.length]);
      if (area === 0) degenerate = true; // a bow tie's halves cancel out too: a crossing, said first
      for (let i = 0; i < v.length; i++) {
        const a = v[i];
        const b = v[(i + 1) % v.length];
        segments.push({ ring: ringIndex, n: v.length, i, a, b, x0: Math.min(a[0], b[0]), x1: Math.max(a[0], b[0]) });
      }
      ringIndex++;
    }
  }
  // sweep along x: only segments whose x ranges overlap are compared
  segments.sort((s, t) => s.x0 - t.x0);
  let active = [];
  for (const s of segments) {
    active = active.filter((t) => t.x1 >= s.x0);
    for (const t of active) {
      if (s.ring === t.ring) {
        const next = (t.i + 1) % t.n === s.i;
        const prev = (s.i + 1) % s.n === t.i;
        if (next || prev) { // neighbours share a vertex: the ring must not double back along them
          const [first, second] = next ? [t, s] : [s, t];
          const shared = first.b;
          const [p, q] = [first.a, second.b];
          if (cross(shared, p, q) === 0
            && (p[0] - shared[0]) * (q[0] - shared[0]) + (p[1] - shared[1]) * (q[1] - shared[1]) > 0) return "crossing";
          continue;
        }
        if (meet(s.a, s.b, t.a, t.b) !== "none") return "crossing"; // a ring may not touch itself
      } else if (meet(s.a, s.b, t.a, t.b) === "cross") return "crossing"; // rings may touch, not cross
    }
    active.push(s);
  }
  return degenerate ? "degenerate" : null;
}

/**
 * The area a crossing outline encloses (non-zero rule) as a valid MultiPolygon coordinate array, possibly
 * of several polygons (a bow tie: its two triangles), or [] when it encloses none.
 */
export function repairOutline(geometry) {
  return polygonClipping.union(asMulti(geometry));
}

/** The part of a Polygon or MultiPolygon inside the rectangle [x0, x1] × [y0, y1], as a MultiPolygon
 * coordinate array ([] when none is). */
export function clipToRectangle(geometry, [x0, y0, x1, y1]) {
  return polygonClipping.intersection(asMulti(geometry), [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]);
}
