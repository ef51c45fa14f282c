"""Model services behind Hypha: in-process and on real Ray Serve, reached by annotators through their session.

SAM runs a tiny randomly initialised model saved as a real checkpoint (no weights can be downloaded here):
its masks are arbitrary, so these tests check transport, caching, routing and refusals, not mask quality.
Nucleus segmentation runs the real classical backend on the real DSB2018 image.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time

import numpy as np
import pytest
import pytest_asyncio
import tifffile
from sam_fixtures import TINY_ID, build_tiny

from conftest import DATA, make_image_folder

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

CLASSES = [{"name": "nucleus", "color": "#ff0000"}]


@pytest.fixture(scope="module")
def tiny_checkpoint_path(tmp_path_factory):
    from colabel.services.sam.registry import save_checkpoint

    return str(save_checkpoint(build_tiny(), tmp_path_factory.mktemp("ckpt") / "tiny.pt"))


def sam_options(checkpoint: str, cache) -> dict:
    return {"default_model": TINY_ID, "checkpoints": {TINY_ID: checkpoint}, "embedding_dir": str(cache),
            "tile_size": 256}


async def provider_with_models(hypha_server, folder, backends):
    """A provider on ``folder`` whose annotator service reaches the given model backends over Hypha."""
    from hypha_rpc import connect_to_server

    from colabel.apps.provider.assist import ModelAssist
    from colabel.apps.provider.provider import DataProvider
    from colabel.apps.provider.rpc import ProviderServices
    from colabel.services.gateway import register_model_services

    name = f"m{secrets.token_hex(3)}"
    server = await connect_to_server({"server_url": hypha_server.url, "token": hypha_server.root_token})
    ids = await register_model_services(server, backends, prefix=name)
    provider = DataProvider(folder)
    services = ProviderServices(provider, server, name=name, public_url=hypha_server.url,
                                assist=ModelAssist(provider, server, ids, sam_model=TINY_ID))
    await services.register()
    created, token = provider.create_session(name="ai", classes=CLASSES)
    return server, services, ids, token


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def in_process(hypha_server, tmp_path_factory, tiny_checkpoint_path):
    from colabel.services.gateway import LocalBackend
    from colabel.services.nuclei.service import NucleiService
    from colabel.services.sam.service import SamService

    folder = make_image_folder(tmp_path_factory.mktemp("images"))
    sam = SamService(**sam_options(tiny_checkpoint_path, tmp_path_factory.mktemp("emb")))
    backends = {"sam": LocalBackend("sam", sam), "nuclei": LocalBackend("nuclei", NucleiService())}
    server, services, ids, token = await provider_with_models(hypha_server, folder, backends)
    yield {"server": server, "services": services, "ids": ids, "token": token, "sam": sam, "folder": folder}
    await server.disconnect()


async def annotator_for(connect, services):
    client = await connect()
    return await client.get_service(services.annotator_service_id)


async def image_ids(annotator, token):
    return {i["name"]: i["image_id"] for i in await annotator.list_images(token) if not i["error"]}


async def test_nuclei_of_a_session_image_through_the_annotator_service(in_process, connect):
    from colabel.services.nuclei import f1_at

    annotator = await annotator_for(connect, in_process["services"])
    ids = await image_ids(annotator, in_process["token"])
    result = await annotator.detect_nuclei(in_process["token"], ids["dsb2018_nuclei.tif"])
    assert result["count"] >= 100 and "labels" not in result
    from colabel.apps.provider.annotations import rasterize, validate_feature_collection

    fc = validate_feature_collection(
        {"type": "FeatureCollection",
         "features": [{"type": "Feature", "geometry": n["polygon"], "properties": {}} for n in result["nuclei"]]},
        image_shape=(512, 512))
    predicted = rasterize(fc, shape=(512, 512))
    assert f1_at(tifffile.imread(DATA / "dsb2018_nuclei_mask.tif"), predicted, 0.5) >= 0.75
    region = await annotator.detect_nuclei(in_process["token"], ids["dsb2018_nuclei.tif"],
                                           {"x": 100, "y": 50, "width": 200, "height": 100})
    assert 0 < region["count"] < result["count"]
    assert all(100 <= n["centroid"][0] <= 300 and 50 <= n["centroid"][1] <= 150 for n in region["nuclei"])


async def test_sam_click_returns_polygons_in_image_pixels_and_embeds_once(in_process, connect):
    token = in_process["token"]
    annotator = await annotator_for(connect, in_process["services"])
    ids = await image_ids(annotator, token)
    image_id = ids["sub/he_histo.jpg"]  # 300 x 500: non-square, two tiles of 256
    before = in_process["sam"].encoder_passes()
    prepared = await annotator.sam_prepare(token, image_id)
    assert prepared["image_shape"] == [300, 500] and prepared["n_tiles"] > 1
    for _ in range(3):  # three annotators click on the same image
        other = await annotator_for(connect, in_process["services"])
        result = await other.sam_segment(token, image_id, {"points": [[250.0, 150.0]], "labels": [1]})
        assert isinstance(result["score"], float)
        for feature in result["features"]:
            ring = np.asarray(feature["geometry"]["coordinates"][0]
                              if feature["geometry"]["type"] == "Polygon" else
                              feature["geometry"]["coordinates"][0][0])
            assert ring[:, 0].min() >= 0 and ring[:, 0].max() <= 500
            assert ring[:, 1].min() >= 0 and ring[:, 1].max() <= 300
    assert in_process["sam"].encoder_passes() - before == 1  # one pass over its tiles, for everyone


@pytest.mark.parametrize(("prompt", "message"), [
    ({"points": [[9999, 5]], "labels": [1]}, "(?i)outside"),
    ({"points": [], "labels": []}, "(?i)empty|at least|no prompt"),
    ({"points": [[float("nan"), 3]], "labels": [1]}, "(?i)finite|nan"),
    ({"points": [[1, 2, 3]], "labels": [1]}, "(?i)shape"),
    ({"points": [[1, 2]], "labels": [1, 0]}, "(?i)labels|length|match"),
    ({"points": [[1, 2]], "labels": [7]}, "(?i)0 or 1|labels"),
    ({"box": [10, 10, 5, 20]}, "(?i)box"),
    ({"clicks": [[1, 2]]}, "(?i)unknown prompt fields"),
    ("click here", "(?i)prompt must be an object"),
])
async def test_bad_prompts_are_refused_with_a_clear_error(in_process, connect, prompt, message):
    annotator = await annotator_for(connect, in_process["services"])
    ids = await image_ids(annotator, in_process["token"])
    with pytest.raises(Exception, match=message):
        await annotator.sam_segment(in_process["token"], ids["ihc_ki67.png"], prompt)


async def test_annotators_cannot_pick_a_sam_model_other_than_the_providers(in_process, connect):
    annotator = await annotator_for(connect, in_process["services"])
    token = in_process["token"]
    ids = await image_ids(annotator, token)
    for model in ["sam_vit_z", "sam_vit_h"]:  # unknown, and a real one of 2.4 GB the provider did not choose
        with pytest.raises(Exception, match=f"segments with the SAM model '{TINY_ID}', not '{model}'"):
            await annotator.sam_segment(token, ids["ihc_ki67.png"], {"box": [1, 1, 50, 50]}, model)
        with pytest.raises(Exception, match="not '"):
            await annotator.sam_prepare(token, ids["ihc_ki67.png"], model)
    assert (await annotator.sam_segment(token, ids["ihc_ki67.png"], {"box": [1, 1, 50, 50]}, TINY_ID))["features"]
    # refused image ids leave nothing behind (no lock per id asked for)
    locks = dict(in_process["services"].assist._embedding_locks)
    for n in range(20):
        with pytest.raises(Exception, match="unknown image id"):
            await annotator.sam_prepare(token, f"img-{n:016x}")
    assert in_process["services"].assist._embedding_locks == locks


async def test_the_provider_calls_its_own_model_services_directly_with_the_same_answers_and_errors(in_process):
    """Model services this process registered are called on their backend, without the loopback through
    Hypha; over Hypha (``direct=False``, as for services running elsewhere) everything reads the same."""
    from colabel.apps.provider.assist import ModelAssist
    from colabel.errors import InvalidInputError, NotFoundError
    from colabel.services.gateway import in_process_backend

    services, ids = in_process["services"], in_process["ids"]
    provider = services.provider
    assert in_process_backend(ids["sam"]).obj is in_process["sam"]
    assert in_process_backend(f"elsewhere/someone:{ids['sam'].rsplit(':', 1)[-1]}") is None
    direct = services.assist
    looped = ModelAssist(provider, in_process["server"], ids, sam_model=TINY_ID, direct=False)
    session = provider.sessions.authorize(in_process["token"])
    image_id = next(r.image_id for r in provider.catalog.records() if r.name == "dsb2018_nuclei.tif")

    prompt = {"points": [[100.0, 120.0], [130.0, 90.0]], "labels": [1, 0]}
    assert await direct.sam_segment(session, image_id, prompt) == await looped.sam_segment(session, image_id, prompt)
    region = {"x": 100, "y": 50, "width": 200, "height": 100}
    nuclei = await direct.detect_nuclei(session, image_id, region)
    assert nuclei["count"] > 0 and nuclei == await looped.detect_nuclei(session, image_id, region)

    async def error(assist, call, *args):
        with pytest.raises((InvalidInputError, NotFoundError)) as caught:
            await getattr(assist, call)(session, image_id, *args)
        return type(caught.value), str(caught.value)

    for call, args in [("sam_segment", ({"points": [[9999, 5]], "labels": [1]},)),
                       ("sam_segment", ({"box": [1, 1, 50, 50]}, "sam_vit_z")),
                       ("detect_nuclei", ({"x": 500, "y": 0, "width": 100, "height": 10},)),
                       ("detect_nuclei", (None, "no-such-backend"))]:
        assert await error(direct, call, *args) == await error(looped, call, *args)

    # over Hypha the outlines travel packed as arrays (services/wire.py); unknown functions are refused
    from colabel.services.wire import PACKED

    nuclei_service = await in_process["server"].get_service(ids["nuclei"])
    pixels = provider.get_image(image_id, session=session)
    packed = await nuclei_service.call_packed("segment", pixels, region, None, None, False)
    rings = [n["polygon"]["coordinates"][0] for n in packed["nuclei"]]
    assert any(isinstance(r, dict) and PACKED in r for r in rings)
    with pytest.raises(Exception, match="unknown function 'deployment_status'"):
        await nuclei_service.call_packed("deployment_status")


async def test_keywords_and_wrong_arguments_get_one_sentence_naming_no_class_of_the_transport(in_process, connect):
    """The gateway forwards positional arguments only: keywords get an InvalidInputError sentence naming the order,
    not a TypeError of its internals; a dict where numbers belong is named a dict, not hypha-rpc's ObjectProxy."""
    client = await connect(await in_process["server"].generate_token({"expires_in": 600}),
                           in_process["services"].workspace)
    sam = await client.get_service(in_process["ids"]["sam"])
    with pytest.raises(Exception) as caught:
        await sam.segment("some-id", box=[1, 1, 5, 5])
    last = str(caught.value).strip().splitlines()[-1]
    assert last == ("Exception: InvalidInputError: sam.segment takes positional arguments only, got keyword "
                    "argument(s) box; pass them in this order: embedding_id, model_id, points, labels, box, "
                    "multimask, mask_input, return_logits"), last
    embedding_id = (await sam.embed(np.zeros((64, 64), np.uint8)))["embedding_id"]
    with pytest.raises(Exception, match="points must be numbers") as caught:
        await sam.segment(embedding_id, None, {"x": 1}, [1])
    assert "ObjectProxy" not in str(caught.value) and "'dict'" in str(caught.value)


