// The annotator page (the share URL): join once, get images one by one, draw classified polygons (by hand,
// with SAM points and boxes, a brush and eraser, cut and subtract), every change saved as a new version of the whole
// FeatureCollection (autosave with retry, on a new connection after a server restart; the unsaved drawing kept in
// localStorage until the server has it), undo/redo.
import "ol/ol.css";
import "./annotate.css";
import Map from "ol/Map.js";
import View from "ol/View.js";
import Feature from "ol/Feature.js";
import ImageLayer from "ol/layer/Image.js";
import VectorLayer from "ol/layer/Vector.js";
import ImageStatic from "ol/source/ImageStatic.js";
import VectorSource from "ol/source/Vector.js";
import Projection from "ol/proj/Projection.js";
import Point from "ol/geom/Point.js";
import Polygon, { fromExtent } from "ol/geom/Polygon.js";
import MultiPolygon from "ol/geom/MultiPolygon.js";
import LineString from "ol/geom/LineString.js";
import CircleGeometry from "ol/geom/Circle.js";
import PointerInteraction from "ol/interaction/Pointer.js";
import Draw from "ol/interaction/Draw.js";
import DragBox from "ol/interaction/DragBox.js";
import Modify from "ol/interaction/Modify.js";
import Select from "ol/interaction/Select.js";
import DoubleClickZoom from "ol/interaction/DoubleClickZoom.js";
import { defaults as defaultInteractions } from "ol/interaction/defaults.js";
import { Circle as CircleStyle, Fill, Stroke, Style } from "ol/style.js";
import { getCenter, intersects } from "ol/extent.js";
import { click, shiftKeyOnly } from "ol/events/condition.js";
import { connect, errorText, el, pageContext, textColorOn } from "./common.js";
import { pickLevel, toCanvas } from "./pixels.js";
import { showTiles } from "./tiles.js";
import { History } from "./history.js";
import { AutoSaver } from "./autosave.js";
import { clipToRectangle, lineTouches, outlineProblem, repairOutline, splitByLine, subtractPolygon } from "./cutter.js";
import { maskToGeometry } from "./mask2poly.js";
import { containsPoint, erase, paint, strokeArea } from "./brush.js";
import { BrowserDecoder, loadOrt } from "./samdecoder.js";

const $ = (id) => document.getElementById(id);
const TOOLS = ["draw", "edit", "sam", "brush", "cut", "subtract"];
const TIMEOUT = { default: 30_000, image: 120_000, sam: 60_000, samLoad: 180_000 }; // ms
const SLOW_MS = 5_000;
// larger images are decoded on the server, in tiles at the model's resolution, rather than from one
// whole-image embedding downscaled to the model input (1024 px for the published models)
const BROWSER_SAM_MAX_SIDE = 2048;
// the colabel sentence of an error raised by the provider (not a transport failure: never retried as one)
const COLABEL_ERROR = new RegExp("^(ColabelError|NotFoundError|InvalidInputError|PayloadTooLargeError|AccessDeniedError|"
  + "SessionClosedError|UnreadableImageError|ModelServiceUnavailable|ConflictError|StorageError|internal error)\\b");
// errors a retry cannot mend: saves stop, and the annotator is told (with the drawing to download); a conflict
// (another tab or client of this annotator saved the image since this drawing's version) asks which to keep; a
// drawing the provider refuses (a polygon it cannot take) waits for the annotator to fix it: the next change saves
const FINAL_ERROR = new RegExp("^(AccessDeniedError|SessionClosedError|ConflictError|InvalidInputError|"
  + "PayloadTooLargeError|UnreadableImageError)\\b");
const CONFLICT = /^ConflictError\b/;
const INVALID = /^(InvalidInputError|PayloadTooLargeError|UnreadableImageError)\b/;
// the browser knows it has no network: saves wait for the `online` event instead of a call that cannot answer
const OFFLINE = "offline: kept in this browser, saved when back online";
// the Hypha connection itself is gone (a restarted server refuses the old connection's token): a fresh one
const DEAD_CONNECTION = /Authentication error|Signature verification|Connection is closed|ConnectionAbortedError/i;
// a model service that is not running, or cannot load its model (no weights on the server, no such file); not a
// transient failure (a call that timed out or a service briefly unreachable), after which SAM is tried again
const MODEL_UNAVAILABLE = new RegExp("^(ModelServiceUnavailable: (the \\w+ model service is not running|.*\\bWeightsUnavailableError\\b)"
  + "|NotFoundError: (checkpoint file|unknown SAM model))");
const state = {
  ctx: null, server: null, annotate: null, key: null, session: null, classes: [], current: 0,
  image: null, W: 0, H: 0, version: 0, tool: "draw", toolSince: 0,
  brushRadius: 12, // the brush's radius in screen pixels: as large on screen at any zoom, as QuPath's
  stroke: null, // the brush stroke being painted: {points, erase, radius (map units), target}
  labelsHidden: false, fill: true, // H hides the drawing to see the image under it; F: outlines only
  sam: { points: [], labels: [], box: null, feature: null, seq: 0 },
  samPath: null, decoder: null, options: {}, annotatorId: null, restored: false, samOff: false, assignment: null,
  // this tab's writer id, sent with each save: the provider tells this tab's own saves (whose answers were lost)
  // from another tab's, so a retry drawn on since is no conflict (a restored drawing takes the id it was kept with)
  writer: Array.from(crypto.getRandomValues(new Uint8Array(8)), (b) => b.toString(16).padStart(2, "0")).join(""),
};
let uid = 0;
const newId = () => `f${Date.now().toString(36)}-${uid++}`;

function message(text, isError = false) {
  const box = $("message");
  box.hidden = !text;
  box.textContent = text || "";
  box.classList.toggle("error", isError);
}

let noteTimer = null;
/** A passing remark (SAM found nothing, a cut missed...): shown for a few seconds, the save status untouched. */
function note(text, isError = false) {
  message(text, isError);
  clearTimeout(noteTimer);
  noteTimer = setTimeout(() => { if ($("message").textContent === text) message(""); }, 4000);
}

/** Header text that may be cut off with an ellipsis: the full text in its tooltip too. */
function setText(id, text) {
  const node = $(id);
  node.textContent = text;
  node.title = text;
}

function saveStatus(text, kind = "") {
  const s = $("save-status");
  setText("save-status", text);
  s.classList.toggle("error", kind === "failed" || kind === "offline");
  s.dataset.state = kind;
}

// -- calls: time limits, and the service found again after the provider reconnects ---------------
function withTimeout(promise, ms, what) {
  let timer;
  const late = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`the server did not answer ${what} within ${ms / 1000} s`)), ms);
  });
  return Promise.race([promise, late]).finally(() => clearTimeout(timer));
}

let serviceOn = null; // the connection state.annotate was found on
async function refreshService(timeout = TIMEOUT.default) {
  const id = `${state.ctx.workspace}/${state.ctx.name}-annotate`;
  const server = state.server;
  state.annotate = await withTimeout(server.getService(id), timeout, "getService");
  serviceOn = server;
}

/** A new Hypha connection (the page's first, or one replacing a connection that is gone). */
async function openConnection() {
  const pending = connect({ server_url: state.ctx.serverUrl });
  try {
    return await withTimeout(pending, TIMEOUT.default, "connect");
  } catch (err) {
    pending.then((late) => late.disconnect()).catch(() => {}); // one that opens too late is closed again
    throw err;
  }
}

/** False while hypha-rpc's connection is closed or trying to reconnect by itself (its own state, if it has one). */
function connectionAlive() {
  const c = state.server && state.server.rpc && state.server.rpc._connection;
  return Boolean(state.server) && !(c && (c._closed || c._reconnecting));
}

let reconnecting = null;
/**
 * Replace the connection by a fresh one and find the service on it. The old connection is closed first:
 * after a server restart it may try forever with a token the new server refuses ("Signature verification
 * failed"), and its calls never come back.
 */
function reconnect() {
  if (!reconnecting) {
    reconnecting = (async () => {
      const old = state.server;
      if (old) Promise.resolve().then(() => old.disconnect()).catch(() => {});
      state.server = await openConnection();
      await refreshService();
      console.info(`colabel: reconnected to ${state.ctx.serverUrl}`);
    })().finally(() => { reconnecting = null; });
  }
  return reconnecting;
}

