"""Benchmark of a SAM click on the annotator page: decoded in the browser vs on the server.

    python bench/sam_click.py [--clicks 40] [--model small|vit-b] [--decoder quantized|full]
                              [--out bench/results/sam_click.json]

A real Hypha server subprocess, a real provider with the SAM model service in process, and the built annotator
page in headless Chromium (/usr/bin/chromium, or COLABEL_CHROMIUM). Each prompt (two positive points, i.e. SAM's
single-mask output on both paths) is decoded alternately, in the same page and process:

* **server** (the baseline, what every click cost before): ``sam_segment`` through Hypha, decoded by torch on
  the provider's model service, polygons traced there;
* **browser**: onnxruntime-web (wasm, one thread) runs the ONNX prompt decoder on the image embedding fetched
  once, and the mask is traced to a polygon in the page.

Times are measured in the page (``performance.now()``, prompt in -> polygon out), medians and p95 over the
clicks, and the ratio browser / server. Random weights (no weights can be downloaded offline): decoding cost
does not depend on them. ``--model vit-b`` uses the ViT-B architecture (the published models' decoder size;
the encoder runs once, slowly, on CPU). The one-off costs (decoder download and compile, embedding fetch) are
reported separately.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Timing, print_table, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SMALL = {"image_size": 512, "embed_dim": 128, "depth": 4, "num_heads": 4, "global_attn_indexes": (1, 3),
         "window_size": 14}
CHROMIUM = os.environ.get("COLABEL_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"]


def build_checkpoint(folder: Path, model: str) -> tuple[str, str]:
    import torch

    from colabel.services.sam.registry import build_sam, save_checkpoint

    torch.manual_seed(0)
    sam = build_sam("vit_b") if model == "vit-b" else build_sam("custom", **SMALL)
    return f"bench_{model}", str(save_checkpoint(sam, folder / f"{model}.pt"))


async def run(clicks: int, model: str, decoder: str = "quantized") -> dict:
    from hypha_rpc import connect_to_server
    from playwright.async_api import async_playwright

    from colabel.apps.hypha_server import EmbeddedHypha, free_port
    from colabel.apps.provider.assist import ModelAssist
    from colabel.apps.provider.provider import DataProvider
    from colabel.apps.provider.rpc import ProviderServices
    from colabel.services.gateway import LocalBackend, register_model_services
    from colabel.services.sam.service import SamService

    tmp = Path(tempfile.mkdtemp(prefix="bench-sam-click-"))
    model_id, checkpoint = build_checkpoint(tmp, model)
    images = tmp / "images"
    images.mkdir()
    (images / "he_histo.jpg").write_bytes((ROOT / "tests" / "data" / "he_histo.jpg").read_bytes())  # 300 x 500
    hypha = EmbeddedHypha("127.0.0.1", free_port(), ready_timeout=90).start()
    try:
        server = await connect_to_server({"server_url": hypha.url, "token": hypha.root_token})
        sam = SamService(default_model=model_id, checkpoints={model_id: checkpoint}, embedding_dir=str(tmp / "emb"),
                         tile_size=1024)  # one tile: both paths decode the same whole-image embedding
        name = f"b{secrets.token_hex(3)}"
        ids = await register_model_services(server, {"sam": LocalBackend("sam", sam)}, prefix=name)
        provider = DataProvider(images)
        services = ProviderServices(provider, server, name=name, public_url=hypha.url,
                                    assist=ModelAssist(provider, server, ids, sam_model=model_id))
        await services.register()
        (image,) = provider.list_images()
        _, secret = provider.create_session(name="bench", classes=[{"name": "cell", "color": "#e69f00"}],
                                            image_ids=[image.image_id])
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            page = await (await browser.new_context(viewport={"width": 1280, "height": 800})).new_page()
            start = time.perf_counter()
            await page.goto(services.share_url(secret) + f"&decoder={decoder}")
            await page.wait_for_selector("#name-dialog[open]")
            await page.fill("#display-name", "bench")
            await page.click("#join")
            await page.wait_for_selector("body[data-state=ready]", timeout=120_000)
            ready = time.perf_counter()
            await page.wait_for_selector("body[data-sam-path=browser]", timeout=600_000)
            browser_ready = time.perf_counter()
            rng = np.random.default_rng(0)
            height, width = image.shape[:2]
            prompts = [{"points": [[float(rng.uniform(0, width)), float(rng.uniform(0, height))] for _ in range(2)],
                        "labels": [1, 1]} for _ in range(clicks + 2)]
            timings = {"server": Timing(), "browser": Timing(), "decoder": Timing()}
            agreement = []
            for i, prompt in enumerate(prompts):
                order = ("server", "browser") if i % 2 else ("browser", "server")
                answers = {}
                for path in order:
                    answers[path] = await page.evaluate(
                        """async ([prompt, browser]) => {
                            const t0 = performance.now();
                            const out = await window.colabel.decodeSam(prompt, { browser });
                            return { ms: performance.now() - t0, path: out.path, geometry: out.geometry };
                        }""", [prompt, path == "browser"])
                    assert answers[path]["path"] == path, answers[path]
                    if i >= 2:  # two warm-up prompts
                        timings[path].samples_ms.append(answers[path]["ms"])
                decoder_ms = await page.evaluate("""async (prompt) => {
                    const t0 = performance.now();
                    await window.colabel.state.decoder.decode(prompt);
                    return performance.now() - t0;
                }""", prompt)
                if i >= 2:
                    timings["decoder"].samples_ms.append(decoder_ms)
                agreement.append(_iou(answers["browser"]["geometry"], answers["server"]["geometry"]))
            await _mouse_clicks(page, rng, clicks, width, height, timings)
            await browser.close()
        await server.disconnect()
    finally:
        hypha.stop()
    server_t, browser_t = timings["server"], timings["browser"]
    return {
        "model": model, "decoder": decoder, "image": [int(height), int(width)], "clicks": clicks,
        "server": server_t.as_dict(), "browser": browser_t.as_dict(),
        "browser_decoder_only": timings["decoder"].as_dict(),
        "mouse_click_to_outline": timings["click"].as_dict(),
        "one_point_decode_sam": timings["click_direct"].as_dict(),
        "ratio_browser_over_server_median": round(browser_t.median / server_t.median, 3),
        "page_ready_s": round(ready - start, 2),
        "browser_decoder_ready_after_page_s": round(browser_ready - ready, 2),
        "iou_browser_vs_server_median": round(float(np.median([a for a in agreement if a is not None] or [np.nan])),
                                              3),
    }


async def _mouse_clicks(page, rng, clicks: int, width: int, height: int, timings: dict) -> None:
    """One-point prompts by real mouse clicks in SAM mode, alternated with ``decodeSam`` on the same point.

    ``click``: from the click's ``pointerdown`` (its event time) to the outline on the page, through the map's
    event handling and the page's prompt queue; ``direct``: ``decodeSam`` called with the same prompt.
    """
    await page.evaluate("""() => window.colabel.map.getViewport().addEventListener(
        "pointerdown", (e) => { window.benchDown = e.timeStamp; }, { capture: true })""")
    await page.keyboard.press("s")
    timings["click"], timings["click_direct"] = Timing(), Timing()
    margin = 0.1
    for i in range(clicks + 2):
        x, y = float(rng.uniform(margin, 1 - margin) * width), float(rng.uniform(margin, 1 - margin) * height)
        for kind in (("click", "direct") if i % 2 else ("direct", "click")):
            if kind == "direct":
                ms = await page.evaluate("""async (prompt) => {
                    const t0 = performance.now();
                    await window.colabel.decodeSam(prompt);
                    return performance.now() - t0;
                }""", {"points": [[x, y]], "labels": [1]})
            else:
                await page.keyboard.press("n")  # a new object: a one-point prompt
                before = await page.evaluate("window.colabel.samResults")
                px, py = await page.evaluate("([x, y]) => window.colabel.pixelOf(x, y)", [x, y])
                await page.mouse.click(px, py)
                await page.wait_for_function(f"window.colabel.samResults > {before}", timeout=60_000)
                last = await page.evaluate("[window.colabel.lastSam, window.benchDown]")
                assert last[0]["path"] == "browser", last[0]
                ms = last[0]["at"] - last[1]
            if i >= 2:
                timings["click" if kind == "click" else "click_direct"].samples_ms.append(ms)


def _iou(a: dict | None, b: dict | None) -> float | None:
    from shapely.geometry import shape

    if not a or not b:
        return None
    ga, gb = shape(a).buffer(0), shape(b).buffer(0)
    union = ga.union(gb).area
    return ga.intersection(gb).area / union if union else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clicks", type=int, default=40)
    parser.add_argument("--model", choices=["small", "vit-b"], default="small")
    parser.add_argument("--decoder", choices=["quantized", "full"], default="quantized",
                        help="the browser's ONNX decoder: uint8-quantised (the page's default) or float32")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sam_click.json")
    args = parser.parse_args()
    result = asyncio.run(run(args.clicks, args.model, args.decoder))
    print_table(f"SAM click -> polygon on the annotator page ({result['model']}, {result['decoder']} decoder, "
                f"image {result['image']}, "
                f"{result['clicks']} two-point prompts, alternating)", [
        {"path": "server (baseline: sam_segment via Hypha)", **result["server"], "ratio": 1.0},
        {"path": "browser (onnxruntime-web + tracing)", **result["browser"],
         "ratio": result["ratio_browser_over_server_median"]},
        {"path": "  of which the ONNX decoder run", **result["browser_decoder_only"],
         "ratio": round(result["browser_decoder_only"]["median_ms"] / result["server"]["median_ms"], 3)},
    ], ["path", "n", "median_ms", "p95_ms", "ratio"])
    print_table("One-point prompts: a real mouse click in SAM mode (pointerdown -> outline on the page) vs "
                "decodeSam on the same point, alternating", [
        {"path": "decodeSam (baseline)", **result["one_point_decode_sam"], "ratio": 1.0},
        {"path": "mouse click -> outline", **result["mouse_click_to_outline"],
         "ratio": round(result["mouse_click_to_outline"]["median_ms"]
                        / result["one_point_decode_sam"]["median_ms"], 3)},
    ], ["path", "n", "median_ms", "p95_ms", "ratio"])
    print(f"\npage ready {result['page_ready_s']} s; browser decoder and embedding ready "
          f"{result['browser_decoder_ready_after_page_s']} s later; median IoU browser vs server "
          f"{result['iou_browser_vs_server_median']}")
    print(f"wrote {write_json(args.out, result)}")


if __name__ == "__main__":
    main()
