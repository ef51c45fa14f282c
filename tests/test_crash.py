"""The provider process killed with SIGKILL in the middle of saves: every acknowledged save survives."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal

import pytest
import tifffile

from conftest import collection, make_image_folder, square, start_colabel

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]


def start_provider(folder, hypha_server, name):
    """``colabel serve FOLDER --server-url ... --token ...`` as a subprocess; returns (process, printed lines)."""
    process, printed = start_colabel(["serve", str(folder), "--server-url", hypha_server.url, "--token",
                                      hypha_server.root_token, "--name", name, "--models", ""],
                                     timeout=60, start_new_session=True)
    if "share_url" not in printed:
        process.kill()
        raise AssertionError(f"colabel serve did not start: {printed} {process.stdout.read()}")
    return process, printed


async def test_acknowledged_saves_survive_sigkill_of_the_provider(hypha_server, tmp_path, connect):
    folder = make_image_folder(tmp_path / "images")
    name = f"crash{secrets.token_hex(3)}"
    process, printed = start_provider(folder, hypha_server, name)
    token = printed["share_url"].split("#token=", 1)[1]
    service_id = printed["annotator_service"]

    acknowledged: list[dict] = []
    keys: dict[int, str] = {}

    async def annotate(n: int, service):
        aid = (await service.join(token, f"writer {n}"))["annotator_key"]
        keys[n] = aid
        readable = [i for i in await service.list_images(token) if not i["error"]]
        image = readable[n % len(readable)]
        k = 0
        while True:
            features = [square(2 * j, 2 * n, 2) for j in range(k % 30 + 1)]
            features[0]["properties"]["marker"] = [n, k]
            record = await service.save_annotation(token, aid, image["image_id"], collection(*features))
            acknowledged.append({**record, "n": n, "k": k})
            k += 1

    clients = [await (await connect()).get_service(service_id) for _ in range(4)]
    tasks = [asyncio.create_task(annotate(n, c)) for n, c in enumerate(clients)]
    while len(acknowledged) < 40:
        await asyncio.sleep(0.01)
        assert not any(t.done() for t in tasks), [t.exception() for t in tasks if t.done()]
    os.killpg(process.pid, signal.SIGKILL)  # mid-save: requests are in flight
    process.wait()
    killed_at = len(acknowledged)
    await asyncio.sleep(0.5)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert killed_at >= 40

    restarted, _ = start_provider(folder, hypha_server, name)
    try:
        service = await (await connect()).get_service(service_id)
        for record in acknowledged:
            stored = json.loads((folder / record["geojson_file"]).read_text())
            assert stored["features"][0]["properties"]["marker"] == [record["n"], record["k"]]
            assert tifffile.imread(folder / record["label_file"]).max() == record["k"] % 30 + 1
            again = await service.get_annotations(token, keys[record["n"]], record["image_id"],
                                                  record["version"])
            assert again["features"][0]["properties"]["marker"] == [record["n"], record["k"]]
        assert not list((folder / "annotations").rglob("*.tmp"))  # interrupted writes cleaned at restart
    finally:
        restarted.send_signal(signal.SIGTERM)
        assert restarted.wait(30) == 0