/**
 * After a transport failure of a call made on connection `used`: the service found again on a live
 * connection (the provider re-registered), else on a fresh connection (the server restarted, or refuses the
 * old connection). Nothing to do when the page has reconnected since that call.
 */
async function recover(error, used = state.server) {
  if (reconnecting) {
    await reconnecting;
    return;
  }
  if (used !== state.server && serviceOn === state.server) return;
  if (connectionAlive() && !DEAD_CONNECTION.test(String((error && error.message) || error))) {
    try {
      await refreshService(10_000);
      return;
    } catch (err) {
      console.warn("colabel: the annotator service is not found on this connection; opening a new one:", err);
    }
  }
  await reconnect();
}

/**
 * Call an annotator function with a time limit. A transport failure (not a colabel error) re-resolves the
 * service, on a new connection when the old one is gone (the server may have restarted), and, for calls that
 * can safely run twice, retries once.
 */
async function api(method, args, timeout = TIMEOUT.default, { retry = true, quiet = false } = {}) {
  // a slow answer is said so (the page stays usable meanwhile); background loads stay quiet
  const slow = quiet ? null : setTimeout(() => note(`waiting for the server (${method})…`), SLOW_MS);
  const used = state.server;
  try {
    return await withTimeout(state.annotate[method](...args), timeout, method);
  } catch (err) {
    if (COLABEL_ERROR.test(errorText(err))) throw err;
    if (!retry) {
      recover(err, used).catch(() => {});
      throw err;
    }
    await recover(err, used);
    return await withTimeout(state.annotate[method](...args), timeout, method);
  } finally {
    clearTimeout(slow);
  }
}
const has = (method) => state.annotate && typeof state.annotate[method] === "function";

// -- map ---------------------------------------------------------------------------------------
const source = new VectorSource();
const styles = {};
// a pre-annotation the ensemble is unsure of (colabel_review) is outlined dashed until the annotator edits
// or classifies it
function styleOf(feature, selected = false) {
  const cls = state.classes.find((c) => c.name === feature.get("cls"));
  const color = cls ? cls.color : "#f0e442";
  const review = !selected && Boolean(feature.get("review"));
  const key = color + selected + review + state.fill;
  if (!styles[key]) {
    const [r, g, b] = [1, 3, 5].map((i) => parseInt(color.slice(i, i + 2), 16));
    styles[key] = new Style({
      stroke: new Stroke({ color: selected ? "#ffffff" : color, width: selected ? 3 : 2,
        lineDash: review ? [6, 4] : undefined }),
      // without fill (F) the inside is still transparent paint: a click inside selects, as with fill
      fill: new Fill({ color: `rgba(${r},${g},${b},${!state.fill ? 0.01 : selected ? 0.45 : 0.25})` }),
    });
  }
  return styles[key];
}
// SAM prompts: positive points bluish green, negative vermillion with a white ring (Okabe-Ito), box dashed
const promptStyles = {
  1: new Style({ image: new CircleStyle({ radius: 6, fill: new Fill({ color: "#009e73" }),
    stroke: new Stroke({ color: "#ffffff", width: 2 }) }) }),
  0: new Style({ image: new CircleStyle({ radius: 6, fill: new Fill({ color: "#d55e00" }),
    stroke: new Stroke({ color: "#000000", width: 2 }) }) }),
  box: new Style({ stroke: new Stroke({ color: "#56b4e9", width: 2, lineDash: [6, 4] }) }),
};
const promptSource = new VectorSource();
const vectorLayer = new VectorLayer({ source, style: (f) => styleOf(f) });
const promptLayer = new VectorLayer({ source: promptSource, style: (f) => promptStyles[f.get("kind")] });
const imageLayer = new ImageLayer();
const interactions = defaultInteractions({ shiftDragZoom: false }); // shift-drag draws SAM boxes
// in SAM mode two quick clicks are two points, not a zoom
const doubleClickZoom = interactions.getArray().find((i) => i instanceof DoubleClickZoom);
// the brush's outline under the pointer and the stroke being painted (drawn as a round-capped line as wide as
// the brush: the area it will paint or erase)
const brushSource = new VectorSource();
const brushCursor = [new Style({ stroke: new Stroke({ color: "#ffffff", width: 3 }) }), // seen on dark and light
  new Style({ stroke: new Stroke({ color: "#000000", width: 1.5, lineDash: [4, 3] }) })];
function brushStrokeStyle() {
  const stroke = state.stroke;
  const cls = state.classes[state.current];
  const [r, g, b] = stroke && stroke.erase ? [213, 94, 0] // vermillion: erasing
    : [1, 3, 5].map((i) => parseInt((cls ? cls.color : "#f0e442").slice(i, i + 2), 16));
  // as wide on screen as the area the stroke will paint, also after a zoom during the stroke
  const radius = stroke ? stroke.radius / map.getView().getResolution() : state.brushRadius;
  return new Style({ stroke: new Stroke({ color: `rgba(${r},${g},${b},0.45)`, width: 2 * radius,
    lineCap: "round", lineJoin: "round" }) });
}
const brushLayer = new VectorLayer({ source: brushSource,
  style: (f) => (f.get("kind") === "cursor" ? brushCursor : brushStrokeStyle()) });
const map = new Map({ target: "map", layers: [imageLayer, vectorLayer, promptLayer, brushLayer], interactions });
// `click`, not the default `singleclick`: selects at once instead of after the double-click delay
// hit detection uses the last rendered frame: a feature removed since then is never selected
const select = new Select({ layers: [vectorLayer], style: (f) => styleOf(f, true), condition: click,
  filter: (f) => source.hasFeature(f) });
const modify = new Modify({ features: select.getFeatures() });
const samBox = new DragBox({ condition: shiftKeyOnly, className: "sam-box" });
// the brush (B): drag paints; Alt-drag or right-drag erases (Alt-drag moves windows on some Linux desktops); the
// map pans with the other tools, the arrow keys or a wheel
// a new interaction each time the tool is chosen: one removed mid-drag (a tool key pressed during a stroke) keeps
// the drag's state and would leave the next drag to the map
const makeBrush = () => new PointerInteraction({
  handleDownEvent: (e) => {
    const pointer = e.originalEvent;
    if (!state.image || (pointer.button !== 0 && pointer.button !== 2) || pointer.ctrlKey || pointer.metaKey) {
      return false;
    }
    startStroke(e.coordinate, pointer.altKey || pointer.button === 2);
    return true; // the drag is the stroke's, not the map's
  },
  handleDragEvent: (e) => extendStroke(e.coordinate),
  handleUpEvent: () => {
    endStroke(); // never throws: the interaction always ends its drag
    return false;
  },
  handleMoveEvent: (e) => showBrush(e.coordinate),
});
let brush = makeBrush();
let draw = null;
let sketching = false; // a shape is being drawn (draw, cut or subtract): Ctrl+Z and Backspace drop its last point

function setTool(tool) {
  if (tool === "sam" && ($("tool-sam").hidden || $("tool-sam").disabled)) return;
  state.tool = tool;
  state.toolSince = performance.now(); // a click made before (reported late) is not a SAM point
  doubleClickZoom.setActive(tool !== "sam" && tool !== "brush");
  for (const name of TOOLS) $(`tool-${name}`).classList.toggle("active", name === tool);
  if (draw) map.removeInteraction(draw);
  draw = null;
  sketching = false;
  for (const i of [select, modify, samBox, brush]) map.removeInteraction(i);
  state.stroke = null;
  brushSource.clear();
  select.getFeatures().clear();
  resetSam();
  if (!state.image) return;
  if (tool === "draw") {
    draw = new Draw({ source, type: "Polygon" });
    draw.on("drawend", (e) => {
      const feature = e.feature;
      feature.setId(newId());
      feature.set("cls", state.classes[state.current]?.name);
      const kept = fitOutline(feature);
      // the feature is added to the source right after this event
      setTimeout(() => {
        if (kept) changed();
        else if (source.hasFeature(feature)) source.removeFeature(feature);
      }, 0);
    });
  } else if (tool === "cut") {
    draw = new Draw({ type: "LineString" });
    draw.on("drawend", (e) => cutAlong(e.feature.getGeometry().getCoordinates()));
  } else if (tool === "subtract") {
    draw = new Draw({ type: "Polygon" });
    draw.on("drawend", (e) => subtractShape(e.feature.getGeometry().getCoordinates()));
  } else if (tool === "edit") {
    map.addInteraction(select);
    map.addInteraction(modify);
  } else if (tool === "sam") map.addInteraction(samBox);
  else if (tool === "brush") map.addInteraction(brush = makeBrush());
  if (draw) {
    draw.on("drawstart", () => { sketching = true; });
    draw.on(["drawend", "drawabort"], () => { sketching = false; });
    map.addInteraction(draw);
  }
}
modify.on("modifyend", (e) => {
  for (const f of e.features.getArray().slice()) {
    f.unset("review");
    if (!fitOutline(f)) { // dragged wholly outside the image, or down to no area
      select.getFeatures().remove(f);
      source.removeFeature(f);
    }
  }
  changed();
});

