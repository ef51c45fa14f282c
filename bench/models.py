"""Benchmark of the model services: transport overhead, embedding cache, concurrent clicks, nuclei.

    python bench/models.py [--clicks 200] [--vit-b] [--ray] [--parts sam,nuclei]
                           [--nuclei-baseline COMMIT] [--repeats 7] [--out bench/results/models.json]

Everything runs on this machine against a real Hypha server subprocess. SAM uses a small model with
random weights built here (no SAM weights can be downloaded offline): the transport,
caching and concurrency figures do not depend on the weights; ``--vit-b`` adds the ViT-B architecture's
encoder and decoder times (random weights, same compute as the real model). One click is timed five ways,
alternating click by click: in process, through the model service (plain, and with its outlines packed as
arrays as colabel's own callers receive them), through the annotator service (which
calls the model service's backend in its own process directly), and through the annotator service over
the Hypha loopback (``ModelAssist(direct=False)``); the overheads are medians and 95th percentiles minus
the in-process ones, and click by click split by the size of the result. The same clicks are then sent
through the annotator service from hypha-rpc's JavaScript client, as a browser sends them
(``bench/sam_js_client.mjs``, Node with ``web/node_modules``; skipped when either is missing).
Nucleus segmentation runs the real classical backend on the real DSB2018 image with
its 125 hand-labelled nuclei and on scikit-image's IHC image, 512 px and tiled 2048 px; with
``--nuclei-baseline COMMIT`` that commit's ``services/nuclei`` is timed too, alternating call by call in
the same process, and the ratio reported.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    Timing,
    print_table,
    time_alternating,
    time_alternating_async,
    time_calls,
    write_json,
)

SMALL_RESULT = 1000  # outline vertices: results up to this size are "typical" (a nucleus or a cell)
SMALL = {"image_size": 512, "embed_dim": 128, "depth": 4, "num_heads": 4, "global_attn_indexes": (1, 3),
         "window_size": 14}


def build_checkpoint(folder: Path, config: dict, name: str) -> str:
    import torch

    from colabel.services.sam.registry import build_sam, save_checkpoint

    torch.manual_seed(0)
    return str(save_checkpoint(build_sam("custom", **config), folder / f"{name}.pt"))


def demo_folder(folder: Path) -> Path:
    from colabel.apps.demo import write_demo_folder

    write_demo_folder(folder)
    return folder


async def bench_transport(hypha, folder: Path, checkpoint: str, cache: Path, clicks: int, use_ray: bool) -> dict:
    """Segment calls in-process vs through Hypha (model service and the annotator's path); cache; 20 clients."""
    from hypha_rpc import connect_to_server

    from colabel.apps.provider.assist import ModelAssist
    from colabel.apps.provider.provider import DataProvider
    from colabel.apps.provider.rpc import ProviderServices
    from colabel.services.gateway import LocalBackend, RayBackend, register_model_services
    from colabel.services.sam.service import SamService

    options = {"default_model": "bench_sam", "checkpoints": {"bench_sam": checkpoint}, "embedding_dir": str(cache),
               "tile_size": 512}
    local = SamService(**options)
    if use_ray:
        from colabel.services import ray_runtime
        from colabel.services.deployments import Autoscaling

        ray_runtime.start_local_ray()
        handle = ray_runtime.deploy(["sam"], options={"sam": options}, gpu=False,
                                    autoscaling={"sam": Autoscaling(2, 2, 2)})["sam"]
        backend = RayBackend("sam", handle)
    else:
        backend = LocalBackend("sam", SamService(**options))

    name = f"b{secrets.token_hex(3)}"
    server = await connect_to_server({"server_url": hypha.url, "token": hypha.root_token})
    ids = await register_model_services(server, {"sam": backend}, prefix=name)
    provider = DataProvider(folder)
    services = ProviderServices(provider, server, name=name, public_url=hypha.url,
                                assist=ModelAssist(provider, server, ids, sam_model="bench_sam"))
    await services.register()
    # the same provider's annotator service once more, calling the model service over Hypha even though it
    # runs in this process (what every call did before the gateway's in-process path): the loopback's cost
    looped = ProviderServices(provider, server, name=f"{name}-loop", public_url=hypha.url,
                              assist=ModelAssist(provider, server, ids, sam_model="bench_sam", direct=False))
    await looped.register()
    _, token = provider.create_session(name="bench", classes=[{"name": "cell", "color": "#ff0000"}])
    image_id = next(r.image_id for r in provider.catalog.records() if r.name == "dsb2018_nuclei.tif")
    image = provider.get_image(image_id)

    # cache miss vs hit (in-process model: what the replica itself spends)
    rng = np.random.default_rng(0)
    prompts = [[[float(x), float(y)]] for x, y in rng.uniform(20, 490, size=(clicks, 2))]

    def embedding_series():  # blocking work: run off the event loop that serves Hypha
        start = time.perf_counter()
        embedding_id = local.embed(image)["embedding_id"]
        miss_ms = (time.perf_counter() - start) * 1000
        hit = time_calls(lambda: local.embed(image), 20)
        cold = SamService(**options)  # a new replica: memory empty, the store on disk has it
        start = time.perf_counter()
        cold.embed(image)
        disk_hit_ms = (time.perf_counter() - start) * 1000
        return embedding_id, miss_ms, hit, disk_hit_ms

    embedding_id, miss_ms, hit, disk_hit_ms = await asyncio.to_thread(embedding_series)

    workspace_token = await server.generate_token({"expires_in": 3600})
    client = await connect_to_server({"server_url": hypha.url, "token": workspace_token,
                                      "workspace": services.workspace})
    sam = await client.get_service(ids["sam"])
    await sam.embed(image, None)
    annotator_client = await connect_to_server({"server_url": hypha.url})
    annotator = await annotator_client.get_service(services.annotator_service_id)
    await annotator.sam_prepare(token, image_id)
    annotator_looped = await annotator_client.get_service(looped.annotator_service_id)
    await annotator_looped.sam_prepare(token, image_id)

    # the same clicks five ways, alternating click by click: in this process (in a worker thread, as the
    # in-process backend runs it), through the model service (plain, and packed as ModelAssist calls services
    # running elsewhere), through the annotator service (which calls the model service's backend in this
    # process directly), and through it with the Hypha loopback (ModelAssist over Hypha, packed)
    def prompt(k):
        return prompts[k % clicks]

    vertices: dict[int, int] = {}  # round -> outline vertices in the result (what the transport carries)

    async def in_process_click(k):
        result = await asyncio.to_thread(local.segment, embedding_id, None, prompt(k), [1], None)
        vertices[k] = _vertices(result)

    paths = await time_alternating_async({
        "in_process": in_process_click,
        "via_model_service": lambda k: sam.segment(embedding_id, None, prompt(k), [1], None),
        "via_model_service_packed": lambda k: _packed_segment(sam, embedding_id, prompt(k)),
        "via_annotator_service": lambda k: annotator.sam_segment(token, image_id, {"points": prompt(k), "labels": [1]}),
        "via_annotator_service_hypha_loopback": lambda k: annotator_looped.sam_segment(
            token, image_id, {"points": prompt(k), "labels": [1]}),
    }, clicks)
    in_process, via_service, via_packed, via_annotator, via_loopback = (
        paths[k] for k in ("in_process", "via_model_service", "via_model_service_packed", "via_annotator_service",
                           "via_annotator_service_hypha_loopback"))

    # the overhead click by click (same prompt, same round), split by the size of the result: hypha-rpc's
    # Python client munchifies received dicts, nested lists element by element (about 1.5 us per coordinate)
    rounds = sorted(vertices)[-len(in_process.samples_ms):]  # the timed rounds, after the warm-up
    sizes = np.array([vertices[k] for k in rounds])
    by_size = {}
    for label, path in (("model_service", via_service), ("annotator_path", via_annotator)):
        diff = np.subtract(path.samples_ms, in_process.samples_ms)
        by_size[label] = {
            f"vertices_le_{SMALL_RESULT}": Timing(list(diff[sizes <= SMALL_RESULT])).as_dict(),
            f"vertices_gt_{SMALL_RESULT}": Timing(list(diff[sizes > SMALL_RESULT])).as_dict(),
        }

    # the annotator path as a browser takes it: the same clicks from hypha-rpc's JavaScript client (Node),
    # after the alternating series, each against the same click's in-process time
    js = await _js_clicks(hypha.url, services.annotator_service_id, token, image_id,
                          [prompt(k)[0] for k in range(clicks + 2)])
    js_client = None
    if js is not None:
        timing = Timing(js["latency_ms"])
        diff = np.subtract(js["latency_ms"], in_process.samples_ms)
        js_client = {**timing.as_dict(), "errors": js["errors"],
                     "overhead_median_ms": round(timing.median - in_process.median, 2),
                     "overhead_p95_ms": round(timing.p95 - in_process.p95, 2),
                     "overhead_click_by_click": Timing(list(diff)).as_dict()}

    # ten annotators open the same new image at once: encoder passes
    other_id = next(r.image_id for r in provider.catalog.records() if r.name == "ihc_ki67.png")
    clients = [await (await connect_to_server({"server_url": hypha.url})).get_service(services.annotator_service_id)
               for _ in range(20)]
    before = local.models.store.computed_total()
    prepared = await asyncio.gather(*(c.sam_prepare(token, other_id) for c in clients[:10]))
    passes = local.models.store.computed_total() - before
    assert len({p["embedding_id"] for p in prepared}) == 1

    # twenty annotators clicking at once
    latencies: list[float] = []
    errors = 0

    async def clicker(c, n):
        nonlocal errors
        for k in range(n):
            start = time.perf_counter()
            try:
                await c.sam_segment(token, other_id, {"points": prompts[k % clicks], "labels": [1]})
                latencies.append((time.perf_counter() - start) * 1000)
            except Exception:  # noqa: BLE001 - counted
                errors += 1

    start = time.perf_counter()
    await asyncio.gather(*(clicker(c, 10) for c in clients))
    wall = time.perf_counter() - start
    crowd = Timing(latencies)

    for c in [client, annotator_client, server]:
        await c.disconnect()
    if use_ray:
        from colabel.services import ray_runtime

        ray_runtime.shutdown()
    return {
        "backend": "ray (2 replicas)" if use_ray else "in-process",
        "segment_in_process": in_process.as_dict(),
        "segment_via_model_service": via_service.as_dict(),
        "segment_via_annotator_service": via_annotator.as_dict(),
        "segment_via_annotator_service_hypha_loopback": via_loopback.as_dict(),
        "overhead_model_service_median_ms": round(via_service.median - in_process.median, 2),
        "overhead_model_service_p95_ms": round(via_service.p95 - in_process.p95, 2),
        "segment_via_model_service_packed": via_packed.as_dict(),
        "overhead_model_service_packed_median_ms": round(via_packed.median - in_process.median, 2),
        "overhead_model_service_packed_p95_ms": round(via_packed.p95 - in_process.p95, 2),
        "overhead_annotator_path_median_ms": round(via_annotator.median - in_process.median, 2),
        "overhead_annotator_path_p95_ms": round(via_annotator.p95 - in_process.p95, 2),
        "overhead_annotator_path_hypha_loopback_median_ms": round(via_loopback.median - in_process.median, 2),
        "overhead_annotator_path_hypha_loopback_p95_ms": round(via_loopback.p95 - in_process.p95, 2),
        "overhead_click_by_click_by_result_size": by_size,
        "segment_via_annotator_service_js_client": js_client,
        "result_vertices_median": int(np.median(sizes)), "result_vertices_max": int(sizes.max()),
        "embedding_miss_ms": round(miss_ms, 1),
        "embedding_memory_hit": hit.as_dict(),
        "embedding_disk_hit_ms": round(disk_hit_ms, 1),
        "encoder_passes_for_10_annotators_same_image": passes,
        "concurrent_20_clients": {**crowd.as_dict(), "errors": errors, "clicks_per_s": round(len(latencies) / wall, 1)},
    }


async def _packed_segment(sam, embedding_id: str, points: list) -> dict:
    """``segment`` as colabel's ModelAssist calls a model service running elsewhere: outlines packed as
    arrays on the wire (``call_packed``), unpacked to the same JSON."""
    from colabel.services.wire import unpack

    return unpack(await sam.call_packed("segment", embedding_id, None, points, [1], None))


async def _js_clicks(server_url: str, service_id: str, token: str, image_id: str, points: list) -> dict | None:
    """Run ``bench/sam_js_client.mjs`` (Node, hypha-rpc's JavaScript client); None when Node or
    ``web/node_modules`` is missing."""
    import json
    import shutil

    root = Path(__file__).resolve().parents[1]
    if shutil.which("node") is None or not (root / "web" / "node_modules" / "hypha-rpc").is_dir():
        print("Node or web/node_modules missing: the JavaScript client's clicks are not timed", flush=True)
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(points, f)
    try:
        process = await asyncio.create_subprocess_exec(
            "node", "--experimental-websocket", str(root / "bench" / "sam_js_client.mjs"), server_url, service_id,
            token, image_id, f.name, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await process.communicate()
    finally:
        Path(f.name).unlink(missing_ok=True)
    if process.returncode != 0:
        raise RuntimeError(f"sam_js_client.mjs failed: {err.decode()[-2000:]}")
    (line,) = [line for line in out.decode().splitlines() if line.startswith("RESULT ")]
    return json.loads(line.removeprefix("RESULT "))


def _vertices(result: dict) -> int:
    """Outline vertices in a segment result's GeoJSON features."""
    def count(coords) -> int:
        return len(coords) if coords and not isinstance(coords[0][0], list) else sum(count(c) for c in coords)

    return sum(count(f["geometry"]["coordinates"]) for f in result.get("features", []))


def bench_nuclei(repeats: int = 7, baseline: str | None = None) -> dict:
    """Classical backend: DSB2018 accuracy and MP/s (segment_nuclei, with every per-nucleus output) on
    grey and RGB images, 512 px whole and 2048 px in 1024 px tiles; with ``baseline`` (a git commit),
    that commit's ``services/nuclei`` is timed in the same process, alternating call by call."""
    import tifffile
    from skimage import data

    from colabel.apps.demo import data_path
    from colabel.services import nuclei

    image = tifffile.imread(data_path("dsb2018_nuclei.tif"))
    truth = tifffile.imread(data_path("dsb2018_nuclei_mask.tif"))
    ihc = data.immunohistochemistry()
    images = {
        "grey_512": image,
        "rgb_ihc_512": ihc,
        "grey_2048_tiled": np.tile(image, (4, 4)),
        "rgb_ihc_2048_tiled": np.tile(ihc, (4, 4, 1)),
    }
    versions = {"current": nuclei}
    if baseline:
        from common import load_package_at

        versions = {"baseline": load_package_at(baseline, "services/nuclei", "nuclei_baseline"), **versions}
    out: dict = {"baseline_commit": baseline, "accuracy": {}, "mp_per_s": {}, "median_ms": {}}
    for version, module in versions.items():
        result = module.segment_nuclei(image, backend=module.ClassicalSegmenter())
        out["accuracy"][version] = {
            "dsb2018_f1_iou50": round(module.f1_at(truth, result.labels, 0.5), 3),
            "dsb2018_aji": round(module.aji(truth, result.labels), 3),
            "dsb2018_found": len(result.nuclei),
            "dsb2018_true": int(len(np.unique(truth)) - 1),
        }
    for name, pixels in images.items():
        calls = {version: (lambda m=module, px=pixels: m.segment_nuclei(px, backend=m.ClassicalSegmenter()))
                 for version, module in versions.items()}
        rounds = repeats if pixels.shape[0] <= 1024 else max(3, repeats // 2)
        timings = time_alternating(calls, rounds)
        megapixels = pixels.shape[0] * pixels.shape[1] / 1e6
        out["median_ms"][name] = {v: round(t.median, 1) for v, t in timings.items()}
        out["mp_per_s"][name] = {v: round(megapixels / (t.median / 1000), 2) for v, t in timings.items()}
        if baseline:  # speed-up, and how many nuclei the two versions find alike (F1 at IoU 0.5 between them)
            out["mp_per_s"][name]["ratio"] = round(timings["baseline"].median / timings["current"].median, 2)
            old, new = (m.segment_nuclei(pixels, backend=m.ClassicalSegmenter()).labels for m in versions.values())
            out["mp_per_s"][name]["f1_vs_baseline"] = round(nuclei.f1_at(old, new, 0.5), 3)
    return out


def bench_vit_b(repeats: int = 3) -> dict:
    """SAM ViT-B encoder and decoder times with random weights (same compute as the published model)."""
    import torch

    from colabel.services.sam.registry import build_sam
    from colabel.services.sam.segmenter import SamSegmenter

    torch.manual_seed(0)
    segmenter = SamSegmenter.from_sam(build_sam("vit_b"), model_id="vit_b_random",
                                      embedding_dir=tempfile.mkdtemp())
    image = np.random.default_rng(0).integers(0, 255, (1024, 1024, 3), dtype=np.uint8)
    encoder = time_calls(lambda: segmenter._encode(image), repeats, warmup=0)
    embedding = segmenter.embed(image)
    decoder = time_calls(lambda: segmenter.segment(embedding, points=[[500.0, 500.0]], point_labels=[1]), 10)
    return {"device": segmenter.device, "encoder_1024": encoder.as_dict(), "decode_click": decoder.as_dict()}


def print_sam(sam: dict) -> None:
    rows = [{"measure": f"segment click, {k.removeprefix('segment_').replace('_', ' ')}",
             "median ms": sam[k]["median_ms"], "p95 ms": sam[k]["p95_ms"]}
            for k in ("segment_in_process", "segment_via_model_service", "segment_via_model_service_packed",
                      "segment_via_annotator_service", "segment_via_annotator_service_hypha_loopback")]
    rows += [
        {"measure": "overhead vs in process, model service (target p95 <= 10 ms)",
         "median ms": sam["overhead_model_service_median_ms"], "p95 ms": sam["overhead_model_service_p95_ms"]},
        {"measure": "overhead vs in process, model service, packed outlines (colabel's own Python callers)",
         "median ms": sam["overhead_model_service_packed_median_ms"],
         "p95 ms": sam["overhead_model_service_packed_p95_ms"]},
        {"measure": "overhead vs in process, annotator path (target p95 <= 10 ms)",
         "median ms": sam["overhead_annotator_path_median_ms"], "p95 ms": sam["overhead_annotator_path_p95_ms"]},
        {"measure": "overhead vs in process, annotator path with the Hypha loopback",
         "median ms": sam["overhead_annotator_path_hypha_loopback_median_ms"],
         "p95 ms": sam["overhead_annotator_path_hypha_loopback_p95_ms"]},
        *({"measure": f"overhead click by click, {path.replace('_', ' ')}, results "
                      f"{'<=' if size.startswith('vertices_le') else '>'} {SMALL_RESULT} vertices (n={t['n']})",
           "median ms": t["median_ms"], "p95 ms": t["p95_ms"]}
          for path, split in sam["overhead_click_by_click_by_result_size"].items() for size, t in split.items()),
        *([] if not sam.get("segment_via_annotator_service_js_client") else [
            {"measure": "segment click, via annotator service, JavaScript client (Node, after the series; "
                        f"errors {sam['segment_via_annotator_service_js_client']['errors']})",
             "median ms": sam["segment_via_annotator_service_js_client"]["median_ms"],
             "p95 ms": sam["segment_via_annotator_service_js_client"]["p95_ms"]},
            {"measure": "overhead vs in process, annotator path, JavaScript client (target p95 <= 10 ms)",
             "median ms": sam["segment_via_annotator_service_js_client"]["overhead_median_ms"],
             "p95 ms": sam["segment_via_annotator_service_js_client"]["overhead_p95_ms"]},
            {"measure": "overhead click by click, annotator path, JavaScript client",
             "median ms": sam["segment_via_annotator_service_js_client"]["overhead_click_by_click"]["median_ms"],
             "p95 ms": sam["segment_via_annotator_service_js_client"]["overhead_click_by_click"]["p95_ms"]}]),
        {"measure": "embedding: miss (encoder pass)", "median ms": sam["embedding_miss_ms"], "p95 ms": ""},
        {"measure": "embedding: memory hit", "median ms": sam["embedding_memory_hit"]["median_ms"],
         "p95 ms": sam["embedding_memory_hit"]["p95_ms"]},
        {"measure": "embedding: disk hit (new replica)", "median ms": sam["embedding_disk_hit_ms"], "p95 ms": ""},
        {"measure": "encoder passes, 10 annotators same image (target 1)",
         "median ms": sam["encoder_passes_for_10_annotators_same_image"], "p95 ms": ""},
        {"measure": f"20 concurrent clients: {sam['concurrent_20_clients']['clicks_per_s']} clicks/s, "
                    f"errors {sam['concurrent_20_clients']['errors']}",
         "median ms": sam["concurrent_20_clients"]["median_ms"], "p95 ms": sam["concurrent_20_clients"]["p95_ms"]},
    ]
    print_table(f"SAM service ({sam['backend']}; model image 512, random weights; CPU; clicks alternate between "
                f"the five paths; result outlines: median {sam['result_vertices_median']} vertices, max "
                f"{sam['result_vertices_max']})", rows, ["measure", "median ms", "p95 ms"])


def print_nuclei(n: dict) -> None:
    versions = list(n["accuracy"])
    print_table("Nucleus segmentation accuracy (classical backend, DSB2018, 125 hand-labelled nuclei)", [
        {"measure": "F1 @ IoU 0.5 (target >= 0.89)", **{v: a["dsb2018_f1_iou50"] for v, a in n["accuracy"].items()}},
        {"measure": "AJI", **{v: a["dsb2018_aji"] for v, a in n["accuracy"].items()}},
        {"measure": "nuclei found / labelled",
         **{v: f"{a['dsb2018_found']} / {a['dsb2018_true']}" for v, a in n["accuracy"].items()}},
    ], ["measure", *versions])
    extra = ["ratio", "f1_vs_baseline"] if "baseline" in versions else []
    rows = [{"image": name, **{v: f"{mp[v]} ({n['median_ms'][name][v]} ms)" for v in versions},
             **{k: mp[k] for k in extra}} for name, mp in n["mp_per_s"].items()]
    title = "Nucleus segmentation MP/s (median ms), segment_nuclei with every per-nucleus output, target >= 5"
    if n["baseline_commit"]:
        title += f"; baseline = commit {n['baseline_commit']}, timed alternately in this process"
    print_table(title, rows, ["image", *versions, *extra])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clicks", type=int, default=200, help="clicks per latency series (default 200)")
    parser.add_argument("--ray", action="store_true", help="serve SAM from 2 Ray Serve replicas instead of in-process")
    parser.add_argument("--vit-b", action="store_true", help="also time the ViT-B encoder/decoder (slow on CPU)")
    parser.add_argument("--parts", default="sam,nuclei", help="comma-separated: sam, nuclei (default both)")
    parser.add_argument("--nuclei-baseline", metavar="COMMIT", default=None,
                        help="also time services/nuclei as of this git commit, alternating with the current code")
    parser.add_argument("--repeats", type=int, default=7, help="nucleus segmentation rounds (default 7)")
    parser.add_argument("--out", default="bench/results/models.json")
    args = parser.parse_args(argv)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not parts or parts - {"sam", "nuclei"}:
        parser.error(f"--parts must name sam and/or nuclei, got {args.parts!r}")

    import torch

    from colabel.apps.hypha_server import EmbeddedHypha, free_port

    results: dict = {"gpu": torch.cuda.is_available()}
    if "sam" in parts:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            checkpoint = build_checkpoint(tmp, SMALL, "bench_sam")
            folder = demo_folder(tmp / "images")
            with EmbeddedHypha("127.0.0.1", free_port()) as hypha:
                results["sam"] = asyncio.run(bench_transport(hypha, folder, checkpoint, tmp / "cache", args.clicks,
                                                             args.ray))
        print_sam(results["sam"])
    if "nuclei" in parts:
        results["nuclei"] = bench_nuclei(args.repeats, args.nuclei_baseline)
        print_nuclei(results["nuclei"])
    if args.vit_b:
        results["vit_b"] = bench_vit_b()
        v = results["vit_b"]
        print_table(f"SAM ViT-B ({v['device']}, random weights)", [
            {"measure": "encoder 1024x1024", "median ms": v["encoder_1024"]["median_ms"]},
            {"measure": "decoder, one click", "median ms": v["decode_click"]["median_ms"]},
        ], ["measure", "median ms"])
    elif not results["gpu"]:
        print("\nNo GPU on this machine: the GPU timings of SAM ViT-B were not taken.")
    print(f"\nwritten {write_json(Path(args.out), results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
