// The annotator page (the share URL): join once, get images one by one, draw classified polygons,
// every change saved as a new version of the whole FeatureCollection.
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
import Polygon from "ol/geom/Polygon.js";
import MultiPolygon from "ol/geom/MultiPolygon.js";
import Draw from "ol/interaction/Draw.js";
import Modify from "ol/interaction/Modify.js";
import Select from "ol/interaction/Select.js";
import { Fill, Stroke, Style } from "ol/style.js";
import { getCenter } from "ol/extent.js";
import { click } from "ol/events/condition.js";
import { connect, errorText, el, pageContext } from "./common.js";
import { pickLevel, toCanvas } from "./pixels.js";

const $ = (id) => document.getElementById(id);
const state = {
  ctx: null, annotate: null, key: null, session: null, classes: [], current: 0,
  image: null, W: 0, H: 0, version: 0, tool: "draw", samPoints: [], samLabels: [], samFeature: null,
};
let uid = 0;

function message(text, isError = false) {
  const box = $("message");
  box.hidden = !text;
  box.textContent = text || "";
  box.classList.toggle("error", isError);
}

function saveStatus(text, isError = false) {
  const s = $("save-status");
  s.textContent = text;
  s.classList.toggle("error", isError);
}

// -- map ---------------------------------------------------------------------------------------
const source = new VectorSource();
const styles = {};
function styleOf(feature, selected = false) {
  const cls = state.classes.find((c) => c.name === feature.get("cls"));
  const color = cls ? cls.color : "#ffff00";
  const key = color + selected;
  if (!styles[key]) {
    const [r, g, b] = [1, 3, 5].map((i) => parseInt(color.slice(i, i + 2), 16));
    styles[key] = new Style({
      stroke: new Stroke({ color: selected ? "#ffffff" : color, width: selected ? 3 : 2 }),
      fill: new Fill({ color: `rgba(${r},${g},${b},${selected ? 0.45 : 0.25})` }),
    });
  }
  return styles[key];
}
const vectorLayer = new VectorLayer({ source, style: (f) => styleOf(f) });
const imageLayer = new ImageLayer();
const map = new Map({ target: "map", layers: [imageLayer, vectorLayer] });
// `click`, not the default `singleclick`: selects at once instead of after the double-click delay
const select = new Select({ layers: [vectorLayer], style: (f) => styleOf(f, true), condition: click });
const modify = new Modify({ features: select.getFeatures() });
let draw = null;

function setTool(tool) {
  if (tool === "sam" && $("tool-sam").hidden) return;
  state.tool = tool;
  for (const name of ["draw", "edit", "sam"]) $(`tool-${name}`).classList.toggle("active", name === tool);
  if (draw) map.removeInteraction(draw);
  map.removeInteraction(select);
  map.removeInteraction(modify);
  select.getFeatures().clear();
  resetSam();
  if (tool === "draw" && state.image) {
    draw = new Draw({ source, type: "Polygon" });
    draw.on("drawend", (e) => {
      e.feature.setId(`f${Date.now().toString(36)}-${uid++}`);
      e.feature.set("cls", state.classes[state.current]?.name);
      // the feature is added to the source right after this event
      setTimeout(scheduleSave, 0);
    });
    map.addInteraction(draw);
  } else if (tool === "edit") {
    map.addInteraction(select);
    map.addInteraction(modify);
  }
}
modify.on("modifyend", () => scheduleSave());

// -- coordinates: OpenLayers y points up, image rows down (row = H - y) --------------------------
const clampX = (x) => Math.min(state.W, Math.max(0, x));
const clampY = (y) => Math.min(state.H, Math.max(0, y));
const toImage = (ring) => ring.map(([x, y]) => [clampX(x), clampY(state.H - y)]);
const toMap = (ring) => ring.map(([x, y]) => [x, state.H - y]);

function featureToGeoJSON(feature) {
  const geom = feature.getGeometry();
  let geometry;
  if (geom instanceof Polygon) geometry = { type: "Polygon", coordinates: geom.getCoordinates().map(toImage) };
  else if (geom instanceof MultiPolygon) {
    geometry = { type: "MultiPolygon", coordinates: geom.getCoordinates().map((p) => p.map(toImage)) };
  } else return null;
  const cls = feature.get("cls");
  return {
    type: "Feature", id: String(feature.getId()), geometry,
    properties: { objectType: "annotation", ...(cls ? { classification: { name: cls } } : {}) },
  };
}

function geoJSONToFeature(f) {
  const g = f.geometry;
  let geom;
  if (g.type === "Polygon") geom = new Polygon(g.coordinates.map(toMap));
  else if (g.type === "MultiPolygon") geom = new MultiPolygon(g.coordinates.map((p) => p.map(toMap)));
  else return null;
  const feature = new Feature(geom);
  feature.setId(f.id ?? `f${Date.now().toString(36)}-${uid++}`);
  const c = f.properties && f.properties.classification;
  feature.set("cls", typeof c === "string" ? c : c && c.name);
  return feature;
}