/**
 * A drawn or edited outline made one the provider takes, before it is kept: an outline that crosses itself (a
 * bow tie, a vertex dragged over an edge) is kept, as QuPath does, as the area it encloses (its union: a bow tie
 * becomes its two triangles, one object), and the part of an outline outside the image is cut off at the image's
 * edge. Each is said in a note. False when nothing is left (drawn outside the image, or enclosing no area): the
 * outline is not kept.
 */
function fitOutline(feature) {
  const geometry = geometryOf(feature);
  if (!geometry) return true;
  const said = [];
  let parts = null; // the new outline (a MultiPolygon coordinate array), when it changes
  const problem = outlineProblem(geometry);
  if (problem) {
    parts = repairOutline(geometry);
    if (problem === "crossing" && parts.length) {
      said.push(parts.length > 1 ? `this outline crosses itself: kept as the ${parts.length} areas it encloses`
        : "this outline crosses itself: kept as the area it encloses");
    }
  }
  if (!insideImage(feature.getGeometry().getExtent()) && !(parts && !parts.length)) {
    const inside = clipToRectangle(parts ? { type: "MultiPolygon", coordinates: parts } : geometry, imageExtent());
    if (!inside.length) {
      note("this outline lies outside the image: not kept");
      return false;
    }
    said.push("the part outside the image is cut off");
    parts = inside;
  }
  if (!parts) return true;
  if (!parts.length) {
    note("this outline encloses no area: not kept");
    return false;
  }
  feature.setGeometry(parts.length === 1 ? new Polygon(parts[0]) : new MultiPolygon(parts));
  if (said.length) note(`${said.join("; ")} (Ctrl+Z undoes it)`);
  return true;
}

// -- coordinates: OpenLayers y points up, image rows down (row = H - y) --------------------------
const clampX = (x) => Math.min(state.W, Math.max(0, x));
const clampY = (y) => Math.min(state.H, Math.max(0, y));
// outlines are clipped to the image first (clamping vertices one by one would fold an outline across a corner
// onto itself): the clamp only mends rounding at the image's edges
const toImage = (ring) => ring.map(([x, y]) => [clampX(x), clampY(state.H - y)]);
const toMap = (ring) => ring.map(([x, y]) => [x, state.H - y]);
const imageExtent = () => [0, 0, state.W, state.H]; // in the map frame too
// within the provider's tolerance (1e-6 px): an outline clipped before is not clipped again
const insideImage = ([x0, y0, x1, y1], eps = 1e-6) => x0 >= -eps && y0 >= -eps && x1 <= state.W + eps
  && y1 <= state.H + eps;

function featureToGeoJSON(feature) {
  let shape = geometryOf(feature);
  if (!shape) return null;
  if (!insideImage(feature.getGeometry().getExtent())) { // not fitted when drawn (fitOutline): the part inside
    const parts = clipToRectangle(shape, imageExtent());
    if (!parts.length) return null;
    shape = parts.length === 1 ? { type: "Polygon", coordinates: parts[0] }
      : { type: "MultiPolygon", coordinates: parts };
  }
  const geometry = shape.type === "Polygon" ? { type: "Polygon", coordinates: shape.coordinates.map(toImage) }
    : { type: "MultiPolygon", coordinates: shape.coordinates.map((p) => p.map(toImage)) };
  const cls = feature.get("cls");
  return {
    type: "Feature", id: String(feature.getId()), geometry,
    properties: { objectType: "annotation", ...(cls ? { classification: { name: cls } } : {}) },
  };
}

function geometryToMap(g) {
  if (g.type === "Polygon") return new Polygon(g.coordinates.map(toMap));
  if (g.type === "MultiPolygon") return new MultiPolygon(g.coordinates.map((p) => p.map(toMap)));
  return null;
}

function geoJSONToFeature(f) {
  const geom = geometryToMap(f.geometry);
  if (!geom) return null;
  const feature = new Feature(geom);
  feature.setId(f.id ?? newId());
  const c = f.properties && f.properties.classification;
  feature.set("cls", typeof c === "string" ? c : c && c.name);
  if (f.properties && f.properties.colabel_review) feature.set("review", true);
  return feature;
}

function collection() {
  return { type: "FeatureCollection", features: source.getFeatures().map(featureToGeoJSON).filter(Boolean) };
}

// -- undo/redo over snapshots of the FeatureCollection -----------------------------------------------
const history = new History();
const snapshot = () => JSON.stringify(collection());

/** Every change of the drawing goes through here: recorded for undo, then saved. */
function changed() {
  if (!state.image) return Promise.resolve();
  if (state.labelsHidden) setView({ hidden: false }); // what was just drawn is seen
  history.push(snapshot());
  showUndo();
  return edited();
}

function restore(text) {
  if (text === null) return;
  select.getFeatures().clear();
  resetSam();
  // features kept across the undo are updated in place, not replaced: a click before the next frame is
  // rendered hits the features of the last frame, and those must still be the ones in the source
  const wanted = JSON.parse(text).features.map(geoJSONToFeature).filter(Boolean);
  const keep = new Set(wanted.map((f) => f.getId()));
  for (const f of source.getFeatures()) if (!keep.has(f.getId())) source.removeFeature(f);
  for (const f of wanted) {
    const have = source.getFeatureById(f.getId());
    if (!have) source.addFeature(f);
    else {
      have.setGeometry(f.getGeometry());
      have.set("cls", f.get("cls"));
    }
  }
  showUndo();
  edited();
}
/** Undo: while a shape is being drawn, its last point (as in QuPath), else the last change of the drawing. */
function undo() {
  if (sketching && draw) draw.removeLastPoint();
  else restore(history.undo());
}
const redo = () => restore(history.redo());
function showUndo() {
  $("undo").disabled = !history.canUndo;
  $("redo").disabled = !history.canRedo;
}

// -- the unsaved drawing kept in this browser until the server acknowledges it -----------------------
// One entry per (session link, annotator, image): {base_version, saved_at, annotation}. A reload (or the tab
// opened again) restores it when the server has no version newer than the one it was drawn on.
function draftKey(imageId) {
  return state.storeKey && state.key ? `${state.storeKey}:draft:${storageLabel(state.key)}:${imageId}` : null;
}

/** A short one-way label of a secret (a share token, an annotator key) for this origin's storage keys: FNV-1a
 * (32-bit) of the text under two primes, 16 hex digits. Storage keys never hold the secrets themselves, and a
 * page that reads the storage finds no share token: without it an annotator key opens nothing. */
function storageLabel(secret) {
  let a = 0x811c9dc5;
  let b = 0x2f0b3a49;
  for (let i = 0; i < secret.length; i++) {
    const c = secret.charCodeAt(i);
    a = Math.imul(a ^ c, 0x01000193);
    b = Math.imul(b ^ c, 0x5bd1e995);
  }
  return (a >>> 0).toString(16).padStart(8, "0") + (b >>> 0).toString(16).padStart(8, "0");
}

/** Entries kept by earlier versions of this page under the share token itself (``colabel:<ws>/<name>:<token>``
 * and its drafts ``...:draft:<annotator key>:<image>``) move to their labelled keys. */