async def test_model_services_are_out_of_reach_of_share_link_holders(in_process, connect):
    client = await connect()
    with pytest.raises(Exception, match="(?i)permission|denied|not allowed|protected"):
        await client.get_service(in_process["ids"]["sam"])
    annotator = await annotator_for(connect, in_process["services"])
    with pytest.raises(Exception, match="invalid or revoked session token"):
        await annotator.sam_segment("stolen", "img-x", {"box": [1, 1, 5, 5]})


async def test_bioimageio_colab_functions_keep_their_shapes(in_process, connect):
    client = await connect(await in_process["server"].generate_token({"expires_in": 600}),
                           in_process["services"].workspace)
    sam = await client.get_service(in_process["ids"]["sam"])
    assert await sam.ping() == "pong" and isinstance(await sam.hello(), str)
    image = np.asarray(tifffile.imread(DATA / "dsb2018_nuclei.tif"))[:200, :300]
    out = await sam.compute_embedding(image, TINY_ID)
    assert out["features"].dtype == np.float32 and out["features"].shape == (1, 256, 16, 16)
    assert out["original_image_shape"] == [200, 300] and out["sam_scale"] == pytest.approx(256 / 300)
    assert out["mask_threshold"] == 0.0
    decoder = await sam.get_onnx_model(TINY_ID, False)
    assert isinstance(decoder, bytes) and len(decoder) > 10_000
    import onnxruntime

    onnxruntime.InferenceSession(decoder)  # loads: a real ONNX model
    status = await sam.deployment_status()
    assert status["status"] == "HEALTHY" and status["mode"] == "in-process"
    seg = await sam.segment_image(image[:64, :64], TINY_ID, 4, 0.0, 0.0, 0)
    assert seg["mask"].shape == (64, 64) and seg["mask"].dtype.kind == "u"


