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
