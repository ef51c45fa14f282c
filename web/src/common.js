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
