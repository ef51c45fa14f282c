// Bundles the two pages into ../colabel/web_dist (served by the provider's `<name>-web` service).
import { build } from "esbuild";
import { cpSync, mkdirSync, rmSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const out = resolve(here, "../colabel/web_dist");

rmSync(out, { recursive: true, force: true });
mkdirSync(resolve(out, "assets"), { recursive: true });
cpSync(resolve(here, "public"), out, { recursive: true });
// onnxruntime-web's wasm runtime (SAM prompts decoded in the browser), loaded from assets/ort/ at run time
const ort = resolve(here, "node_modules/onnxruntime-web/dist");
mkdirSync(resolve(out, "assets/ort"), { recursive: true });
for (const name of ["ort-wasm-simd-threaded.wasm", "ort-wasm-simd-threaded.mjs"]) {
  cpSync(resolve(ort, name), resolve(out, "assets/ort", name));
}

await build({
  entryPoints: { annotate: resolve(here, "src/annotate.js"), manage: resolve(here, "src/manage.js") },
  outdir: resolve(out, "assets"),
  bundle: true,
  format: "esm",
  target: ["es2020"],
  minify: true,
  sourcemap: true,
  legalComments: "linked",
  logLevel: "info",
});