# -- real Ray Serve --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_serve():
    from colabel.services import ray_runtime

    ray_runtime.start_local_ray(num_cpus=2)
    yield ray_runtime
    ray_runtime.shutdown()


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def on_ray(ray_serve, hypha_server, tmp_path_factory, tiny_checkpoint_path):
    from colabel.services.deployments import Autoscaling
    from colabel.services.gateway import RayBackend

    folder = make_image_folder(tmp_path_factory.mktemp("images"))
    cache = tmp_path_factory.mktemp("shared-embeddings")
    handles = ray_serve.deploy(["sam"], options={"sam": sam_options(tiny_checkpoint_path, cache)}, gpu=False,
                               autoscaling={"sam": Autoscaling(2, 2, 1)})
    server, services, ids, token = await provider_with_models(hypha_server, folder,
                                                               {"sam": RayBackend("sam", handles["sam"])})
    yield {"server": server, "services": services, "ids": ids, "token": token, "handle": handles["sam"],
           "cache": cache}
    await server.disconnect()


async def test_a_running_local_ray_node_is_not_taken_for_one_being_stopped(ray_serve):
    # shutdown() skips Serve's graceful stop only when the node's own processes are exiting (a SIGTERM to the
    # process group, tested in test_cli); while they run, Serve is stopped gracefully
    assert ray_serve._local_node_stopping(0.2) is False