function moveTokenKeyedEntries(oldKey, newKey) {
  const entry = localStorage.getItem(oldKey);
  if (entry !== null) {
    if (localStorage.getItem(newKey) === null) localStorage.setItem(newKey, entry);
    localStorage.removeItem(oldKey);
  }
  const prefix = `${oldKey}:draft:`;
  const drafts = [];
  for (let i = 0; i < localStorage.length; i++) {
    const key = localStorage.key(i);
    if (key && key.startsWith(prefix)) drafts.push(key);
  }
  for (const key of drafts) {
    const rest = key.slice(prefix.length);
    const cut = rest.lastIndexOf(":");
    if (cut > 0) {
      const moved = `${newKey}:draft:${storageLabel(rest.slice(0, cut))}:${rest.slice(cut + 1)}`;
      if (localStorage.getItem(moved) === null) localStorage.setItem(moved, localStorage.getItem(key));
    }
    localStorage.removeItem(key);
  }
}

function keepDraft() {
  const key = state.image && draftKey(state.image.image_id);
  if (!key) return;
  try {
    // writer: versions after base_version saved with it are this drawing's own earlier states (their answers
    // were lost, or the tab closed mid-save); the provider takes the drawing over them, and refuses it over another's
    localStorage.setItem(key, JSON.stringify({ base_version: state.version, writer: state.writer,
      saved_at: Date.now(), annotation: collection() }));
  } catch (err) {
    console.warn("colabel: the unsaved drawing could not be kept in this browser:", err);
  }
}

function dropDraft(imageId) {
  const key = draftKey(imageId);
  if (key) localStorage.removeItem(key);
}

/** The kept drawing of an image, else null (and forgotten): one drawn on the latest version, or on an older one when
 * it knows its writer (the provider then takes it over versions of that writer, and refuses it with ConflictError
 * over another tab's: the page asks which to keep). */
function usableDraft(imageId, latest) {
  const key = draftKey(imageId);
  let draft = null;
  try {
    draft = key && JSON.parse(localStorage.getItem(key) || "null");
  } catch {
    draft = null;
  }
  if (!draft) return null;
  const usable = draft.base_version >= latest || (typeof draft.writer === "string" && draft.base_version >= 0);
  if (!usable || !Array.isArray(draft.annotation?.features)) {
    // kept by an earlier page, which recorded no writer: the server's is newer
    dropDraft(imageId);
    return null;
  }
  return draft;
}

/** A change to save: kept in this browser first, then saved. */
function edited() {
  keepDraft();
  return saver.changed();
}

// -- autosave: the latest drawing always saved last; failures retried with backoff, never dropped ----
let saveOn = null; // the connection of the last save call
let sentIds = []; // the feature ids of the last drawing sent, in order: "feature N" of a refusal is sentIds[N]
const saver = new AutoSaver({
  save: async () => {
    if (!navigator.onLine) throw new Error(OFFLINE); // said at once; saved again on the `online` event
    const imageId = state.image.image_id;
    saveOn = state.server;
    const annotation = collection();
    sentIds = annotation.features.map((f) => f.id);
    // not retried here: the saver retries with backoff (a save that timed out may have been committed)
    // base_version: the version this drawing was made on; a save over a version saved since by another tab or
    // client of this annotator is refused (ConflictError) instead of silently dropping that version's changes
    const record = await api("save_annotation", [state.ctx.token, state.key, imageId, annotation, state.version,
      state.writer],
      TIMEOUT.default, { retry: false });
    if (state.image && state.image.image_id === imageId) {
      state.version = record.version;
      if (saver.pending) keepDraft(); // a newer change, drawn on this version
      else dropDraft(imageId);
    }
    return record;
  },
  beforeRetry: (error) => (navigator.onLine ? recover(error, saveOn) : Promise.resolve()),
  isFinal: (error) => FINAL_ERROR.test(errorText(error)),
  onState: ({ state: s, record, error, retryIn }) => {
    if (s !== "stopped") showBanner(null);
    if (s === "saving" && !navigator.onLine) saveStatus(OFFLINE, "offline");
    else if (s === "saving") {
      saveStatus(state.restored ? "saving the changes restored from this browser…" : "saving…", "saving");
    } else if (s === "saved") {
      saveStatus(state.restored ? `saved v${record.version}: the changes restored from this browser`
        : `saved v${record.version}`, "saved");
      state.restored = false;
    } else if (s === "failed" && !navigator.onLine) {
      saveStatus(OFFLINE, "offline");
    } else if (s === "failed") {
      const text = errorText(error);
      const why = COLABEL_ERROR.test(text) ? text : "provider unreachable";
      saveStatus(`not saved: ${why}; retry in ${retryIn} s`, "failed");
      $("save-status").title = `${text} (click to retry now)`;
    } else if (s === "stopped") {
      const why = finalReason(errorText(error));
      saveStatus(`not saved: ${why}`, "failed");
      $("save-status").title = `${errorText(error)} (click to try again)`;
      if (CONFLICT.test(errorText(error))) {
        showBanner("This image was saved elsewhere (another tab or window) after the version you are drawing on: your "
          + "last changes were not saved.", { conflict: true });
      } else if (INVALID.test(errorText(error))) showRefusal(errorText(error));
      else showBanner(`${why[0].toUpperCase()}${why.slice(1)}: your last changes were not saved.`);
    }
  },
});
$("save-status").addEventListener("click", () => {
  if (saver.dirty && !(saver.stopped && CONFLICT.test(errorText(saver.stopped)))) saver.retryNow();
});
// the browser says at once when it loses the network, and the kept drawing is saved as soon as it is back
window.addEventListener("offline", () => {
  if (saver.dirty && !saver.stopped) saveStatus(OFFLINE, "offline");
});
window.addEventListener("online", () => {
  if (saver.dirty && !saver.stopped) saver.retryNow();
});
window.addEventListener("beforeunload", (e) => {
  if (!saver.dirty) return;
  e.preventDefault();
  e.returnValue = ""; // the browser asks before closing the tab with unsaved work
});

/** What an error that stops the saves means for the annotator. */
function finalReason(text) {
  if (INVALID.test(text)) {
    if (/self-intersect/i.test(text)) return "a polygon crosses itself";
    if (/^PayloadTooLargeError\b/.test(text)) return "the drawing is larger than the provider takes";
    if (/^UnreadableImageError\b/.test(text)) return "the image changed on the provider's disk";
    return "a polygon cannot be saved";
  }
  if (/^SessionClosedError\b/.test(text)) return "the session is closed";
  if (CONFLICT.test(text)) return "a newer version was saved elsewhere";
  if (/revoked/i.test(text)) return "this link was revoked";
  return `access denied (${text.replace(/^AccessDeniedError: /, "")})`;
}

/** The banner over the image (null hides it), with the unsaved drawing to download. */
function showBanner(text, { conflict = false } = {}) {
  $("banner").hidden = !text;
  $("banner-text").textContent = text || "";
  $("banner-text").title = "";
  $("banner-reload").hidden = !conflict;
  $("banner-overwrite").hidden = !conflict;
}

/**
 * A drawing the provider refused (InvalidInputError, e.g. "feature 1: polygon is self-intersecting"): the polygon
 * it names is selected and brought into view, and the banner says how to mend it. The drawing stays kept in this
 * browser; the next change (the fix, or deleting that polygon) saves it again.
 */
function showRefusal(text) {
  const reason = text.replace(/^(InvalidInputError|PayloadTooLargeError|UnreadableImageError):\s*/, "");
  const named = /^feature (\d+): (.*)$/s.exec(reason);
  const id = named ? sentIds[Number(named[1])] : undefined;
  const feature = id === undefined ? null : source.getFeatureById(id);
  const crossing = /self-intersect/i.test(reason);
  const kept = "Your drawing is kept in this browser and saved with your next change.";
  if (feature) {
    if (!sketching && state.tool !== "edit") setTool("edit"); // a shape being drawn is not thrown away
    select.getFeatures().clear();
    select.getFeatures().push(feature);
    const view = map.getView();
    const extent = feature.getGeometry().getExtent();
    if (!intersects(view.calculateExtent(map.getSize()), extent)) {
      view.fit(extent, { padding: [80, 80, 80, 80], maxZoom: view.getZoom() });
    }
    const what = crossing ? "The selected polygon crosses itself"
      : `The selected polygon cannot be saved (${named[2]})`;
    const how = crossing ? "drag its vertices so that its edges no longer cross" : "drag its vertices";
    showBanner(`${what}: fix it (${how}) or delete it (Delete). ${kept}`);
  } else {
    showBanner(`The server cannot save this drawing (${reason}): undo the last change (Ctrl+Z) or fix it. ${kept}`);
  }
  $("banner-text").title = text;
}

