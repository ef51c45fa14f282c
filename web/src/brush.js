// The brush (pure geometry on coordinate arrays, no OpenLayers), as QuPath's: the area a round brush sweeps along
// a pointer path, painted onto a polygon (or a new one) or erased from the polygons it covers. Coordinates are in
// any consistent x/y frame (image or map pixels); results are GeoJSON-style MultiPolygon coordinate arrays.
//
// Clipper (Angus Johnson's, in integer coordinates) does the work: its offset of an open path with round ends and
// joins is the brush's area, and its boolean operations stay exact where a stroke's edges run along each other
// (floating-point sweep lines fail on such input, and a scrubbed stroke is nothing but).
import ClipperLib from "clipper-lib";
import { outlineProblem, repairOutline } from "./cutter.js";

/** Clipper's integer units per coordinate unit: 1/1024 px. */
export const SCALE = 1024;
/** Most a curve of the brush's outline strays from the true circle, as a fraction of the radius (1 %). */
const ARC_TOLERANCE = 0.01;

const toPath = (ring) => ring.map(([x, y]) => ({ X: Math.round(x * SCALE), Y: Math.round(y * SCALE) }));

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

/** A closed coordinate ring of a Clipper path. */
function toRing(path) {
  const ring = path.map((p) => [p.X / SCALE, p.Y / SCALE]);
  ring.push(ring[0]);
  return ring;
}

/** A Clipper PolyTree as a MultiPolygon coordinate array: each outer ring with its holes (islands in holes are
 * polygons of their own). */
function fromTree(tree) {
  const polygons = [];
  const visit = (outer) => { // a polygon before the islands in its holes: the first piece keeps an erased one's id
    const polygon = [toRing(outer.Contour())];
    polygons.push(polygon);
    for (const hole of outer.Childs()) polygon.push(toRing(hole.Contour()));
    for (const hole of outer.Childs()) for (const island of hole.Childs()) visit(island);
  };
  for (const outer of tree.Childs()) visit(outer);
  return polygons;
}

/** Every ring of a Polygon or MultiPolygon geometry (or a MultiPolygon coordinate array) as Clipper paths. */
function toPaths(geometry) {
  const polygons = Array.isArray(geometry) ? geometry
    : geometry.type === "MultiPolygon" ? geometry.coordinates : [geometry.coordinates];
  return polygons.flatMap((polygon) => polygon.map((ring) => toPath(ring.slice(0, -1))));
}

/** ``subject op clip`` (Clipper's ClipType; clip may be null) as a MultiPolygon coordinate array; the inputs are
 * Clipper paths filled by `fill`. The output is strictly simple: no ring touches itself or another at a vertex,
 * which OGC validity (the provider's shapely check) forbids and Clipper otherwise allows. */
function booleanPaths(op, subject, clip, fill = ClipperLib.PolyFillType.pftEvenOdd) {
  const clipper = new ClipperLib.Clipper();
  clipper.StrictlySimple = true;
  clipper.AddPaths(subject, ClipperLib.PolyType.ptSubject, true);
  if (clip) clipper.AddPaths(clip, ClipperLib.PolyType.ptClip, true);
  const tree = new ClipperLib.PolyTree();
  clipper.Execute(op, tree, fill, fill);
  const parts = fromTree(tree);
  // strictly simple output still has a ring touch itself at a vertex about once in a few hundred scrubbed strokes:
  // mended as the page mends a drawn outline
  const geometry = { type: "MultiPolygon", coordinates: parts };
  return outlineProblem(geometry) ? repairOutline(geometry) : parts;
}

/** ``subject op clip`` of two sets of valid polygons (geometries or MultiPolygon coordinate arrays). */
function boolean(op, subject, clip) {
  return booleanPaths(op, toPaths(subject), toPaths(clip));
}

/**
 * The area a round brush of radius `radius` sweeps along `path` ([[x, y], ...], at least one point): the path
 * offset by the radius with round ends and joins (a single point: a disc).
 * @returns {number[][][][]} a MultiPolygon coordinate array ([] for an empty path or a radius <= 0)
 */
export function strokeArea(path, radius) {
  if (!path.length || !(radius > 0)) return [];
  const points = thinPath(path, radius / 8); // closer points change the outline by < 1 % of the radius
  const offset = new ClipperLib.ClipperOffset(2, Math.max(1, ARC_TOLERANCE * radius * SCALE));
  offset.AddPath(toPath(points), ClipperLib.JoinType.jtRound, ClipperLib.EndType.etOpenRound);
  const paths = new ClipperLib.Paths();
  offset.Execute(paths, radius * SCALE);
  return booleanPaths(ClipperLib.ClipType.ctUnion, paths, null, ClipperLib.PolyFillType.pftNonZero);
}

/**
 * Paint a stroke (MultiPolygon coordinate array, from {@link strokeArea}) onto a geometry.
 * @returns {number[][][][]} the geometry and the stroke united, a MultiPolygon coordinate array
 */
export function paint(geometry, stroke) {
  return boolean(ClipperLib.ClipType.ctUnion, geometry, stroke);
}

/**
 * Erase a stroke from a geometry.
 * @returns {number[][][][]|null} what is left as Polygon coordinate arrays ([] when nothing is), or null when the
 *   stroke does not overlap the geometry
 */
export function erase(geometry, stroke) {
  if (!boolean(ClipperLib.ClipType.ctIntersection, geometry, stroke).length) return null;
  return boolean(ClipperLib.ClipType.ctDifference, geometry, stroke);
}

/** Whether (x, y) lies inside a Polygon or MultiPolygon geometry (even-odd over all rings: holes excluded). */
export function containsPoint(geometry, [x, y]) {
  let inside = false;
  for (const polygon of geometry.type === "MultiPolygon" ? geometry.coordinates : [geometry.coordinates]) {
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