def replica_actors():
    import ray

    return [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("SERVE_REPLICA::sam#")]


async def test_two_replicas_share_one_embedding(on_ray, connect):
    from colabel.services.sam.embeddings import EmbeddingStore

    assert len(replica_actors()) == 2
    token = on_ray["token"]
    annotators = [await annotator_for(connect, on_ray["services"]) for _ in range(10)]
    ids = await image_ids(annotators[0], token)
    image_id = ids["ihc_ki67.png"]
    prepared = await asyncio.gather(*(a.sam_prepare(token, image_id) for a in annotators))
    embedding_ids = {p["embedding_id"] for p in prepared}
    assert len(embedding_ids) == 1
    # the replicas computed it once between them; every replica then serves clicks from the shared store
    assert EmbeddingStore(on_ray["cache"]).computed_total(embedding_ids.pop()) == 1
    for annotator in annotators:  # clicks spread over both replicas, none recomputes the embedding
        result = await annotator.sam_segment(token, image_id, {"box": [100, 100, 200, 180]})
        assert "features" in result
    assert EmbeddingStore(on_ray["cache"]).computed_total() == 1
    status = await (await (await connect(await on_ray["server"].generate_token({"expires_in": 600}),
                                         on_ray["services"].workspace)).get_service(on_ray["ids"]["sam"])
                    ).deployment_status()
    assert status["mode"] == "ray" and status["replicas"].get("RUNNING") == 2