/** After a conflict: show the version saved elsewhere, forgetting this page's unsaved drawing. */
async function loadNewerVersion() {
  if (!state.image || !state.assignment) return;
  dropDraft(state.image.image_id);
  await showImage(state.assignment);
}

/** After a conflict: save this page's drawing as the newest version, over the one saved elsewhere. */
async function saveMineOver() {
  if (!state.image) return;
  const versions = await api("list_versions", [state.ctx.token, state.key, state.image.image_id]);
  state.version = versions.length ? versions[versions.length - 1] : 0;
  keepDraft();
  showBanner(null);
  await saver.retryNow();
}

function downloadUnsaved() {
  const blob = new Blob([JSON.stringify(collection(), null, 1)], { type: "application/geo+json" });
  const name = (state.image ? state.image.name : "drawing").replace(/[^\w.-]+/g, "_");
  const link = el("a", { href: URL.createObjectURL(blob), download: `${name}.unsaved.geojson` });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 60_000);
}
$("banner-download").addEventListener("click", downloadUnsaved);
$("banner-reload").addEventListener("click", () => loadNewerVersion().catch((err) => message(errorText(err), true)));
$("banner-overwrite").addEventListener("click", () => saveMineOver().catch((err) => message(errorText(err), true)));

// -- classes ---------------------------------------------------------------------------------
function showClasses() {
  const box = $("classes");
  box.replaceChildren(...state.classes.map((c, i) => el("button", {
    // the selected chip's text is black or white, whichever reads better on the class colour (WCAG contrast)
    class: "class" + (i === state.current ? " active" : ""), style: `--c:${c.color};--fg:${textColorOn(c.color)}`,
    title: `key ${i + 1}`, onclick: () => setClass(i),
  }, `${i + 1} ${c.name}`)));
}
function setClass(i) {
  if (i < 0 || i >= state.classes.length) return;
  state.current = i;
  showClasses();
  const chosen = select.getFeatures().getArray().slice();
  if (state.sam.feature) chosen.push(state.sam.feature);
  if (chosen.length) {
    for (const f of chosen) {
      f.set("cls", state.classes[i].name);
      f.unset("review");
    }
    changed();
  }
}

// -- cutter ------------------------------------------------------------------------------------
function geometryOf(feature) {
  const g = feature.getGeometry();
  if (g instanceof Polygon) return { type: "Polygon", coordinates: g.getCoordinates() };
  if (g instanceof MultiPolygon) return { type: "MultiPolygon", coordinates: g.getCoordinates() };
  return null;
}

/** Replace a feature by pieces (Polygon coordinate arrays, map frame): the first keeps its id. */
function replaceByPieces(feature, pieces) {
  if (!pieces.length) { source.removeFeature(feature); return; }
  feature.setGeometry(new Polygon(pieces[0]));
  for (const piece of pieces.slice(1)) {
    const part = new Feature(new Polygon(piece));
    part.setId(newId());
    part.set("cls", feature.get("cls"));
    source.addFeature(part);
  }
}

const CUT_NOTES = {
  across: "the line must cross the polygon from side to side to split it",
  line: "the cut line touches no polygon",
  shape: "the shape overlaps no polygon",
  eraser: "the eraser touched no polygon",
};
/**
 * Cut the polygons near `extent` with `cut` (pieces, or null for a polygon it leaves whole); when none is cut,
 * say why: `touches(geometry)` tells a line that meets a polygon without crossing it from side to side. Every cut
 * is computed before any polygon changes (one that throws changes nothing). `keepParts`: an object of several
 * parts stays one object (a nick in a bow tie), where a polygon cut through becomes pieces.
 */
function applyCut(extent, cut, { touches = null, missed, keepParts = false }) {
  const cuts = [];
  let touched = false;
  for (const feature of source.getFeatures()) {
    const geometry = geometryOf(feature);
    if (!geometry || !intersects(feature.getGeometry().getExtent(), extent)) continue;
    const pieces = cut(geometry);
    if (pieces) cuts.push([feature, pieces]);
    else if (touches && !touched) touched = touches(geometry);
  }
  if (!cuts.length) { note(touched ? CUT_NOTES.across : missed); return; }
  for (const [feature, pieces] of cuts) {
    if (keepParts && feature.getGeometry() instanceof MultiPolygon && pieces.length) {
      feature.setGeometry(pieces.length === 1 ? new Polygon(pieces[0]) : new MultiPolygon(pieces));
    } else replaceByPieces(feature, pieces);
  }
  if (Object.values(CUT_NOTES).includes($("message").textContent)) message(""); // an earlier miss, mended
  changed();
}
function cutAlong(line) {
  applyCut(new Feature(new Polygon([line])).getGeometry().getExtent(), (g) => splitByLine(g, line),
    { touches: (g) => lineTouches(g, line), missed: CUT_NOTES.line });
}
function subtractShape(polygon) {
  applyCut(new Polygon(polygon).getExtent(), (g) => subtractPolygon(g, polygon), { missed: CUT_NOTES.shape });
}

// -- brush -------------------------------------------------------------------------------------------
/** The brush's outline at `coordinate` (map frame), or none (null: the pointer left the map). */
function showBrush(coordinate) {
  let cursor = brushSource.getFeatureById("cursor");
  if (!coordinate) { if (cursor) brushSource.removeFeature(cursor); return; }
  const circle = new CircleGeometry(coordinate, state.brushRadius * map.getView().getResolution());
  if (cursor) cursor.setGeometry(circle);
  else {
    cursor = new Feature({ geometry: circle, kind: "cursor" });
    cursor.setId("cursor");
    brushSource.addFeature(cursor);
  }
}
/** Brush radius in screen pixels, 2 to 200 ([ and ] step it by a quarter). */
/** Show or hide the drawing (H), outlines with or without fill (F); the header says when it is hidden. */
function setView({ hidden = state.labelsHidden, fill = state.fill } = {}) {
  state.labelsHidden = hidden;
  state.fill = fill;
  vectorLayer.setVisible(!hidden);
  vectorLayer.changed();
  const status = $("view-status");
  status.hidden = !hidden;
  status.textContent = "labels hidden (H shows them)";
}
function setBrushRadius(radius) {
  state.brushRadius = Math.min(200, Math.max(2, Math.round(radius)));
  $("tool-brush").title = `brush (B), ${state.brushRadius} px: drag to paint, Alt- or right-drag to erase; [ and ] `
    + "resize";
  const cursor = brushSource.getFeatureById("cursor");
  if (cursor) showBrush(cursor.getGeometry().getCenter());
  brushSource.changed();
}
/** A stroke begins: it paints onto the polygon it starts in (the smallest there), else a new polygon; erases with
 * Alt or the right button. */
