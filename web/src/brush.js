// The brush (pure geometry on coordinate arrays, no OpenLayers), as QuPath's: the area a round brush sweeps along
// a pointer path, painted onto a polygon (or a new one) or erased from the polygons it covers. Coordinates are in
// any consistent x/y frame (image or map pixels); results are GeoJSON-style MultiPolygon coordinate arrays.
import polygonClipping from "polygon-clipping";

/** Sides of the polygon that stands for the brush's disc: within 0.9 % of the radius of the true circle. */
export const DISC_SIDES = 24;

/** A closed ring of `sides` vertices on the circle of radius `r` around (x, y). */
function disc([x, y], r, sides) {
  const ring = [];
  for (let i = 0; i < sides; i++) {
    const a = (2 * Math.PI * i) / sides;
    ring.push([x + r * Math.cos(a), y + r * Math.sin(a)]);
  }
  ring.push(ring[0]);
  return ring;
}

/** The path's points, thinned so that kept points are at least `step` apart (the last point always kept). */
export function thinPath(path, step) {
  const kept = [];
  for (const p of path) {
    const last = kept[kept.length - 1];
    if (!last || Math.hypot(p[0] - last[0], p[1] - last[1]) >= step) kept.push(p);
  }
  const end = path[path.length - 1];
  const last = kept[kept.length - 1];
  if (end && (end[0] !== last[0] || end[1] !== last[1])) kept.push(end);
  return kept;
}

/**
 * The area a round brush of radius `radius` sweeps along `path` ([[x, y], ...], at least one point): a disc at
 * each point and a band as wide as the disc between consecutive points, united.
 * @returns {number[][][][]} a MultiPolygon coordinate array ([] for an empty path or a radius <= 0)
 */
export function strokeArea(path, radius, sides = DISC_SIDES) {
  if (!path.length || !(radius > 0)) return [];
  const points = thinPath(path, radius / 4); // a point skipped is within r/4 of one kept
  const half = radius * Math.cos(Math.PI / sides); // the disc polygon's inner radius: the band never bulges out
  const parts = points.map((p) => [disc(p, radius, sides)]);
  for (let i = 0; i + 1 < points.length; i++) {
    const [ax, ay] = points[i];
    const [bx, by] = points[i + 1];
    const len = Math.hypot(bx - ax, by - ay);
    const [px, py] = [(-(by - ay) / len) * half, ((bx - ax) / len) * half];
    parts.push([[[ax + px, ay + py], [bx + px, by + py], [bx - px, by - py], [ax - px, ay - py], [ax + px, ay + py]]]);
  }
  return polygonClipping.union(...parts);
}

/** Polygons of a Polygon or MultiPolygon geometry, as a MultiPolygon coordinate array. */
function asMulti(geometry) {
  return geometry.type === "MultiPolygon" ? geometry.coordinates : [geometry.coordinates];
}

/**
 * Paint a stroke (MultiPolygon coordinate array, from :func:`strokeArea`) onto a geometry.
 * @returns {number[][][][]} the geometry and the stroke united, a MultiPolygon coordinate array
 */
export function paint(geometry, stroke) {
  return polygonClipping.union(asMulti(geometry), stroke);
}

/**
 * Erase a stroke from a geometry.
 * @returns {number[][][][]|null} what is left as Polygon coordinate arrays ([] when nothing is), or null when the
 *   stroke does not overlap the geometry
 */
export function erase(geometry, stroke) {
  const before = asMulti(geometry);
  if (!polygonClipping.intersection(before, stroke).length) return null;
  return polygonClipping.difference(before, stroke);
}

/** Whether (x, y) lies inside a Polygon or MultiPolygon geometry (even-odd over all rings: holes excluded). */
export function containsPoint(geometry, [x, y]) {
  let inside = false;
  for (const polygon of asMulti(geometry)) {
    for (const ring of polygon) {
      for (let i = 0, j = ring.length - 1; i < ring.length; j = i++) {
        const [xi, yi] = ring[i];
        const [xj, yj] = ring[j];
        if ((yi > y) !== (yj > y) && x < ((xj - xi) * (y - yi)) / (yj - yi) + xi) inside = !inside;
      }
    }
  }
  return inside;
}