async def test_a_replica_killed_mid_request_gives_a_clear_error_and_the_deployment_recovers(on_ray, connect):
    import ray

    token = on_ray["token"]
    annotator = await annotator_for(connect, on_ray["services"])
    ids = await image_ids(annotator, token)
    workspace_client = await connect(await on_ray["server"].generate_token({"expires_in": 600}),
                                     on_ray["services"].workspace)
    sam = await workspace_client.get_service(on_ray["ids"]["sam"])
    big = np.asarray(tifffile.imread(DATA / "dsb2018_nuclei.tif"))
    slow = asyncio.ensure_future(sam.generate(big, TINY_ID, 64, 0.0, 0.0, 0))  # seconds of work
    await asyncio.sleep(1.5)
    assert not slow.done()
    for actor in replica_actors():
        ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=False)
    with pytest.raises(Exception, match="replica serving this call stopped"):
        await slow
    deadline = time.monotonic() + 90
    while True:
        try:
            result = await annotator.sam_segment(token, ids["ihc_ki67.png"], {"box": [10, 10, 80, 80]})
            break
        except Exception:  # noqa: BLE001 - replicas are restarting
            assert time.monotonic() < deadline, "the deployment did not recover"
            await asyncio.sleep(1)
    assert "features" in result


# a tiny deployment of this module's Ray: coreset at 1 replica, as another colabel process's "first" would deploy it

SECOND_PROCESS = """
import json, sys
from colabel.errors import ColabelError
from colabel.services import ray_runtime
from colabel.services.deployments import Autoscaling
ray_runtime.start_local_ray(address=sys.argv[1], quiet=True)
try:
    ray_runtime.deploy(["coreset"], options={"coreset": {"reduce_dim": 99}}, gpu=False, prefix="first")
    print(json.dumps({"same_prefix": "deployed"}), flush=True)
except ColabelError as exc:
    print(json.dumps({"same_prefix": type(exc).__name__ + ": " + str(exc)}), flush=True)
handle = ray_runtime.deploy(["coreset"], options={"coreset": {"reduce_dim": 99}}, gpu=False, prefix="second",
                            autoscaling={"coreset": Autoscaling(1, 1, 1)})["coreset"]
print(json.dumps({"second": handle.info.remote().result(timeout_s=120)["reduce_dim"]}), flush=True)
ray_runtime.shutdown(applications=["first-coreset", "second-coreset"], quiet=True)  # what its exit does
"""


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def first_coreset(ray_serve):
    """coreset deployed as the Serve application ``first-coreset`` with a maximum of 20 replicas, which the
    2-CPU local Ray cannot hold (capped by deploy); it stays at 1 replica (4 requests in flight per replica)."""
    from colabel.services.deployments import Autoscaling

    records = _Records()
    logging.getLogger("colabel.services.ray_runtime").addHandler(records)
    try:
        handles = ray_serve.deploy(["coreset"], options={"coreset": {"reduce_dim": 11}}, gpu=False, prefix="first",
                                   autoscaling={"coreset": Autoscaling(1, 20, 4)})
    finally:
        logging.getLogger("colabel.services.ray_runtime").removeHandler(records)
    return {"handle": handles["coreset"], "app": "first-coreset", "logged": records.messages}


def deployment_details(app: str, name: str) -> dict:
    from ray.serve.context import _get_global_client

    return _get_global_client().get_serve_details()["applications"][app]["deployments"][name]