function startStroke(coordinate, erasing) {
  select.getFeatures().clear();
  // of the polygons there, the smallest: a nucleus drawn inside a tissue region grows, not the region (stable
  // across reloads, undos and erases, which change the order features were added in)
  const under = erasing ? [] : source.getFeaturesAtCoordinate(coordinate).filter((f) => {
    const g = geometryOf(f);
    return g && containsPoint(g, coordinate);
  });
  const area = (f) => f.getGeometry().getArea();
  const target = under.reduce((best, f) => (!best || area(f) < area(best) ? f : best), null);
  state.stroke = { points: [coordinate], erase: erasing, radius: state.brushRadius * map.getView().getResolution(),
    target };
  const line = new Feature({ geometry: new LineString([coordinate, coordinate]), kind: "stroke" });
  line.setId("stroke");
  brushSource.addFeature(line);
  showBrush(coordinate);
}
function extendStroke(coordinate) {
  if (!state.stroke) return;
  state.stroke.points.push(coordinate);
  brushSource.getFeatureById("stroke")?.getGeometry().appendCoordinate(coordinate);
  showBrush(coordinate);
}
function endStroke() {
  const stroke = state.stroke;
  state.stroke = null;
  const line = brushSource.getFeatureById("stroke");
  if (line) brushSource.removeFeature(line);
  if (!stroke || !state.image) return;
  try {
    applyStroke(stroke);
  } catch (err) { // nothing was changed: every result is computed before any polygon is
    console.warn("colabel: brush stroke", err);
    note("this brush stroke could not be computed: nothing was changed, try again");
  }
}
function applyStroke(stroke) {
  const area = strokeArea(stroke.points, stroke.radius);
  if (!area.length) return;
  if (stroke.erase) {
    applyCut(new MultiPolygon(area).getExtent(), (g) => erase(g, area), { missed: CUT_NOTES.eraser, keepParts: true });
    return;
  }
  const target = stroke.target && source.hasFeature(stroke.target) ? stroke.target : null;
  const parts = target ? paint(geometryOf(target), area) : area;
  const painted = new Feature(parts.length === 1 ? new Polygon(parts[0]) : new MultiPolygon(parts));
  if (!fitOutline(painted)) return; // a new polygon painted wholly outside the image (said in a note)
  if (target) {
    target.setGeometry(painted.getGeometry());
    target.unset("review");
  } else {
    painted.setId(newId());
    painted.set("cls", state.classes[state.current]?.name);
    source.addFeature(painted);
  }
  changed();
}

// -- SAM: decoded in the browser (onnxruntime-web) when the decoder loads, else on the server ------------
function setSamPath(path, note = "") {
  state.samPath = path;
  document.body.dataset.samPath = path || "";
  const s = $("sam-status");
  s.hidden = !path;
  s.textContent = path === "browser" ? "SAM: in browser" : path === "server" ? "SAM: on server"
    : path === "unavailable" ? "SAM: not available" : `SAM: ${path}`;
  s.title = note;
}

/** The server cannot segment (no model weights, model service down): the SAM tool is switched off. */
function samUnavailable(err) {
  console.warn("colabel: SAM is not available on this server:", errorText(err));
  const why = "SAM is not available on this server (reload the page to try again)";
  state.samOff = true;
  const tool = $("tool-sam");
  tool.disabled = true;
  tool.title = why;
  if (state.tool === "sam") setTool("draw");
  setSamPath("unavailable", why);
}

function resetSam() {
  state.sam = { points: [], labels: [], box: null, feature: null, seq: state.sam.seq + 1 };
  promptSource.clear();
}

function showPrompts() {
  promptSource.clear();
  state.sam.points.forEach(([x, y], i) => {
    const f = new Feature(new Point([x, state.H - y]));
    f.set("kind", state.sam.labels[i]);
    promptSource.addFeature(f);
  });
  if (state.sam.box) {
    const [x0, y0, x1, y1] = state.sam.box;
    const f = new Feature(fromExtent([x0, state.H - y1, x1, state.H - y0]));
    f.set("kind", "box");
    promptSource.addFeature(f);
  }
}

/** The geometry (image pixels) of a prompt, and which path decoded it (`browser: false`: the server's). */
async function decodeSam(prompt, { browser = true } = {}) {
  const imageId = state.image.image_id;
  if (browser && state.decoder && state.decoder.embedding && state.decoder.embedding.imageId === imageId) {
    try {
      const out = await state.decoder.decode(prompt);
      const positives = (prompt.points || []).filter((_, i) => prompt.labels[i] === 1);
      return {
        path: "browser",
        geometry: maskToGeometry(out.mask, out.width, out.height, { positives, threshold: out.threshold }),
      };
    } catch (err) {
      state.decoder = null;
      setSamPath("server", `the browser decoder failed: ${errorText(err)}`);
    }
  }
  const result = await api("sam_segment", [state.ctx.token, imageId, prompt], TIMEOUT.sam);
  return { path: "server", geometry: result.features.length ? result.features[0].geometry : null };
}

// prompts are decoded one at a time, in order (a browser decoder runs one inference at a time); a prompt
// superseded by a newer one while it waited or ran is not shown
let samLatest = 0;
let samQueue = Promise.resolve();
function samUpdate() {
  showPrompts();
  const ticket = ++samLatest;
  samQueue = samQueue.then(() => samDecode(ticket));
  return samQueue;
}

async function samDecode(ticket) {
  const { points, labels, box } = state.sam;
  const seq = state.sam.seq;
  const prompt = { ...(points.length ? { points, labels } : {}), ...(box ? { box } : {}) };
  if (ticket !== samLatest || (!points.length && !box)) return;
  $("sam-status").classList.add("busy");
  try {
    const { path, geometry } = await decodeSam(prompt);
    // the object was finished meanwhile, or a newer prompt follows
    if (seq !== state.sam.seq || ticket !== samLatest || !state.image) return;
    window.colabel.lastSam = { path, prompt, geometry, at: performance.now() };
    window.colabel.samResults++;
    let f = state.sam.feature;
    if (!geometry) {
      if (f && source.hasFeature(f)) source.removeFeature(f);
      state.sam.feature = null;
      note("SAM found nothing here");
    } else if (f && source.hasFeature(f)) f.setGeometry(geometryToMap(geometry));
    else {
      f = new Feature(geometryToMap(geometry));
      f.setId(newId());
      f.set("cls", state.classes[state.current]?.name);
      source.addFeature(f);
      state.sam.feature = f;
    }
    changed();
  } catch (err) {
    const text = errorText(err);
    window.colabel.lastSam = { path: null, prompt, error: text, at: performance.now() };
    window.colabel.samResults++;
    if (MODEL_UNAVAILABLE.test(text)) {
      samUnavailable(err);
      note("SAM is not available on this server", true);
    } else {
      console.warn("colabel: SAM failed:", text);
      note(`SAM: ${text.length > 160 ? `${text.slice(0, 160)}… (more in the browser console)` : text}`, true);
    }
  } finally {
    $("sam-status").classList.remove("busy");
  }
}

function samPoint(coordinate, negative) {
  if (state.tool !== "sam" || !state.image) return;
  const [x, y] = coordinate;
  if (x < 0 || x > state.W || y < 0 || y > state.H) return;
  state.sam.points = [...state.sam.points, [x, state.H - y]];
  state.sam.labels = [...state.sam.labels, negative ? 0 : 1];
  samUpdate();
}
// `click`, not `singleclick`: a point is decoded at once, not 250 ms later, and two clicks within the
// double-click delay are two points (as a `singleclick` both were dropped)
map.on("click", (e) => {
  if (e.originalEvent.timeStamp >= state.toolSince) samPoint(e.coordinate, e.originalEvent.altKey);
});
map.getViewport().addEventListener("pointerleave", () => showBrush(null));
map.getViewport().addEventListener("contextmenu", (e) => {
  if (state.tool === "brush") e.preventDefault(); // a right-drag erases
  if (state.tool !== "sam") return;
  e.preventDefault(); // right click: a negative point
  samPoint(map.getEventCoordinate(e), true);
});
samBox.on("boxend", () => {
  const [x0, y0, x1, y1] = samBox.getGeometry().getExtent();
  const box = [clampX(x0), clampY(state.H - y1), clampX(x1), clampY(state.H - y0)];
  if (box[2] - box[0] < 1 || box[3] - box[1] < 1) return;
  state.sam.box = box;
  samUpdate();
});

let decoderPromise = null;
/** The ONNX decoder, loaded once per page (null when it cannot load). */
function loadDecoder() {
  if (!decoderPromise) {
    decoderPromise = (async () => {
      const ort = await loadOrt(new URL("ort/", import.meta.url).href);
      const quantize = state.options.decoder !== "full";
      const bytes = await api("sam_decoder", [state.ctx.token, null, quantize], TIMEOUT.samLoad, { quiet: true });
      return BrowserDecoder.create(ort, bytes instanceof Uint8Array ? bytes : new Uint8Array(bytes));
    })();
    decoderPromise.catch(() => {});
  }
  return decoderPromise;
}

