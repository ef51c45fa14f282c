// Times SAM clicks through the annotator service from hypha-rpc's JavaScript client, as a browser sends them.
//
//   node --experimental-websocket bench/sam_js_client.mjs SERVER_URL SERVICE_ID TOKEN IMAGE_ID PROMPTS_JSON
//
// PROMPTS_JSON: a file with [[x, y], ...] (one positive point per click). Prints one line
// "RESULT {"latency_ms": [...], "errors": n, "firstError": ...}". Run from the repository root (hypha-rpc from web/node_modules).
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";

const require = createRequire(new URL("../web/package.json", import.meta.url));
const { hyphaWebsocketClient } = await import(require.resolve("hypha-rpc"));

const [serverUrl, serviceId, token, imageId, promptsPath] = process.argv.slice(2);
const points = JSON.parse(readFileSync(promptsPath, "utf8"));
const server = await hyphaWebsocketClient.connectToServer({ server_url: serverUrl });
const annotator = await server.getService(serviceId);
await annotator.sam_prepare(token, imageId);
const latency = [];
let errors = 0;
let firstError = null;
for (const [k, point] of points.entries()) {
  const start = performance.now();
  try {
    const result = await annotator.sam_segment(token, imageId, { points: [point], labels: [1] });
    if (!result || !Array.isArray(result.features)) throw new Error("no features");
    if (k >= 2) latency.push(performance.now() - start); // two warm-up clicks, as the Python series
  } catch (err) {
    errors += 1;
    firstError ??= String(err).slice(0, 300);
  }
}
console.log("RESULT " + JSON.stringify({ latency_ms: latency, errors, firstError }));
await server.disconnect();
process.exit(0);
