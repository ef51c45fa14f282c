// Cell-classification mode of the annotator page (sessions of mode "classification"): the HALS loop.
// Nucleus outlines come from the provider's `cells`, class suggestions from `suggestions` (drawn muted and
// dashed; labels in full colours), labels go to `label_cell` (recorded there as a manual label, or as an
// accepted or corrected suggestion), `next_patch` moves the view to the Coreset patch and
// `classifier_status` gives the live model version, its self-check and this annotator's counts. Cells and
// suggestions are requested for the viewport only, so large images stay cheap. Other annotators' labels reach
// the page with the status poll (the view's labels are read again when the session's label count changed, and
// right before "Accept all visible"); an accept of a cell someone labelled meanwhile is not written by the
// provider, which answers with the cell's label, drawn here. Every call has a time limit: a slow or stopped
// model service shows a message and the page keeps working.
import "./classify.css";
import Map from "ol/Map.js";
import View from "ol/View.js";
import Feature from "ol/Feature.js";
import ImageLayer from "ol/layer/Image.js";
import VectorLayer from "ol/layer/Vector.js";
import ImageStatic from "ol/source/ImageStatic.js";
import VectorSource from "ol/source/Vector.js";
import Projection from "ol/proj/Projection.js";
import { defaults as defaultInteractions } from "ol/interaction/defaults.js";
import Polygon from "ol/geom/Polygon.js";
import MultiPolygon from "ol/geom/MultiPolygon.js";
import { Fill, Stroke, Style } from "ol/style.js";
import { getCenter } from "ol/extent.js";
import { SELF_CHECK_TITLE, errorText, el, selfCheck } from "./common.js";
import { pickLevel, toCanvas } from "./pixels.js";
import { showTiles } from "./tiles.js";

const $ = (id) => document.getElementById(id);

/** Time limits of the calls (ms): the first `cells` of an image segments it and computes features. */
export const LIMITS = { cells: 240_000, suggestions: 60_000, label: 30_000, patch: 120_000, status: 15_000, image: 120_000 };
/** Largest viewport region (level-0 pixels) whose cells are requested; zoom in beyond it. */
export const MAX_REGION_PIXELS = 4096 * 4096;
/** Cells kept in the browser; beyond it, those far from the view are dropped. */
export const MAX_KEPT_CELLS = 30_000;
/** The A key asks before accepting more suggestions than this at once (the button shows its count on its face). */
export const CONFIRM_ACCEPT_KEY = 100;
const POLL_MS = 3000;
const PARALLEL_LABELS = 4;