/** Once an image is shown: the browser decoder and the image's embedding, else the server path. */
async function prepareSam(image) {
  if (!has("sam_segment") || state.samOff) return;
  const serverPath = (note) => {
    setSamPath("server", note);
    api("sam_prepare", [state.ctx.token, image.image_id], TIMEOUT.samLoad, { quiet: true }).catch((err) => {
      // the model cannot run at all (e.g. its weights are not on the server): no SAM on this page
      if (MODEL_UNAVAILABLE.test(errorText(err)) && !state.samOff) samUnavailable(err);
    });
  };
  if (state.options.decoder === "server" || !has("sam_decoder") || !has("sam_embedding")) {
    serverPath("the browser decoder is off");
    return;
  }
  if (Math.max(state.W, state.H) > BROWSER_SAM_MAX_SIDE) {
    serverPath(`images over ${BROWSER_SAM_MAX_SIDE} px are segmented on the server, tile by tile`);
    return;
  }
  setSamPath(state.decoder ? "server" : "loading decoder…");
  try {
    state.decoder = await loadDecoder();
    const answer = await api("sam_embedding", [state.ctx.token, image.image_id], TIMEOUT.samLoad, { quiet: true });
    if (!state.image || state.image.image_id !== image.image_id) return;
    state.decoder.setEmbedding(image.image_id, answer);
    setSamPath("browser");
  } catch (err) {
    if (!state.image || state.image.image_id !== image.image_id) return;
    console.warn("SAM decoding falls back to the server:", err);
    serverPath(`the browser decoder could not load: ${errorText(err)}`);
  }
}

// -- keys ------------------------------------------------------------------------------------
const SHORTCUTS = [
  ["1 … 9", "class of new polygons; with a selection or SAM object: change its class"],
  ["D", "draw polygons (click the first point or double-click to close)"],
  ["E", "edit: click a polygon to select, drag its vertices"],
  ["Delete / Backspace", "delete the selected polygons"],
  ["S", "SAM: click = positive point, Alt-click or right click = negative point, Shift-drag = box"],
  ["N / Enter", "SAM: finish this object, start a new one"],
  ["B", "brush: drag to paint (from inside a polygon: adds to it; else a new one); Alt- or right-drag erases"],
  ["[ / ]", "brush: smaller / larger"],
  ["H", "hide / show the drawing, to see the image under it"],
  ["F", "fill polygons on / off (outlines only)"],
  ["C", "cut: draw a line across polygons to split them (double-click or Enter to finish)"],
  ["X", "subtract: draw a polygon, removed from the polygons it overlaps"],
  ["Ctrl+Z", "undo; while drawing a shape: remove its last point"],
  ["Backspace while drawing", "remove the last point of the shape being drawn"],
  ["Ctrl+Shift+Z / Ctrl+Y", "redo"],
  ["Escape", "abandon the shape being drawn"],
  ["?", "this help"],
];
function toggleHelp(show) {
  const dialog = $("help");
  if (show === undefined) show = !dialog.open;
  if (show && !dialog.open) dialog.showModal();
  else if (!show && dialog.open) dialog.close();
}
$("help-list").replaceChildren(...SHORTCUTS.flatMap(([k, what]) => [el("dt", {}, k), el("dd", {}, what)]));
$("help-button").addEventListener("click", () => toggleHelp(true));
$("help-close").addEventListener("click", () => toggleHelp(false));

document.addEventListener("keydown", (e) => {
  if (e.target instanceof HTMLInputElement || $("name-dialog").open) return;
  if (state.session && state.session.mode === "classification") return; // classify.js has its own keys
  if (e.key === "?") { toggleHelp(); return; }
  if ($("help").open) return;
  const ctrl = e.ctrlKey || e.metaKey;
  const key = e.key.toLowerCase();
  if (ctrl && key === "z") { e.preventDefault(); if (e.shiftKey) redo(); else undo(); return; }
  if (ctrl && key === "y") { e.preventDefault(); redo(); return; }
  if (e.key === "[" || e.key === "]") { // typed with AltGr (Ctrl+Alt on Windows) on many keyboards
    if (!state.stroke) setBrushRadius(state.brushRadius * (e.key === "]" ? 1.25 : 0.8));
    return;
  }
  if (ctrl || e.altKey) return;
  if (/^[1-9]$/.test(e.key)) setClass(Number(e.key) - 1);
  else if (e.key === "Backspace" && sketching && draw) {
    e.preventDefault();
    draw.removeLastPoint();
  } else if (e.key === "Delete" || e.key === "Backspace") {
    const chosen = select.getFeatures().getArray().slice();
    if (!chosen.length) return;
    select.getFeatures().clear();
    for (const f of chosen) source.removeFeature(f);
    changed();
  } else if (e.key === "Escape") {
    if (draw) draw.abortDrawing();
    if (state.tool === "sam") resetSam();
  } else if (e.key === "Enter" && draw) draw.finishDrawing();
  else if ((key === "n" || e.key === "Enter") && state.tool === "sam") { resetSam(); note("SAM: new object"); }
  else if (key === "d") setTool("draw");
  else if (key === "e") setTool("edit");
  else if (key === "s") setTool("sam");
  else if (key === "c") setTool("cut");
  else if (key === "x") setTool("subtract");
  else if (key === "b") setTool("brush");
  else if (key === "h") setView({ hidden: !state.labelsHidden });
  else if (key === "f") setView({ fill: !state.fill });
});
for (const name of TOOLS) $(`tool-${name}`).addEventListener("click", () => setTool(name));
$("undo").addEventListener("click", undo);
$("redo").addEventListener("click", redo);

// -- images ----------------------------------------------------------------------------------
function remember(assignment) {
  if (!state.storeKey) return;
  const stored = JSON.parse(localStorage.getItem(state.storeKey) || "{}");
  stored.current = assignment.image ? { image_id: assignment.image.image_id } : null;  // open_image on a reload
  localStorage.setItem(state.storeKey, JSON.stringify(stored));
}

async function showImage(assignment) {
  const { image, position, total } = assignment;
  remember(assignment);
  state.assignment = assignment;
  saver.reset();
  source.clear();
  resetSam();
  select.getFeatures().clear();
  state.image = image;
  state.version = 0;
  state.restored = false;
  showBanner(null);
  showReturned(null);
  if (!image) {
    imageLayer.setSource(null);
    showTiles(map, imageLayer, null);
    $("next-image").disabled = true;
    if (total && await savedNothing()) {
      setText("position", "no images left for you");
      message("No images are left for you in this session: every image already has all the annotators it needs.");
    } else {
      setText("position", total ? `all ${total} images done` : "no images");
      message("No more images for you in this session. Thank you!");
    }
    document.body.dataset.state = "done";
    return;
  }
  document.body.dataset.state = "loading";
  setText("position", `image ${position} of ${total}: ${image.name}`);
  message("loading image…");
  const [H, W] = image.shape;
  state.W = W;
  state.H = H;
  const level = pickLevel(image);
  const pixels = await api("get_image", [state.ctx.token, image.image_id, null, level], TIMEOUT.image);
  const canvas = toCanvas(pixels);
  const blob = await new Promise((ok) => canvas.toBlob(ok, "image/png"));
  const extent = [0, 0, W, H];
  const projection = new Projection({ code: `colabel-${image.image_id}`, units: "pixels", extent });
  imageLayer.setSource(new ImageStatic({
    url: URL.createObjectURL(blob), projection, imageExtent: extent, interpolate: level > 0,
  }));
  // an image over one level: the level loaded above is its overview; zoomed in, finer levels come as tiles (tiles.js)
  showTiles(map, imageLayer, { image, overview: level, pixels, projection,
    fetch: (region, lvl) => api("get_image", [state.ctx.token, image.image_id, region, lvl], TIMEOUT.image,
      { quiet: true }) });
  const view = new View({ projection, center: getCenter(extent), maxZoom: 10 });
  map.setView(view);
  view.fit(extent, { padding: [10, 10, 10, 10] });
  const versions = await api("list_versions", [state.ctx.token, state.key, image.image_id]);
  const latest = versions.length ? versions[versions.length - 1] : 0;
  // what this browser drew and could not save (the provider was down, the tab was closed meanwhile)
  const draft = usableDraft(image.image_id, latest);
  if (draft) {
    state.version = Math.min(draft.base_version, latest);
    if (draft.base_version < latest) state.writer = draft.writer;
    source.addFeatures(draft.annotation.features.map(geoJSONToFeature).filter(Boolean));
    state.restored = true;
    saveStatus("restored the changes this browser had not saved", "saving");
  } else if (versions.length) {
    const stored = await api("get_annotations", [state.ctx.token, state.key, image.image_id]);
    state.version = latest;
    source.addFeatures(stored.features.map(geoJSONToFeature).filter(Boolean));
    saveStatus(`saved v${state.version}`, "saved");
  } else if (has("pre_annotation")) {
    // a trained model's proposals, editable; stored only when the annotator saves
    try {
      const proposed = await api("pre_annotation", [state.ctx.token, image.image_id], TIMEOUT.image);
      const features = proposed.features.map(geoJSONToFeature).filter(Boolean);
      // a class-less model's outlines take the current class (the first, on a new image); number keys change it
      for (const f of features) if (!f.get("cls")) f.set("cls", state.classes[state.current]?.name);
      source.addFeatures(features);
      const review = features.filter((f) => f.get("review")).length;
      const unsure = review ? ` (${review} dashed: the models disagree, check them first)` : "";
      saveStatus(`${proposed.features.length} pre-annotations${unsure}: correct them, or Next image keeps them`);
    } catch (err) {
      saveStatus("");
      message(`pre-annotations unavailable: ${errorText(err)}`, true);
    }
  } else saveStatus("");
  history.reset(snapshot());
  showUndo();
  setTool(state.tool);
  message("");
  showReturned(assignment);
  $("next-image").disabled = false;
  document.body.dataset.state = "ready";
  if (draft) {
    console.info(`colabel: restored the unsaved drawing of ${image.name} kept since ${new Date(draft.saved_at)}`);
    edited(); // saved as the next version
  }
  prepareSam(image);
}

