"""Model services behind Hypha: in-process and on real Ray Serve, reached by annotators through their session.

SAM runs a tiny randomly initialised model saved as a real checkpoint (no weights can be downloaded here):
its masks are arbitrary, so these tests check transport, caching, routing and refusals, not mask quality.
Nucleus segmentation runs the real classical backend on the real DSB2018 image.
"""

from __future__ import annotations

import asyncio
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
