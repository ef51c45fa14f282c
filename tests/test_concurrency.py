"""Many annotators at once: nothing lost, nothing corrupted."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import tifffile

from conftest import collection, square

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

N_ANNOTATORS = 20
N_SAVES = 20


async def test_twenty_annotators_saving_twenty_times_lose_and_corrupt_nothing(stack, connect):
    provider_client = await connect(stack.provider_token, stack.services.workspace)
    provider = await provider_client.get_service(stack.services.provider_service_id)
    created = await provider.create_session("crowd", [{"name": "nucleus", "color": "#ff0000"}],
                                            "segmentation", N_ANNOTATORS)
    token = created["token"]
    images = [i["image_id"] for i in await provider.list_images() if not i["error"]]

    async def annotate(n: int) -> list[dict]:
        client = await connect()
        service = await client.get_service(stack.services.annotator_service_id)
        aid = (await service.join(token, f"annotator {n}"))["annotator_key"]
        records = []
        for k in range(N_SAVES):
            # k + 1 squares, the last one carrying the (annotator, save) it belongs to
            features = [square(4 * j, 4 * n, 3) for j in range(k + 1)]
            features[-1]["properties"]["marker"] = [n, k]
            record = await service.save_annotation(token, aid, images[(n + k) % len(images)],
                                                   collection(*features))
            records.append({**record, "n": n, "k": k})
        return records

    results = await asyncio.gather(*(annotate(n) for n in range(N_ANNOTATORS)))
    records = [r for rs in results for r in rs]
    assert len(records) == N_ANNOTATORS * N_SAVES
    assert len({r["geojson_file"] for r in records}) == len(records)  # unique names by construction

    for record in records:
        stored = json.loads((stack.folder / record["geojson_file"]).read_text())
        assert stored["colabel"]["version"] == record["version"]
        assert len(stored["features"]) == record["k"] + 1
        assert stored["features"][-1]["properties"]["marker"] == [record["n"], record["k"]]
        labels = tifffile.imread(stack.folder / record["label_file"])
        assert labels.max() == record["k"] + 1
        assert np.count_nonzero(labels) == 9 * (record["k"] + 1)

    progress = await provider.progress(created["session"]["session_id"])
    assert sum(a["versions"] for a in progress["per_annotator"].values()) == N_ANNOTATORS * N_SAVES
    assert not list((stack.folder / "annotations").rglob("*.tmp"))


class HeldSaves:
    """Replaces the provider's rasterisation so that every save stops inside it until released: saves in
    flight, deterministically, without timing."""

    def __init__(self, monkeypatch):
        import threading

        from colabel.apps.provider import provider as provider_module

        self.entered = threading.Semaphore(0)
        self.release = threading.Event()
        real = provider_module.rasterize

        def held(*args, **kwargs):
            self.entered.release()
            self.release.wait(60)
            return real(*args, **kwargs)

        monkeypatch.setattr(provider_module, "rasterize", held)

    async def wait_entered(self, n: int = 1) -> None:
        for _ in range(n):
            assert await asyncio.to_thread(self.entered.acquire, True, 30), "no save reached rasterisation"


async def open_session(stack, connect, name: str):
    provider_client = await connect(stack.provider_token, stack.services.workspace)
    provider = await provider_client.get_service(stack.services.provider_service_id)
    created = await provider.create_session(name, [{"name": "nucleus", "color": "#ff0000"}], "segmentation", 20)
    client = await connect()
    annotator = await client.get_service(stack.services.annotator_service_id)
    image = next(i["image_id"] for i in await provider.list_images() if not i["error"])
    return provider, annotator, created, image


def saved(folder) -> list:
    return sorted((folder / "annotations").rglob("v*.geojson"))


@pytest.mark.parametrize("withdraw", ["close the session", "revoke the token"])
async def test_a_save_in_flight_when_the_session_closes_or_its_token_is_revoked_writes_nothing(
        stack, connect, monkeypatch, withdraw):
    provider, annotator, created, image = await open_session(stack, connect, withdraw)
    sid, token = created["session"]["session_id"], created["token"]
    key = (await annotator.join(token, "Late"))["annotator_key"]
    held = HeldSaves(monkeypatch)
    save = asyncio.ensure_future(annotator.save_annotation(token, key, image, collection(square(1, 1, 5))))
    await held.wait_entered()  # the save passed its checks and is being rasterised
    if withdraw == "close the session":
        await provider.close_session(sid)
    else:
        await provider.revoke_token(sid, created["session"]["tokens"][0]["token_id"])
    held.release.set()
    with pytest.raises(Exception, match="is closed" if withdraw == "close the session" else "revoked"):
        await save
    assert saved(stack.folder) == []


async def test_saves_held_up_do_not_hold_up_other_calls_and_one_annotators_saves_queue(stack, connect, monkeypatch):
    provider, annotator, created, image = await open_session(stack, connect, "busy")
    token = created["token"]
    keys = [(await annotator.join(token, f"Busy {n}"))["annotator_key"] for n in range(3)]
    held = HeldSaves(monkeypatch)
    # 3 saves by each of 3 annotators: more than the threads that serve every other call
    saves = [asyncio.ensure_future(annotator.save_annotation(token, key, image, collection(square(1, 1, 5))))
             for key in keys for _ in range(3)]
    await held.wait_entered(2)  # the save threads are all busy
    assert (await asyncio.wait_for(annotator.session_info(token), 30))["name"] == "busy"
    assert len(await asyncio.wait_for(annotator.list_images(token), 30)) > 0
    assert not any(s.done() for s in saves)
    held.release.set()
    records = await asyncio.gather(*saves)
    by_annotator: dict[str, list[int]] = {}
    for record in records:
        by_annotator.setdefault(record["annotator_id"], []).append(record["version"])
    assert sorted(map(sorted, by_annotator.values())) == [[1, 2, 3]] * 3  # every save committed, none lost