/** Rejects with "<what> did not answer within N s" when `promise` takes longer than `ms`. */
export function withTimeout(promise, ms, what) {
  let timer;
  const limit = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} did not answer within ${Math.round(ms / 1000)} s`)), ms);
  });
  return Promise.race([promise, limit]).finally(() => clearTimeout(timer));
}

/** The integer region {x, y, width, height} (image pixels, rows down) of an OpenLayers extent, or null. */
export function regionOf(extent, W, H) {
  const [minx, miny, maxx, maxy] = extent;
  const x0 = Math.max(0, Math.floor(minx));
  const y0 = Math.max(0, Math.floor(H - maxy));
  const x1 = Math.min(W, Math.ceil(maxx));
  const y1 = Math.min(H, Math.ceil(H - miny));
  return x1 > x0 && y1 > y0 ? { x: x0, y: y0, width: x1 - x0, height: y1 - y0 } : null;
}

/** "#rrggbb" -> [r, g, b]; `mute` mixes it halfway with grey (suggestions). */
function rgb(color, mute = false) {
  const c = [1, 3, 5].map((i) => parseInt(color.slice(i, i + 2), 16));
  return mute ? c.map((v) => Math.round(v * 0.55 + 140 * 0.45)) : c;
}

const S = {
  ctx: null, annotate: null, key: null, annotatorId: null, session: null, classes: [], images: [],
  image: null, W: 0, H: 0,
  cells: new globalThis.Map(), // cell_id -> {cell, feature}
  labels: new globalThis.Map(), // cell_id -> class name
  suggestions: new globalThis.Map(), // cell_id -> {class, confidence, uncertainty}
  selected: new Set(),
  nCells: null, nLabelled: null, cellsError: false,
  version: 0, status: null, patch: null, events: { label: 0, suggestion_accepted: 0, suggestion_corrected: 0 },
  generation: 0, busy: 0,
  shown: null, // the view region whose cells and suggestions were loaded last
  staleSuggestions: false,
  labelling: 0, // label batches in flight: suggestions are not refetched meanwhile (what was seen is accepted)
  labelBatches: 0, // label batches started: an answer asked for before one started may predate its labels
  loaded: null, // the region whose cells were requested last (the view with a margin)
  ready: null, // whether the provider suggests (the last status): false withdraws the suggestions drawn
  labelEvents: null, // the session's label events (all annotators) when this page last read the view's labels
};

// -- map ------------------------------------------------------------------------------------------
const cellSource = new VectorSource();
const patchSource = new VectorSource();
const styleCache = {};
function cached(key, make) {
  if (!styleCache[key]) styleCache[key] = make();
  return styleCache[key];
}
const SELECTED = new Style({ stroke: new Stroke({ color: "#ffffff", width: 5 }) });
// a transparent fill: clicks inside an outline hit the cell
const PLAIN = new Style({
  stroke: new Stroke({ color: "rgba(255,255,255,0.75)", width: 1 }), fill: new Fill({ color: "rgba(0,0,0,0)" }),
});

function cellStyle(feature) {
  const id = feature.get("cell_id");
  const label = S.labels.get(id);
  const suggestion = label ? null : S.suggestions.get(id);
  let base = PLAIN;
  if (label) {
    const cls = S.classes.find((c) => c.name === label);
    const [r, g, b] = rgb(cls ? cls.color : "#ffff00");
    base = cached(`l${label}`, () => new Style({
      stroke: new Stroke({ color: `rgb(${r},${g},${b})`, width: 2.5 }),
      fill: new Fill({ color: `rgba(${r},${g},${b},0.35)` }),
    }));
  } else if (suggestion) {
    const cls = S.classes.find((c) => c.name === suggestion.class);
    const [r, g, b] = rgb(cls ? cls.color : "#ffff00", true);
    base = cached(`s${suggestion.class}`, () => new Style({
      stroke: new Stroke({ color: `rgba(${r},${g},${b},0.9)`, width: 1.5, lineDash: [4, 3] }),
      fill: new Fill({ color: `rgba(${r},${g},${b},0.12)` }),
    }));
  }
  return S.selected.has(id) ? [SELECTED, base] : base;
}

const imageLayer = new ImageLayer();
const cellLayer = new VectorLayer({ source: cellSource, style: cellStyle });
const patchLayer = new VectorLayer({
  source: patchSource,
  style: new Style({ stroke: new Stroke({ color: "#ffd54f", width: 2, lineDash: [8, 6] }) }),
});
let map = null;

function toMap(ring) {
  return ring.map(([x, y]) => [x, S.H - y]);
}
function polygonOf(geometry) {
  if (geometry.type === "Polygon") return new Polygon(geometry.coordinates.map(toMap));
  if (geometry.type === "MultiPolygon") return new MultiPolygon(geometry.coordinates.map((p) => p.map(toMap)));
  return null;
}

// -- messages and progress ------------------------------------------------------------------------
function say(text, isError = false) {
  const box = $("classify-status");
  box.textContent = text || "";
  box.classList.toggle("error", isError);
}
function overlay(text) {
  const box = $("classify-message");
  box.hidden = !text;
  box.textContent = text || "";
}

function showProgress() {
  const perClass = (S.status && S.status.per_class) || {};
  $("classify-classes").replaceChildren(...S.classes.map((c, i) => el("button", {
    class: "class", style: `--c:${c.color}`, title: `label the selected cells "${c.name}" (key ${i + 1})`,
    "data-class": c.name, onclick: () => labelSelected(i),
  }, `${i + 1} ${c.name}`, el("span", { class: "count" }, ` ${perClass[c.name] ?? 0}`))));
  const total = S.nCells;
  const done = S.nLabelled;
  $("classify-progress").replaceChildren(...[
    el("div", {}, total !== null ? `${done} of ${total} cells of this image labelled`
      : S.cellsError ? "cells: unavailable" : "cells: …"),
    total ? el("progress", { max: total, value: done }) : null,
    el("div", { class: "muted" }, `you: ${S.events.label} labelled, ${S.events.suggestion_accepted} accepted, `
      + `${S.events.suggestion_corrected} corrected`)].filter(Boolean));
  const st = S.status;
  let model;
  const failed = st && !st.error && st.retrain_error
    ? `${st.retrain_error} (tried again on the next label change)` : null;
  if (!st) model = "classifier: …";
  else if (st.error) model = `classifier status unavailable: ${st.error}`;
  else if (!st.ready) {
    const perClass = Object.entries(st.per_class || {});
    const missing = perClass.some(([, n]) => n < st.min_labels_per_class);
    const needed = perClass.map(([name, n]) => `${name} ${Math.max(0, st.min_labels_per_class - n)}`).join(", ");
    if (failed && !missing) model = `classifier training failed: ${failed}`;
    else model = `no suggestions yet: labels still needed per class: ${needed}${failed ? `; training failed: ${failed}` : ""}`;
  } else {
    const check = selfCheck(st);
    model = `classifier ${st.start_model && !st.version ? `${st.start_model} (trained beforehand)` : `v${st.version}`}`
      + `${check ? `, ${check}` : ""}; ${st.n_labels} labels now`
      + (failed ? `; the last retrain failed: ${failed}` : "");
  }
  if (st && st.training) model += " · retraining…";
  $("classify-model").textContent = model;
  $("classify-model").title = st && st.ready && st.val_accuracy !== null && st.val_accuracy !== undefined
    ? SELF_CHECK_TITLE : "";
  $("classify-model").classList.toggle("error", Boolean(st && (st.error || failed)));
  const root = $("classify");
  root.dataset.version = String(S.version);
  const visible = visibleSuggestions().length;
  root.dataset.suggestions = String(visible);
  root.dataset.cells = String(S.cells.size);
  const accept = $("classify-accept");
  accept.disabled = !visible;
  // the count says what a click takes: every suggestion in view, also outside a next patch's dashed box
  accept.textContent = visible ? `Accept all visible (${visible})` : "Accept all visible";
  accept.title = `label the ${visible} suggested cells in view with their suggestions (A)`
    + (S.patch ? ", also those outside the dashed patch box" : "");
}

/** The status line while a next patch is shown: where it is, what it holds, what "Accept all visible" takes. */
function patchText() {
  const p = S.patch;
  if (!p) return "";
  const box = { x: p.x0, y: p.y0, width: p.x1 - p.x0, height: p.y1 - p.y0 };
  const visible = visibleSuggestions();
  let inBox = 0;
  for (const id of S.suggestions.keys()) {
    const entry = S.cells.get(id);
    if (entry && !S.labels.has(id) && inRegion(entry.cell.centroid, box)) inBox++;
  }
  const k = Array.isArray(p.selected_cells) ? p.selected_cells.length : null;
  const picked = `holds ${p.count} of the ${k ? `${k} ` : ""}cells most worth labelling`;
  const accept = visible.length > inBox
    ? `"Accept all visible" takes all ${visible.length} in view, also those outside the box`
    : `"Accept all visible" takes these ${visible.length}`;
  const suggested = visible.length || inBox
    ? `; suggestions: ${inBox} in the box, ${visible.length} in view. ${accept}.` : "";
  return `next patch (dashed box) x ${p.x0}–${p.x1}, y ${p.y0}–${p.y1}: ${picked}${suggested}`;
}

// -- cells and suggestions of the viewport ------------------------------------------------------
function viewRegion() {
  const size = map && map.getSize();
  if (!size || !map.getView().isDef()) return null;
  return regionOf(map.getView().calculateExtent(size), S.W, S.H);
}

/** The region grown by `margin` of its size on every side, clamped to the image (cells are fetched ahead). */
function grown(r, margin = 0.25) {
  const dx = Math.round(r.width * margin);
  const dy = Math.round(r.height * margin);
  const x = Math.max(0, r.x - dx);
  const y = Math.max(0, r.y - dy);
  return { x, y, width: Math.min(S.W, r.x + r.width + dx) - x, height: Math.min(S.H, r.y + r.height + dy) - y };
}

function inRegion([x, y], r) {
  return x >= r.x && x < r.x + r.width && y >= r.y && y < r.y + r.height;
}

/** Suggestions of unlabelled cells whose centroid lies in the view: [{cell_id, class, ...}]. */
function visibleSuggestions() {
  if (!map || !S.image) return [];
  const r = viewRegion();
  if (!r) return [];
  const out = [];
  for (const [id, s] of S.suggestions) {
    const entry = S.cells.get(id);
    if (entry && !S.labels.has(id) && inRegion(entry.cell.centroid, r)) out.push({ cell_id: id, ...s });
  }
  return out;
}

async function loadView() {
  if (!S.image || typeof S.annotate.cells !== "function") return;
  const generation = ++S.generation;
  const imageId = S.image.image_id;
  const region = viewRegion();
  if (!region) return;
  if (region.width * region.height > MAX_REGION_PIXELS) {
    overlay("zoom in to see the cells");
    return;
  }
  S.busy++;
  const first = !S.cells.size;
  say(first ? "finding the cells (the first time on an image takes a while)…" : "loading cells…");
  try {
    const ahead = grown(region);
    const result = await withTimeout(S.annotate.cells(S.ctx.token, imageId, ahead), LIMITS.cells, "the cell service");
    if (generation !== S.generation || !S.image || S.image.image_id !== imageId) return;
    S.cellsError = false;
    S.loaded = ahead;
    mergeCells(result.cells, ahead);
    if (typeof result.n_cells === "number") {
      S.nCells = result.n_cells;
      S.nLabelled = result.n_labelled;
    }
    overlay("");
    const suggested = await loadSuggestions(region, generation);
    // back to the resting line (a shown patch's description), unless the suggestions' failure is being shown
    if (generation === S.generation) {
      S.shown = region;
      if (suggested) say(patchText());
    }
  } catch (err) {
    if (generation === S.generation) {
      S.cellsError = true;
      say(`cells unavailable: ${errorText(err)}`, true);
    }
  } finally {
    S.busy--;
    showProgress();
    document.body.dataset.state = "ready";
  }
}

function mergeCells(cells, region) {
  if (S.cells.size + cells.length > MAX_KEPT_CELLS) { // a large image: forget the cells far from the view
    for (const [id, entry] of S.cells) {
      if (!inRegion(entry.cell.centroid, region)) {
        cellSource.removeFeature(entry.feature);
        S.cells.delete(id);
        S.suggestions.delete(id);
        S.labels.delete(id);
        S.selected.delete(id);
      }
    }
  }
  const fresh = [];
  for (const cell of cells) {
    if (cell.label) S.labels.set(cell.cell_id, cell.label);
    else S.labels.delete(cell.cell_id);
    if (S.cells.has(cell.cell_id)) continue;
    const geometry = polygonOf(cell.polygon);
    if (!geometry) continue;
    const feature = new Feature(geometry);
    feature.setId(cell.cell_id);
    feature.set("cell_id", cell.cell_id);
    S.cells.set(cell.cell_id, { cell, feature });
    fresh.push(feature);
  }
  cellSource.addFeatures(fresh);
  cellLayer.changed();
}

/** Fetches the suggestions of `region`; false when that failed (the status line then says why). */
async function loadSuggestions(region = viewRegion(), generation = S.generation) {
  if (!region || !S.image || typeof S.annotate.suggestions !== "function") return true;
  const imageId = S.image.image_id;
  try {
    const result = await withTimeout(S.annotate.suggestions(S.ctx.token, S.key, imageId, region),
      LIMITS.suggestions, "the classifier");
    if (generation !== S.generation || !S.image || S.image.image_id !== imageId) return true;
    for (const [id, entry] of S.cells) if (inRegion(entry.cell.centroid, region)) S.suggestions.delete(id);
    for (const s of result.suggestions) {
      S.suggestions.set(s.cell_id, { class: s.class, confidence: s.confidence, uncertainty: s.uncertainty });
    }
    S.version = Math.max(S.version, result.version);
    cellLayer.changed();
    return true;
  } catch (err) {
    say(`suggestions unavailable: ${errorText(err)}`, true);
    return false;
  } finally {
    showProgress();
  }
}

/** Reads the labels of the loaded region again (other annotators label too) with the image's progress; true when
 * they are in, or there is nothing to read. Its answer is dropped (false) when a label batch of this page was in
 * flight (besides `own`, an accept being prepared) or started meanwhile (it may predate those labels), or the
 * view or image changed. */
async function refreshLabels(limit = LIMITS.status, own = 0) {
  const region = S.loaded;
  if (!region || !S.image || typeof S.annotate.cells !== "function") return true;
  const imageId = S.image.image_id;
  const generation = S.generation;
  const batches = S.labelBatches;
  if (S.labelling > own) return false;
  try {
    const result = await withTimeout(S.annotate.cells(S.ctx.token, imageId, region), limit, "the cell service");
    if (generation !== S.generation || S.labelling > own || batches !== S.labelBatches || !S.image
        || S.image.image_id !== imageId) return false;
    mergeCells(result.cells, region);
    if (typeof result.n_cells === "number") {
      S.nCells = result.n_cells;
      S.nLabelled = result.n_labelled;
    }
    return true;
  } catch {
    return false; // tried again at the next poll; the provider refuses stale accepts meanwhile
  }
}

let viewTimer = null;
function scheduleView() {
  clearTimeout(viewTimer);
  viewTimer = setTimeout(loadView, 200);
}

// -- labelling ----------------------------------------------------------------------------------
async function labelCells(items) {
  // items: [{cell_id, class, suggested}]; `suggested` is the suggestion shown when the annotator acted (null for
  // none), so an "accept all" stays an acceptance even when the classifier retrains while it is being saved.
  // Optimistic: drawn labelled at once, undone when the provider refuses
  const imageId = S.image.image_id;
  const before = new globalThis.Map(items.map((it) => [it.cell_id, S.labels.get(it.cell_id)]));
  S.labelling++;
  S.labelBatches++;
  const kept = []; // [{cell_id, class, by}]: accepts of cells labelled meanwhile by someone, not written
  for (const it of items) S.labels.set(it.cell_id, it.class);
  cellLayer.changed();
  let failed = 0;
  let lastError = "";
  let newest = S.version;
  let index = 0;
  let done = 0;
  const worker = async () => {
    while (index < items.length) {
      const it = items[index++];
      try {
        const result = await withTimeout(S.annotate.label_cell(S.ctx.token, S.key, imageId, it.cell_id, it.class,
          it.suggested ?? null),
          LIMITS.label, "the labelling service");
        if (!result.event && result.already_labelled) {
          // a stale accept: the cell was labelled meanwhile (by another annotator, or another tab); theirs stays
          const current = result.already_labelled;
          kept.push({ cell_id: it.cell_id, class: current.class,
            by: current.annotator_id === S.annotatorId ? "you" : current.display_name || current.annotator_id });
          S.labels.set(it.cell_id, current.class);
          S.suggestions.delete(it.cell_id);
          if (before.get(it.cell_id) === undefined && S.nLabelled !== null) S.nLabelled++;
          newest = Math.max(newest, result.version);
          continue;
        }
        // `unchanged`: the cell had this label from this annotator already; nothing was written, nothing counts
        if (result.event) S.events[result.event] = (S.events[result.event] || 0) + 1;
        S.labels.set(it.cell_id, it.class); // again: a cells answer may have overwritten it meanwhile
        if (before.get(it.cell_id) === undefined && S.nLabelled !== null) S.nLabelled++;
        S.suggestions.delete(it.cell_id);
        newest = Math.max(newest, result.version);
        if (S.status && S.status.per_class && !before.get(it.cell_id)) {
          S.status.per_class[it.class] = (S.status.per_class[it.class] || 0) + 1;
        }
      } catch (err) {
        failed++;
        lastError = errorText(err);
        if (before.get(it.cell_id)) S.labels.set(it.cell_id, before.get(it.cell_id));
        else S.labels.delete(it.cell_id);
      } finally {
        done++;
        if (items.length > 1) say(`labelled ${done} of ${items.length}…`);
      }
    }
  };
  try {
    await Promise.all(Array.from({ length: Math.min(PARALLEL_LABELS, items.length) }, worker));
  } finally {
    S.labelling--;
  }
  cellLayer.changed();
  const keptText = keptLine(kept);
  const saved = items.length - failed - kept.length;
  if (failed) say(`${failed} of ${items.length} labels not saved: ${lastError}${keptText ? `; ${keptText}` : ""}`, true);
  else if (kept.length) say(saved ? `labelled ${saved} cell${saved === 1 ? "" : "s"}; ${keptText}` : keptText);
  else say(items.length > 1 ? `labelled ${items.length} cells` : `labelled cell ${items[0].cell_id} ${items[0].class}`);
  showProgress();
  if (newest > S.version || S.staleSuggestions) {
    S.version = Math.max(S.version, newest);
    if (!S.labelling) {
      S.staleSuggestions = false;
      await loadSuggestions();
    }
  }
  pollStatus();
}

/** "cell 12 was labelled negative meanwhile by Bob: kept" / "3 cells were labelled meanwhile by Bob, Ann: kept
 * their labels" for accepts the provider did not write; "" for none. */
function keptLine(kept) {
  if (!kept.length) return "";
  const by = [...new Set(kept.map((k) => k.by))].join(", ");
  return kept.length === 1
    ? `cell ${kept[0].cell_id} was labelled ${kept[0].class} meanwhile by ${by}: kept`
    : `${kept.length} cells were labelled meanwhile by ${by}: kept their labels`;
}

function labelSelected(classIndex) {
  const cls = S.classes[classIndex];
  if (!cls || !S.image) return;
  if (!S.selected.size) {
    say("select a cell first (click it), then press its class number");
    return;
  }
  const items = [...S.selected].map((id) => ({ cell_id: id, class: cls.name,
    suggested: S.suggestions.get(id)?.class ?? null }));
  S.selected.clear();
  labelCells(items);
}

/** Accepts every suggestion in view; asks first when there are more than `confirmAbove` (the A key: one stray
 * keystroke must not label a whole zoomed-out image; the button shows its count on its face). The view's labels
 * are read first: cells other annotators labelled since the last poll are not accepted over (the provider would
 * not write those accepts either). */
let accepting = false;
async function acceptAllVisible({ confirmAbove = Infinity } = {}) {
  if (accepting) return;
  accepting = true;
  S.labelling++; // counted from the key press or click: polls leave the labels alone, tests wait for the batch
  try {
    await refreshLabels(LIMITS.status, 1);
  } finally {
    S.labelling--; // labelCells counts the batch again, in this same task
    accepting = false;
  }
  const items = visibleSuggestions().map((s) => ({ cell_id: s.cell_id, class: s.class, suggested: s.class }));
  if (!items.length) {
    say("no suggestions in view");
    return;
  }
  if (items.length > confirmAbove && !window.confirm(`Accept all ${items.length} suggestions in view? Each is `
      + "recorded as your label of that cell (and trains the classifier); this cannot be undone here.")) {
    say(`not accepted: ${items.length} suggestions in view; zoom in, or press A again and confirm`);
    return;
  }
  S.selected.clear();
  labelCells(items);
}

// -- next patch (Coreset) -----------------------------------------------------------------------
async function nextPatch() {
  if (!S.image || typeof S.annotate.next_patch !== "function") return;
  const imageId = S.image.image_id;
  $("classify-next-patch").disabled = true;
  say("choosing the next patch…");
  try {
    const patch = await withTimeout(S.annotate.next_patch(S.ctx.token, imageId), LIMITS.patch, "the Coreset service");
    if (!S.image || S.image.image_id !== imageId) return;
    if (!patch.count || patch.x0 === undefined || patch.x0 === null) {
      S.patch = null;
      patchSource.clear();
      showProgress();
      say("every cell of this image is labelled");
      return;
    }
    S.patch = patch;
    const extent = [patch.x0, S.H - patch.y1, patch.x1, S.H - patch.y0];
    patchSource.clear();
    patchSource.addFeature(new Feature(new Polygon([[
      [extent[0], extent[1]], [extent[2], extent[1]], [extent[2], extent[3]], [extent[0], extent[3]], [extent[0], extent[1]],
    ]])));
    map.getView().fit(extent, { padding: [20, 20, 20, 20] });
    say(patchText()); // said again with the counts of the new view once its cells and suggestions are in
  } catch (err) {
    say(`next patch unavailable: ${errorText(err)}`, true);
  } finally {
    $("classify-next-patch").disabled = false;
  }
}

// -- classifier status (polled) ------------------------------------------------------------------
let polling = false;
async function pollStatus() {
  if (polling || typeof S.annotate.classifier_status !== "function") return;
  polling = true;
  const batches = S.labelBatches;
  try {
    const status = await withTimeout(S.annotate.classifier_status(S.ctx.token), LIMITS.status, "the classifier");
    S.status = status;
    // no label of this page in flight or sent since it was asked: the provider's counts are this page's truth
    const settled = !S.labelling && batches === S.labelBatches;
    if (settled) takeMyCounts(status);
    if (!status.ready) {
      // suggestions paused (a class lacks labels again) or not started: none drawn, none to accept
      S.ready = false;
      if (S.suggestions.size) {
        S.suggestions.clear();
        cellLayer.changed();
      }
    } else if (status.version > S.version || S.ready === false) {
      S.version = Math.max(S.version, status.version);
      S.ready = true;
      // a retrain finished, or suggestions resumed: new suggestions for the view, once the labels being sent are in
      if (S.labelling) S.staleSuggestions = true;
      else await loadSuggestions();
    } else S.ready = true;
    // someone labelled (this page included): the view's labels again, so other annotators' labels show here
    const events = Object.values(status.per_annotator || {}).reduce((a, b) => a + b, 0);
    if (settled && events !== S.labelEvents && await refreshLabels()) S.labelEvents = events;
  } catch (err) {
    S.status = { ...(S.status || {}), error: errorText(err) };
  } finally {
    polling = false;
    showProgress();
  }
}

/** This annotator's label counts from the provider (`per_annotator_events`), so they survive a reload; an older
 * provider without them, or an annotator id this browser did not keep, leaves this visit's counts. */
function takeMyCounts(status) {
  if (!S.annotatorId || !status.per_annotator_events) return;
  S.events = { label: 0, suggestion_accepted: 0, suggestion_corrected: 0,
    ...(status.per_annotator_events[S.annotatorId] || {}) };
}

// -- images ---------------------------------------------------------------------------------------
async function showImage(image) {
  S.generation++;
  S.image = image;
  S.cells.clear();
  S.labels.clear();
  S.suggestions.clear();
  S.selected.clear();
  S.nCells = S.nLabelled = null;
  S.patch = null;
  S.shown = null;
  S.loaded = null;
  cellSource.clear();
  patchSource.clear();
  $("classify-image").value = image.image_id;
  document.body.dataset.state = "loading";
  overlay("loading image…");
  const [H, W] = image.shape;
  S.W = W;
  S.H = H;
  const level = pickLevel(image);
  const pixels = await withTimeout(S.annotate.get_image(S.ctx.token, image.image_id, null, level), LIMITS.image,
    "the image service");
  const canvas = toCanvas(pixels);
  const blob = await new Promise((ok) => canvas.toBlob(ok, "image/png"));
  const extent = [0, 0, W, H];
  const projection = new Projection({ code: `colabel-classify-${image.image_id}`, units: "pixels", extent });
  imageLayer.setSource(new ImageStatic({
    url: URL.createObjectURL(blob), projection, imageExtent: extent, interpolate: level > 0,
  }));
  // an image over one level: the level loaded above is its overview; zoomed in, finer levels come as tiles (tiles.js)
  showTiles(map, imageLayer, { image, overview: level, pixels, projection,
    fetch: (region, lvl) => withTimeout(S.annotate.get_image(S.ctx.token, image.image_id, region, lvl), LIMITS.image,
      "the image service") });
  const view = new View({ projection, center: getCenter(extent), maxZoom: 10 });
  map.setView(view);
  view.fit(extent, { padding: [10, 10, 10, 10] });
  // load the cells now: a moveend follows only when the view changed, not after an image of the same size
  scheduleView();
  overlay("");
  showProgress();
  if (typeof S.annotate.cells !== "function") {
    say("cell classification needs the nuclei and classifier model services, which this provider does not run",
      true);
    document.body.dataset.state = "ready";
  }
}

// -- input ----------------------------------------------------------------------------------------
function onClick(e) {
  const hit = map.forEachFeatureAtPixel(e.pixel, (f) => f, { layerFilter: (l) => l === cellLayer, hitTolerance: 2 });
  const id = hit ? hit.get("cell_id") : null;
  if (!e.originalEvent.shiftKey) S.selected.clear();
  if (id !== null && id !== undefined) {
    if (S.selected.has(id)) S.selected.delete(id);
    else S.selected.add(id);
    const s = S.suggestions.get(id);
    const label = S.labels.get(id);
    say(`cell ${id}: ${label ? `labelled ${label}` : s ? `suggested ${s.class} (${(100 * s.confidence).toFixed(0)}%)`
      : "unlabelled"}; press a class number`);
  }
  cellLayer.changed();
}

function onKey(e) {
  if (e.target instanceof HTMLInputElement || e.target instanceof HTMLSelectElement) return;
  if ($("name-dialog") && $("name-dialog").open) return;
  // the shortcuts are plain keys: Ctrl+A (select all), Ctrl/Alt+digit (a browser tab), Ctrl+P (print) and the
  // like are the browser's and the system's, never a label; Shift and Caps Lock still give A and P
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  const key = e.key.length === 1 ? e.key.toLowerCase() : e.key;
  if (/^[1-9]$/.test(key)) labelSelected(Number(key) - 1);
  else if (key === "a" && !e.repeat) acceptAllVisible({ confirmAbove: CONFIRM_ACCEPT_KEY });
  else if (key === "p" && !e.repeat) nextPatch();
  else if (key === "Escape") {
    S.selected.clear();
    cellLayer.changed();
  }
}

/** Runs the classification page: `{ctx, annotate, session, key, assignment}` from the annotator page's join. */
export async function runClassification({ ctx, annotate, session, key, annotatorId, assignment }) {
  Object.assign(S, { ctx, annotate, session, key, annotatorId: annotatorId || null, classes: session.classes });
  document.body.classList.add("classify-mode");
  $("classify").hidden = false;
  $("session-name").textContent = session.name;
  $("position").textContent = "cell classification";
  // no double-click zoom: OpenLayers takes any two clicks within 250 ms as one, so quick clicks on two cells
  // (or shift-clicks selecting several) zoomed the map in (or out)
  map = new Map({ target: "classify-map", layers: [imageLayer, cellLayer, patchLayer],
    interactions: defaultInteractions({ doubleClickZoom: false }) });
  map.on("click", onClick);
  map.on("moveend", scheduleView);
  document.addEventListener("keydown", onKey);
  $("classify-accept").addEventListener("click", () => acceptAllVisible());
  $("classify-next-patch").addEventListener("click", nextPatch);
  $("classify-next-patch").hidden = typeof annotate.next_patch !== "function";
  S.images = (await annotate.list_images(ctx.token)).filter((im) => !im.error && im.shape);
  $("classify-image").replaceChildren(...S.images.map((im) => el("option", { value: im.image_id }, im.name)));
  $("classify-image").addEventListener("change", async (e) => {
    const image = S.images.find((im) => im.image_id === e.target.value);
    if (image) await showImage(image).catch((err) => overlay(errorText(err)));
  });
  showProgress();
  pollStatus();
  setInterval(pollStatus, POLL_MS);
  const first = (assignment && assignment.image) || S.images[0];
  if (!first) {
    overlay("this session has no readable images");
    document.body.dataset.state = "done";
    return;
  }
  await showImage(first);
}

// for tests and debugging: viewport pixel of an image point [x, y] (image rows down), the state
window.colabelClassify = {
  S, visibleSuggestions, viewRegion: () => viewRegion(),
  get map() { return map; },
  pixelOf: (x, y) => {
    const pixel = map.getPixelFromCoordinate([x, S.H - y]);
    if (!pixel) return null; // before the map's first frame
    const [px, py] = pixel;
    const r = map.getTargetElement().getBoundingClientRect();
    return [r.left + px, r.top + py];
  },
  /** Viewport pixel of a point inside the cell's outline (its centroid may lie outside a concave one). */
  cellPixel: (id) => {
    const geometry = S.cells.get(id).feature.getGeometry();
    const polygon = geometry instanceof MultiPolygon ? geometry.getPolygon(0) : geometry;
    const [x, y] = polygon.getInteriorPoint().getCoordinates();
    const [px, py] = map.getPixelFromCoordinate([x, y]);
    const r = map.getTargetElement().getBoundingClientRect();
    return [r.left + px, r.top + py];
  },
};