function collection() {
  return { type: "FeatureCollection", features: source.getFeatures().map(featureToGeoJSON).filter(Boolean) };
}

// -- autosave: one save at a time, the latest state always saved last ------------------------
let saving = null;
let pending = false;
function scheduleSave() {
  pending = true;
  if (!saving) saving = runSaves();
  return saving;
}
async function runSaves() {
  while (pending) {
    pending = false;
    const imageId = state.image.image_id;
    saveStatus("saving…");
    try {
      const record = await state.annotate.save_annotation(state.ctx.token, state.key, imageId, collection());
      if (state.image && state.image.image_id === imageId) state.version = record.version;
      saveStatus(`saved v${record.version}`);
    } catch (err) {
      saveStatus(`not saved: ${errorText(err)}`, true);
    }
  }
  saving = null;
}

// -- classes ---------------------------------------------------------------------------------
function showClasses() {
  const box = $("classes");
  box.replaceChildren(...state.classes.map((c, i) => el("button", {
    class: "class" + (i === state.current ? " active" : ""), style: `--c:${c.color}`,
    title: `key ${i + 1}`, onclick: () => setClass(i),
  }, `${i + 1} ${c.name}`)));
}
function setClass(i) {
  if (i < 0 || i >= state.classes.length) return;
  state.current = i;
  showClasses();
  const chosen = select.getFeatures().getArray();
  if (chosen.length) {
    for (const f of chosen) f.set("cls", state.classes[i].name);
    scheduleSave();
  }
  if (state.samFeature) { state.samFeature.set("cls", state.classes[i].name); scheduleSave(); }
}

// -- SAM (when the provider runs the model services) -------------------------------------------
function resetSam() {
  state.samPoints = [];
  state.samLabels = [];
  state.samFeature = null;
}
map.on("singleclick", async (e) => {
  if (state.tool !== "sam" || !state.image) return;
  const [x, y] = e.coordinate;
  if (x < 0 || x > state.W || y < 0 || y > state.H) return;
  const negative = e.originalEvent.altKey;
  state.samPoints.push([x, state.H - y]);
  state.samLabels.push(negative ? 0 : 1);
  saveStatus("segmenting…");
  try {
    const result = await state.annotate.sam_segment(state.ctx.token, state.image.image_id,
      { points: state.samPoints, labels: state.samLabels });
    if (state.samFeature) source.removeFeature(state.samFeature);
    state.samFeature = null;
    if (result.features.length) {
      const f = geoJSONToFeature({ ...result.features[0], id: undefined });
      f.set("cls", state.classes[state.current]?.name);
      source.addFeature(f);
      state.samFeature = f;
    }
    scheduleSave();
  } catch (err) {
    saveStatus(`SAM: ${errorText(err)}`, true);
  }
});

// -- keys ------------------------------------------------------------------------------------
document.addEventListener("keydown", (e) => {
  if (e.target instanceof HTMLInputElement || $("name-dialog").open) return;
  if (/^[1-9]$/.test(e.key)) setClass(Number(e.key) - 1);
  else if (e.key === "Delete" || e.key === "Backspace") {
    const chosen = select.getFeatures().getArray().slice();
    if (!chosen.length) return;
    select.getFeatures().clear();
    for (const f of chosen) source.removeFeature(f);
    scheduleSave();
  } else if (e.key === "Escape" && draw) draw.abortDrawing();
  else if (e.key === "d") setTool("draw");
  else if (e.key === "e") setTool("edit");
  else if (e.key === "s") setTool("sam");
  else if (e.key === "n" && state.tool === "sam") { resetSam(); saveStatus("SAM: new object"); }
});
for (const name of ["draw", "edit", "sam"]) $(`tool-${name}`).addEventListener("click", () => setTool(name));

// -- images ----------------------------------------------------------------------------------
function remember(assignment) {
  if (!state.storeKey) return;
  const stored = JSON.parse(localStorage.getItem(state.storeKey) || "{}");
  stored.current = assignment.image
    ? { image_id: assignment.image.image_id, position: assignment.position, total: assignment.total } : null;
  localStorage.setItem(state.storeKey, JSON.stringify(stored));
}

