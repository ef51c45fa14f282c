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
