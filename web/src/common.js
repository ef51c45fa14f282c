// Shared by both pages: where we are (workspace, provider name, token) and the Hypha connection.
import { hyphaWebsocketClient } from "hypha-rpc";

/** `/<workspace>/apps/<name>-web/<page>#token=...` -> {serverUrl, workspace, name, token}. */
export function pageContext(loc = window.location) {
  const parts = loc.pathname.split("/").filter(Boolean);
  const appsAt = parts.indexOf("apps");
  if (appsAt < 1 || !parts[appsAt + 1] || !parts[appsAt + 1].endsWith("-web")) {
    throw new Error(`this page must be opened at /<workspace>/apps/<name>-web/, not ${loc.pathname}`);
  }
  const params = new URLSearchParams(loc.hash.replace(/^#/, ""));
  return {
    serverUrl: loc.origin + (appsAt > 1 ? "/" + parts.slice(0, appsAt - 1).join("/") : ""),
    workspace: parts[appsAt - 1],
    name: parts[appsAt + 1].replace(/-web$/, ""),
    token: params.get("token") || "",
  };
}

export async function connect(config) {
  return hyphaWebsocketClient.connectToServer(config);
}

/** The colabel sentence of a remote error: `NotFoundError: unknown image id ...`. */
export function errorText(err) {
  const text = String((err && err.message) || err).trim();
  const at = text.lastIndexOf("ServiceError: ");
  if (at >= 0) return text.slice(at + "ServiceError: ".length).split("\n")[0];
  const lines = text.split("\n").filter((l) => l.trim());
  return lines.length ? lines[lines.length - 1] : text;
}

/** WCAG 2 relative luminance of a `#rrggbb` or `#rgb` colour (0 black .. 1 white); null for anything else. */
export function luminance(color) {
  let hex = /^#([0-9a-f]{3}|[0-9a-f]{6})$/i.exec(String(color).trim())?.[1];
  if (!hex) return null;
  if (hex.length === 3) hex = [...hex].map((c) => c + c).join("");
  const [r, g, b] = [0, 2, 4].map((i) => {
    const c = parseInt(hex.slice(i, i + 2), 16) / 255;
    return c <= 0.04045 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4;
  });
  return 0.2126 * r + 0.7152 * g + 0.0722 * b;
}

/** Black or white, whichever has the higher WCAG contrast on `background` (white when it cannot be read). */
export function textColorOn(background) {
  const L = luminance(background);
  if (L === null) return "#ffffff";
  return (L + 0.05) / 0.05 > 1.05 / (L + 0.05) ? "#000000" : "#ffffff";
}

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
  return node;
}

// -- the HALS classifier's self-check, as both pages show it ----------------------------------------
export const SELF_CHECK_TITLE = "The classifier's accuracy on the labels it held out of its training (a part of the labels "
  + "given here, a few cells early on, after \"Accept all\" also its own suggestions): a self-check, not its accuracy "
  + "on the cells still unlabelled.";

/** "self-check on 4 of its own 20 labels: 100%": the latest classifier's accuracy on the labels it held out of
 * its training (`val_labels` of `n_labels`; whole percent below 50 held out); null before the first retrain.
 * Both pages (the annotator's classification mode and the session manager) word it so. */
export function selfCheck(st) {
  if (st.val_accuracy === null || st.val_accuracy === undefined) return null;
  const n = st.val_labels;
  const history = st.history || [];
  const total = history.length ? history[history.length - 1].n_labels : null;
  const pct = `${(100 * st.val_accuracy).toFixed(n >= 50 ? 1 : 0)}%`;
  if (!n) return `self-check on its own labels: ${pct}`;
  return `self-check on ${n} of its own ${total ? `${total} ` : ""}labels: ${pct}`;
}