def replica_pids(app: str) -> list[int]:
    import psutil

    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            if f"ServeReplica:{app}:" in " ".join(process.cmdline()):
                found.append(process.pid)
        except psutil.Error:
            pass
    return found


async def test_deploy_caps_max_replicas_to_what_the_local_ray_can_hold_and_says_so(first_coreset, ray_serve):
    import ray

    config = deployment_details(first_coreset["app"], "coreset")["deployment_config"]
    capped = config["autoscaling_config"]["max_replicas"]
    before = list(ray_serve._DEPLOYED)[:list(ray_serve._DEPLOYED).index(first_coreset["app"])]  # deployed earlier
    others = sum(ray_serve._DEPLOYED[app][0]["CPU"] * ray_serve._DEPLOYED[app][1] for app in before)
    assert 1 <= capped < 20 and others + 0.25 * capped <= ray.cluster_resources()["CPU"]
    assert any(f"coreset 20 -> {capped}" in m and "need a cluster" in m for m in first_coreset["logged"]), \
        first_coreset["logged"]


@pytest.mark.unit
async def test_the_default_deployments_at_their_maxima_fit_the_cpus_and_gpus_they_are_capped_to():
    from colabel.services.deployments import MODEL_DEPLOYMENTS
    from colabel.services.ray_runtime import fit_max_replicas, replica_resources

    def fitted(cpus: float, gpus: float = 0, gpu: bool = False) -> dict[str, int]:
        demands = {n: (d.autoscaling, replica_resources(d, gpu=gpu)) for n, d in MODEL_DEPLOYMENTS.items()}
        capped = fit_max_replicas(demands, {"CPU": cpus, "GPU": gpus})
        for resource, room in (("CPU", cpus), ("GPU", gpus)):  # all at their maxima together, minima permitting
            need = sum(demands[n][1][resource] * capped[n].max_replicas for n in demands)
            least = sum(demands[n][1][resource] * demands[n][0].min_replicas for n in demands)
            assert need <= max(room, least) + 1e-9
        return {n: capped[n].max_replicas for n in demands}

    assert fitted(2) == {"sam": 1, "nuclei": 1, "classifier": 1, "coreset": 2}  # 1.75 CPUs at minimum
    assert fitted(4) == {"sam": 3, "nuclei": 2, "classifier": 2, "coreset": 2}
    assert fitted(16) == {n: d.autoscaling.max_replicas for n, d in MODEL_DEPLOYMENTS.items()}  # nothing capped
    assert fitted(16, gpus=4, gpu=True) == {"sam": 2, "nuclei": 1, "classifier": 1, "coreset": 2}
    assert fitted(1) == {"sam": 1, "nuclei": 1, "classifier": 1, "coreset": 1}  # minima kept (and said)


async def test_replicas_run_calls_side_by_side_so_a_quick_call_is_not_queued_behind_a_slow_one(first_coreset):
    """T1: Serve runs the (sync) methods in a thread pool of each replica; before, one replica ran one call at a
    time and a click waited behind another caller's long call."""
    from colabel.services.gateway import RayBackend

    config = deployment_details(first_coreset["app"], "coreset")["deployment_config"]
    assert config["ray_actor_options"]["runtime_env"]["env_vars"] == {"RAY_SERVE_RUN_SYNC_IN_THREADPOOL": "1"}
    backend = RayBackend("coreset", first_coreset["handle"], app=first_coreset["app"])
    assert (await backend.call("info"))["reduce_dim"] == 11
    features = np.random.default_rng(0).standard_normal((100_000, 32)).astype(np.float32)
    labelled = np.zeros(len(features), bool)
    started = time.monotonic()
    # three slow calls (a second of CPU each), then a quick one: 4 requests, what one replica accepts at once
    slow = [asyncio.ensure_future(backend.call("select", features, labelled, 1000, seed)) for seed in range(3)]
    await asyncio.sleep(0.3)  # they run on the replica
    asked = time.monotonic()
    assert (await backend.call("info"))["reduce_dim"] == 11
    quick = time.monotonic() - asked
    assert not all(s.done() for s in slow), "the quick call waited for the slow ones"
    assert [len(r) for r in await asyncio.gather(*slow)] == [1000] * 3
    print(f"quick call {quick:.2f} s during slow ones of {time.monotonic() - started:.1f} s")
    assert quick < 1.5