async function showImage(assignment) {
  const { image, position, total } = assignment;
  remember(assignment);
  source.clear();
  select.getFeatures().clear();
  state.image = image;
  state.version = 0;
  if (!image) {
    imageLayer.setSource(null);
    $("position").textContent = total ? `all ${total} images done` : "no images";
    $("next-image").disabled = true;
    document.body.dataset.state = "done";
    message("No more images for you in this session. Thank you!");
    return;
  }
  document.body.dataset.state = "loading";
  $("position").textContent = `image ${position} of ${total}: ${image.name}`;
  message("loading image…");
  const [H, W] = image.shape;
  state.W = W;
  state.H = H;
  const level = pickLevel(image);
  const pixels = await state.annotate.get_image(state.ctx.token, image.image_id, null, level);
  const canvas = toCanvas(pixels);
  const blob = await new Promise((ok) => canvas.toBlob(ok, "image/png"));
  const extent = [0, 0, W, H];
  const projection = new Projection({ code: `colabel-${image.image_id}`, units: "pixels", extent });
  imageLayer.setSource(new ImageStatic({
    url: URL.createObjectURL(blob), projection, imageExtent: extent, interpolate: level > 0,
  }));
  const view = new View({ projection, center: getCenter(extent), maxZoom: 10 });
  map.setView(view);
  view.fit(extent, { padding: [10, 10, 10, 10] });
  const versions = await state.annotate.list_versions(state.ctx.token, state.key, image.image_id);
  if (versions.length) {
    const stored = await state.annotate.get_annotations(state.ctx.token, state.key, image.image_id);
    state.version = versions[versions.length - 1];
    source.addFeatures(stored.features.map(geoJSONToFeature).filter(Boolean));
    saveStatus(`saved v${state.version}`);
  } else if (typeof state.annotate.pre_annotation === "function") {
    // a trained model's proposals, editable; stored only when the annotator saves
    try {
      const proposed = await state.annotate.pre_annotation(state.ctx.token, image.image_id);
      source.addFeatures(proposed.features.map(geoJSONToFeature).filter(Boolean));
      saveStatus(`${proposed.features.length} pre-annotations: edit, then save`);
    } catch (err) {
      saveStatus("");
      message(`pre-annotations unavailable: ${errorText(err)}`, true);
    }
  } else saveStatus("");
  if (typeof state.annotate.sam_prepare === "function") {
    state.annotate.sam_prepare(state.ctx.token, image.image_id).catch(() => {});
  }
  setTool(state.tool);
  message("");
  $("next-image").disabled = false;
  document.body.dataset.state = "ready";
}

async function nextImage() {
  $("next-image").disabled = true;
  try {
    if (saving) await saving;
    // an image never saved is saved as it is (possibly empty: "nothing to annotate here")
    if (state.image && !state.version) await scheduleSave();
    if (state.image && !state.version) { $("next-image").disabled = false; return; }
    await showImage(await state.annotate.next_image(state.ctx.token, state.key));
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
    $("name-form").onsubmit = async (e) => {
      e.preventDefault();
      const name = $("display-name").value.trim();
      if (!name) return;
      try {
        const joined = await state.annotate.join(state.ctx.token, name);
        dialog.close();
        resolve(joined);
      } catch (err) {
        $("name-error").textContent = errorText(err);
      }
    };
    dialog.showModal();
  });
}

async function main() {
  try {
    state.ctx = pageContext();
    if (!state.ctx.token) throw new Error("this link has no session token (#token=...)");
    message("connecting…");
    const server = await connect({ server_url: state.ctx.serverUrl });
    state.annotate = await server.getService(`${state.ctx.workspace}/${state.ctx.name}-annotate`);
    $("tool-sam").hidden = typeof state.annotate.sam_segment !== "function";
    state.session = await state.annotate.session_info(state.ctx.token);
    state.classes = state.session.classes;
    $("session-name").textContent = state.session.name;
    showClasses();
    const storeKey = `colabel:${state.ctx.workspace}/${state.ctx.name}:${state.ctx.token}`;
    const stored = JSON.parse(localStorage.getItem(storeKey) || "null");
    let assignment = null;
    state.storeKey = storeKey;
    if (stored && stored.annotator_key) {
      state.key = stored.annotator_key;
      try {
        // back to the image this browser was on (next_image moves on once an image is saved)
        const current = stored.current;
        if (current) {
          await state.annotate.list_versions(state.ctx.token, state.key, current.image_id); // checks the key
          const image = await state.annotate.image_info(state.ctx.token, current.image_id);
          assignment = { image, position: current.position, total: current.total };
        } else assignment = await state.annotate.next_image(state.ctx.token, state.key);
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
      localStorage.setItem(storeKey, JSON.stringify({
        annotator_key: joined.annotator_key, annotator_id: joined.annotator.annotator_id,
        display_name: joined.annotator.display_name,
      }));
      assignment = await state.annotate.next_image(state.ctx.token, state.key);
    }
    await showImage(assignment);
  } catch (err) {
    document.body.dataset.state = "error";
    message(errorText(err), true);
  }
}

// for tests and debugging: viewport pixel of an image point [x, y] (image rows down)
window.colabel = {
  state, map, source, select,
  pixelOf: (x, y) => {
    const [px, py] = map.getPixelFromCoordinate([x, state.H - y]);
    const r = map.getTargetElement().getBoundingClientRect();
    return [r.left + px, r.top + py];
  },
};

main();