/** Say what the provider asked this annotator to change on the image (returned for changes), if it did. */
function showReturned(assignment) {
  const asked = Boolean(assignment && assignment.image && assignment.returned);
  const comment = asked ? assignment.returned.comment : "";
  $("returned").hidden = !asked;
  $("returned").textContent = asked ? `Returned to you for changes${comment ? `: “${comment}”` : ""}. `
    + "Change what is asked, then Next image finishes it again." : "";
}

/** True when this annotator has saved no image of the session (false when that cannot be told). */
async function savedNothing() {
  if (!state.annotatorId) return false;
  try {
    const progress = await api("progress", [state.ctx.token], TIMEOUT.default, { quiet: true });
    const mine = (progress.per_annotator || {})[state.annotatorId];
    return !mine || !mine.images;
  } catch (err) {
    console.warn("colabel: progress unavailable:", errorText(err));
    return false;
  }
}

async function nextImage() {
  $("next-image").disabled = true;
  try {
    if (saver.running) await saver.running;
    // an image never saved is saved as it is (possibly empty: "nothing to annotate here")
    let empty = null;
    if (state.image && !state.version && !saver.dirty) {
      if (!source.getFeatures().length) empty = state.image.name;
      await saver.changed();
    }
    if (state.image && saver.stopped) {
      showBanner($("banner-text").textContent || "Your last changes were not saved.",
        { conflict: CONFLICT.test(errorText(saver.stopped)) });
      $("next-image").disabled = false;
      return;
    }
    if (state.image && (saver.dirty || !state.version)) {
      message("this image is not saved yet (retrying); the next image comes once it is", true);
      $("next-image").disabled = false;
      return;
    }
    message("");
    // going on says this image is finished: what this annotator drew on it is complete (trainers can tell it
    // from work left midway). Saved either way: a finish refused (the image left the folder) does not hold the
    // annotator here, and is said with the next image
    let unfinished = null;
    if (state.image) {
      try {
        await api("finish_image", [state.ctx.token, state.key, state.image.image_id]);
      } catch (err) {
        if (/^(AccessDeniedError|SessionClosedError)\b/.test(errorText(err))) throw err;
        unfinished = `${state.image.name} is saved, but could not be marked finished: ${errorText(err)}`;
      }
    }
    await showImage(await api("next_image", [state.ctx.token, state.key]));
    if (unfinished) {
      if (state.image) note(unfinished);
      else message(`${unfinished}. ${$("message").textContent}`, true);
    }
    if (empty !== null) {
      // said, not asked: an empty version records "nothing to annotate here"
      const said = `no objects drawn on ${empty}: saved as empty`;
      if (state.image) note(said);
      else message(`${said}. ${$("message").textContent}`);
    }
  } catch (err) {
    message(errorText(err), true);
    $("next-image").disabled = false;
  }
}
$("next-image").addEventListener("click", nextImage);

// -- joining ---------------------------------------------------------------------------------
function askName() {
  return new Promise((resolve) => {
    const dialog = $("name-dialog");
    let joined = null;
    // the dialog is the only way in: Escape does not close it (and if the browser closes it anyway, it opens again)
    dialog.oncancel = (e) => e.preventDefault();
    dialog.onclose = () => { if (!joined) dialog.showModal(); };
    $("name-form").onsubmit = async (e) => {
      e.preventDefault();
      const name = $("display-name").value.trim();
      if (!name) {
        $("name-error").textContent = "enter your name";
        $("display-name").focus();
        return;
      }
      try {
        joined = await api("join", [state.ctx.token, name], TIMEOUT.default, { retry: false }); // once
        dialog.close();
        resolve(joined);
      } catch (err) {
        $("name-error").textContent = errorText(err);
      }
    };
    dialog.showModal();
  });
}

function pageOptions() {
  // #token=...&decoder=full (unquantised ONNX decoder) | server (SAM decoded on the server only)
  const params = new URLSearchParams(window.location.hash.replace(/^#/, ""));
  return { decoder: params.get("decoder") || "quantized" };
}

async function main() {
  try {
    state.ctx = pageContext();
    state.options = pageOptions();
    if (!state.ctx.token) throw new Error("this link has no session token (#token=...)");
    message("connecting…");
    state.server = await openConnection();
    await refreshService();
    $("tool-sam").hidden = typeof state.annotate.sam_segment !== "function";
    state.session = await api("session_info", [state.ctx.token]);
    state.classes = state.session.classes;
    setText("session-name", state.session.name);
    showClasses();
    const storeKey = `colabel:${state.ctx.workspace}/${state.ctx.name}:t${storageLabel(state.ctx.token)}`;
    moveTokenKeyedEntries(`colabel:${state.ctx.workspace}/${state.ctx.name}:${state.ctx.token}`, storeKey);
    const stored = JSON.parse(localStorage.getItem(storeKey) || "null");
    let assignment = null;
    state.storeKey = storeKey;
    if (stored && stored.annotator_key) {
      state.key = stored.annotator_key;
      state.annotatorId = stored.annotator_id || null;
      try {
        // back to the image this browser was on (next_image moves on once an image is saved)
        const current = stored.current;
        if (current) {
          // checks the key; says the provider's return comment only while the image is still returned
          assignment = await api("open_image", [state.ctx.token, state.key, current.image_id]);
        } else assignment = await api("next_image", [state.ctx.token, state.key]);
      } catch (err) {
        if (!/unknown annotator key/.test(errorText(err))) throw err;
        localStorage.removeItem(storeKey);
      }
    }
    if (!assignment) {
      message("");
      document.body.dataset.state = "joining";
      const joined = await askName();
      state.key = joined.annotator_key;
      state.annotatorId = joined.annotator.annotator_id;
      localStorage.setItem(storeKey, JSON.stringify({
        annotator_key: joined.annotator_key, annotator_id: joined.annotator.annotator_id,
        display_name: joined.annotator.display_name,
      }));
      assignment = await api("next_image", [state.ctx.token, state.key]);
    }
    if (state.session.mode === "classification") {
      return (await import("./classify.js")).runClassification({ ...state, assignment }); // cell-classification mode
    }
    await showImage(assignment);
  } catch (err) {
    document.body.dataset.state = "error";
    message(errorText(err), true);
  }
}

// for tests and debugging: viewport pixel of an image point [x, y] (image rows down)
window.colabel = {
  state, map, source, select, history, saver, decodeSam, styleOf, lastSam: null, samResults: 0,
  pixelOf: (x, y) => {
    const pixel = map.getPixelFromCoordinate([x, state.H - y]);
    if (!pixel) return null; // before the map's first frame
    const [px, py] = pixel;
    const r = map.getTargetElement().getBoundingClientRect();
    return [r.left + px, r.top + py];
  },
};

main();