async def test_a_second_colabel_process_on_the_same_ray_neither_takes_over_nor_deletes_the_first_ones_services(
        first_coreset, ray_serve):
    """T2: another process with the same prefix is refused before it deploys anything; with another prefix it
    deploys its own applications, and at its exit deletes only those."""
    import json
    import subprocess
    import sys

    import ray
    from ray import serve

    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", SECOND_PROCESS, ray.get_runtime_context().gcs_address],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    said = {k: v for line in result.stdout.splitlines() if line.startswith("{") for k, v in json.loads(line).items()}
    assert said["same_prefix"].startswith("ApplicationTaken: the Ray cluster already runs the Serve application "
                                          "'first-coreset', deployed by another colabel process (pid "), said
    assert said["same_prefix"].endswith("give this command another --models-prefix, or stop that process first")
    assert said["second"] == 99
    assert (await first_coreset["handle"].info.remote())["reduce_dim"] == 11  # unchanged, and answering
    applications = serve.status().applications
    assert "first-coreset" in applications and "second-coreset" not in applications
    assert ray_serve._read_owner("second-coreset") is None and ray_serve._read_owner("first-coreset")["pid"] == \
        os.getpid()


async def test_a_call_to_a_hung_replica_fails_at_its_deadline_naming_the_service_and_the_seconds(first_coreset):
    """T3: a replica that does not answer (SIGSTOP: a hung driver, swapping, a deadlock) fails the call at its
    deadline instead of holding the caller for minutes; the replica answers again once it runs. Serve itself
    checks replicas every 2 s (5 s to answer), so that one hung for good is replaced in about 40 s."""
    import signal

    from colabel.services.gateway import ModelServiceError, RayBackend

    config = deployment_details(first_coreset["app"], "coreset")["deployment_config"]
    assert (config["health_check_period_s"], config["health_check_timeout_s"]) == (2.0, 5.0)
    backend = RayBackend("coreset", first_coreset["handle"], app=first_coreset["app"], deadlines={"info": 2})
    assert backend.deadline("select") == 3600 and RayBackend("sam", None).deadline("segment") == 60
    assert (await backend.call("info"))["reduce_dim"] == 11
    pids = replica_pids(first_coreset["app"])
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(ModelServiceError, match=r"^coreset\.info did not answer within 2 s \("):
            await backend.call("info")
        assert 1.9 < time.monotonic() - started < 5
    finally:
        os.kill(pids[0], signal.SIGCONT)
    assert (await backend.call("info"))["reduce_dim"] == 11


async def test_colabel_serve_deploys_under_its_prefix_and_fails_calls_at_once_when_its_application_or_ray_is_gone(
        ray_serve, tmp_path, monkeypatch, capsys):
    """T2/T3 in `colabel serve`: its Serve applications are ``<--models-prefix>-<name>``; Ray lets a call to an
    application that is no longer deployed wait for ever, the backend checks it after ``status_check_s`` and fails
    the call, and the next ones at once; its Ray backends share a health monitor that it runs (calls fail at once
    once Ray is declared lost); at exit with --ray-address it asks to delete only its own applications."""
    import ray
    from ray import serve

    from colabel.apps.cli import build_parser, start_model_backends
    from colabel.services.gateway import ModelServiceError

    args = build_parser().parse_args(["serve", str(tmp_path), "--models", "coreset", "--models-prefix", "served",
                                      "--ray-address", ray.get_runtime_context().gcs_address])
    backends, stop = start_model_backends(args, tmp_path)
    backend = backends["coreset"]
    try:
        assert backend.app == "served-coreset" and "served-coreset" in ray_serve._DEPLOYED
        assert "method" in await backend.call("info")
        assert backend.monitor is not None and not backend.monitor.lost.is_set()

        backend.status_check_s = 1  # 5 s by default
        assert ray_serve.delete_applications(["served-coreset"]) == ["served-coreset"]  # deleted under it
        assert (await backend.status())["status"] == "NOT_DEPLOYED"
        started = time.monotonic()
        with pytest.raises(ModelServiceError, match=r"^coreset\.info cannot run: the Serve application "
                                                    r"'served-coreset' of the coreset model service is no longer "
                                                    r"deployed on Ray"):
            await backend.call("info")
        assert time.monotonic() - started < 15
        started = time.monotonic()
        with pytest.raises(ModelServiceError, match="no longer deployed"):
            await backend.call("info")
        assert time.monotonic() - started < 0.5
        assert "served-coreset" not in serve.status().applications

        backend.monitor.declare_lost("3 health checks failed in a row")
        with pytest.raises(ModelServiceError, match=r"^coreset\.info cannot run: Ray Serve at .* does not answer: 3 "
                                                    r"health checks failed in a row; the model services are "
                                                    r"unavailable until colabel serve is restarted$"):
            await backend.call("info")
        await asyncio.sleep(0.1)  # the monitor's task ends, and says so
        assert "does not answer: 3 health checks failed in a row; the model services are unavailable until " \
               "colabel serve is restarted" in capsys.readouterr().err
        stopped = []
        monkeypatch.setattr(ray_serve, "shutdown", lambda **kwargs: stopped.append(kwargs))  # keeps this module's Ray
        await stop()
        assert stopped == [{"applications": ["served-coreset"], "quiet": True}]
    finally:
        ray_serve.delete_applications(["served-coreset"])


async def test_a_previous_mask_refines_the_next_answer(in_process):
    sam = in_process["sam"]
    image = np.asarray(tifffile.imread(DATA / "dsb2018_nuclei.tif"))[:256, :256]
    embedding_id = sam.embed(image)["embedding_id"]
    first = sam.segment(embedding_id, None, [[100.0, 100.0]], [1], None, False, None, True)
    assert first["low_res_logits"].shape == (1, 64, 64) and first["low_res_logits"].dtype == np.float32
    refined = sam.segment(embedding_id, None, [[100.0, 100.0], [120.0, 90.0]], [1, 0], None, False,
                          first["low_res_logits"], False)
    assert "low_res_logits" not in refined and isinstance(refined["score"], float)
    with pytest.raises(Exception, match="(?i)mask_input"):
        sam.segment(embedding_id, None, [[100.0, 100.0]], [1], None, False, np.zeros((3, 3), np.float32))


async def test_a_gateway_attaches_to_serve_applications_a_cluster_already_runs(on_ray, hypha_server, connect):
    """`colabel models --attach` (the chart's gateway) registers the running application, deploys nothing,
    and leaves it running when it stops."""
    import re
    import signal
    import subprocess
    import sys

    import ray

    address = ray.get_runtime_context().gcs_address
    replicas_before = {a["name"] for a in replica_actors()}
    process = subprocess.Popen(
        [sys.executable, "-m", "colabel.apps.cli", "models", "--server-url", hypha_server.url, "--token",
         hypha_server.root_token, "--attach", "--ray-address", address, "--models", "sam", "--models-prefix",
         "attached"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    printed, deadline = {}, time.monotonic() + 90
    while time.monotonic() < deadline:
        line = await asyncio.to_thread(process.stdout.readline)
        if m := re.match(r"^(\w+): (\S+)", line):
            printed[m.group(1)] = m.group(2)
        if line.startswith("Press Ctrl-C") or not line:
            break
    try:
        assert "model_service_sam" in printed, printed
        client = await connect(await on_ray["server"].generate_token({"expires_in": 600}),
                               on_ray["services"].workspace)
        sam = await client.get_service(printed["model_service_sam"])
        assert await sam.ping() == "pong"
        assert (await sam.deployment_status())["mode"] == "ray"
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 60) == 0
    assert {a["name"] for a in replica_actors()} == replicas_before  # nothing deployed, nothing deleted
