"""``colabel pull``: a session's images and labels as a training set, from a provider URL or a local folder.

The pulled set (``--out DIR``)::

    labels.zarr/
      images/<image_id>                 (H, W, C) in the file's dtype
      instances/<image_id>/<annotator>  (H, W) uint32 instance labels of the annotator's latest version
      semantic/<image_id>/<annotator>   (H, W) uint16 class index + 1 per pixel (0 = background / unclassified)
      consensus/<image_id>              (H, W) uint32, when two or more annotators labelled the image; attrs:
                                        support, annotators, classes (majority class per object), ties
      consensus_semantic/<image_id>     (H, W) uint16 majority class index + 1 (0 = background / none / tie)
    agreement.json   per image with several annotators: F1 at IoU 0.5 and Cohen's kappa of the classes per
                     annotator pair, and the consensus's object, classified and tie counts
    consensus_cells.csv  one row per consensus object: image, label, class, tie, support, each annotator's vote
    tiff/<image name>.tif, tiff/<image name>__<annotator>_mask.tif
    geojson/<image name>__<annotator>.geojson  the annotator's latest FeatureCollection as stored (QuPath's
                     conventions, image pixels; feature k is label k of the masks)
    cells.csv        one row per labelled object: image, annotator, version, label, class, area, centroid, bbox
    coco.json        COCO instance annotations (polygons in image pixels)
    pull_state.json  the version pulled per image and annotator: a later pull fetches only newer versions

Remote pulls use a *trainer token* (read-only: it cannot annotate), issued by the provider.
"""

from __future__ import annotations

import asyncio
import csv
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from colabel.errors import InvalidInputError

from .provider.storage import atomic_write, atomic_write_json, encode_tiff


class LocalSource:
    """A session of a mounted folder, read directly (no server)."""

    def __init__(self, folder: Path, session_id: str) -> None:
        from .provider.provider import DataProvider

        self.provider = DataProvider(folder)
        self.info = self.provider.sessions.get(session_id)

    async def session(self) -> dict:
        p, info = self.provider, self.info
        images = []
        for image in p.list_images(info):
            versions = {a: p.store.versions(info.session_id, image.image_id, a) for a in image.annotations}
            images.append({**image.model_dump(mode="json"), "versions": versions})
        annotators = {k: v.model_dump(mode="json") for k, v in p.sessions.annotators(info.session_id).items()}
        return {"session": {"session_id": info.session_id, "name": info.name, "mode": info.mode,
                            "classes": [c.model_dump() for c in info.classes]},
                "annotators": annotators, "images": images}

    async def image(self, image_id: str) -> np.ndarray:
        return self.provider.get_image(image_id, session=self.info)

    async def annotation(self, image_id: str, annotator_id: str, version: int) -> dict:
        return self.provider.get_annotations(self.info, image_id, annotator_id=annotator_id, version=version)

    async def labels(self, image_id: str, annotator_id: str, version: int) -> np.ndarray:
        import tifffile

        return tifffile.imread(self.provider.store.label_path(self.info.session_id, image_id, annotator_id, version))

    async def close(self) -> None:
        return None


class RemoteSource:
    """A session of a running provider, through its annotator service with a trainer token."""

    URL = re.compile(r"^/(?P<workspace>[^/]+)/apps/(?P<name>[a-z0-9][a-z0-9-]*)-web(?:/.*)?$")

    def __init__(self, client: Any, service: Any, token: str) -> None:
        self.client, self.service, self.token = client, service, token

    @classmethod
    async def connect(cls, url: str, token: str | None = None) -> "RemoteSource":
        """``url``: the trainer URL the provider printed (``.../<workspace>/apps/<name>-web/#trainer=TOKEN``)."""
        from hypha_rpc import connect_to_server

        parts = urlsplit(url)
        match = cls.URL.match(parts.path or "")
        if parts.scheme not in ("http", "https") or not match:
            raise InvalidInputError(f"{url!r} is not a colabel provider URL (…/<workspace>/apps/<name>-web/…)")
        fragment = dict(p.split("=", 1) for p in parts.fragment.split("&") if "=" in p)
        token = token or fragment.get("trainer")
        if not token:
            raise InvalidInputError("a trainer token is needed: pass --token or a URL ending in #trainer=TOKEN")
        client = await connect_to_server({"server_url": f"{parts.scheme}://{parts.netloc}"})
        service = await client.get_service(f"{match['workspace']}/{match['name']}-annotate")
        return cls(client, service, token)

    async def session(self) -> dict:
        return await self.service.trainer_session(self.token)

    async def image(self, image_id: str) -> np.ndarray:
        return await self.service.trainer_image(self.token, image_id)

    async def annotation(self, image_id: str, annotator_id: str, version: int) -> dict:
        return await self.service.trainer_annotation(self.token, image_id, annotator_id, version)

    async def labels(self, image_id: str, annotator_id: str, version: int) -> np.ndarray:
        return await self.service.trainer_labels(self.token, image_id, annotator_id, version)

    async def close(self) -> None:
        await self.client.disconnect()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def label_classes(fc: dict) -> dict[int, str | None]:
    """Label id -> class name (``None``: unclassified) of a stored FeatureCollection's objects, in the label
    image's numbering (label k = the k-th polygon feature)."""
    return {o["label"]: o["class"] for o in _objects(fc, [])}


def _objects(fc: dict, classes: list[str]) -> list[dict]:
    """Polygon features in rasterisation order (label k = k-th polygon feature), with class and geometry."""
    from shapely.geometry import shape

    out = []
    for feature in fc.get("features", []):
        geometry = feature.get("geometry") or {}
        if geometry.get("type") not in ("Polygon", "MultiPolygon"):
            continue
        name = ((feature.get("properties") or {}).get("classification") or {}).get("name")
        poly = shape(geometry)
        xmin, ymin, xmax, ymax = poly.bounds
        out.append({"label": len(out) + 1, "class": name, "class_index": classes.index(name) if name in classes else -1,
                    "area": float(poly.area), "centroid": [poly.centroid.x, poly.centroid.y],
                    "bbox": [xmin, ymin, xmax, ymax], "geometry": geometry})
    return out


async def pull(source, out: Path, *, progress: bool = True) -> dict:
    """Pull new versions from ``source`` into ``out``; returns ``{images, pulled, skipped, cells}``."""
    import zarr
    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "pull_state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {"versions": {}, "objects": {}}
    meta = await source.session()
    classes = [c["name"] for c in meta["session"]["classes"]]
    root = zarr.open_group(str(out / "labels.zarr"), mode="a")
    root.attrs.update({"session": meta["session"], "classes": classes, "format": "colabel.pull/1"})
    (out / "tiff").mkdir(exist_ok=True)
    (out / "geojson").mkdir(exist_ok=True)
    pulled = skipped = 0
    images = [i for i in meta["images"] if not i.get("error") and i.get("versions")]
    for image in tqdm(images, desc="pull", unit="image", disable=not progress):
        image_id, stem = image["image_id"], _safe(Path(image["name"]).with_suffix("").as_posix())
        if f"images/{image_id}" not in root:
            pixels = await source.image(image_id)
            root.create_array(f"images/{image_id}", data=np.asarray(pixels), overwrite=True)
            buffer = encode_tiff(np.asarray(pixels))
            atomic_write(out / "tiff" / f"{stem}.tif", buffer)
        instances = {}
        for annotator_id, versions in image["versions"].items():
            latest = versions[-1]
            key = f"{image_id}/{annotator_id}"
            if state["versions"].get(key) == latest:
                skipped += 1
                instances[annotator_id] = np.asarray(root[f"instances/{key}"][...])
                continue
            labels = np.asarray(await source.labels(image_id, annotator_id, latest)).astype(np.uint32)
            collection = await source.annotation(image_id, annotator_id, latest)
            objects = _objects(collection, classes)
            lut = np.zeros(labels.max() + 1 if labels.size else 1, np.uint16)
            for obj in objects:
                if obj["label"] < len(lut) and obj["class_index"] >= 0:
                    lut[obj["label"]] = obj["class_index"] + 1
            root.create_array(f"instances/{key}", data=labels, overwrite=True)
            root.create_array(f"semantic/{key}", data=lut[labels], overwrite=True)
            atomic_write(out / "tiff" / f"{stem}__{_safe(annotator_id)}_mask.tif", encode_tiff(labels))
            atomic_write_json(out / "geojson" / f"{stem}__{_safe(annotator_id)}.geojson", collection)
            state["versions"][key] = latest
            state["objects"][key] = [{**{k: v for k, v in o.items() if k != "class_index"},
                                      "image_id": image_id, "image_name": image["name"], "annotator_id": annotator_id,
                                      "version": latest} for o in objects]
            instances[annotator_id] = labels
            pulled += 1
        if len(instances) >= 2:
            from colabel.services.training.consensus import image_consensus

            names = sorted(instances)
            found = image_consensus({a: instances[a] for a in names},
                                    {a: {o["label"]: o["class"] for o in state["objects"][f"{image_id}/{a}"]}
                                     for a in names})
            result, n = found.result, found.result.n_objects
            root.create_array(f"consensus/{image_id}", data=result.labels.astype(np.uint32), overwrite=True)
            root[f"consensus/{image_id}"].attrs.update({
                "support": result.support.tolist(), "annotators": names,
                "classes": [found.classes[i] for i in range(1, n + 1)], "ties": found.ties})
            lut = np.zeros(n + 1, np.uint16)
            for i, name in found.classes.items():
                lut[i] = classes.index(name) + 1 if name in classes else 0
            root.create_array(f"consensus_semantic/{image_id}", data=lut[result.labels], overwrite=True)
            state.setdefault("agreement", {})[image_id] = found.agreement
            state.setdefault("consensus", {})[image_id] = [
                {"image_id": image_id, "image_name": image["name"], "label": i, "class": found.classes[i] or "",
                 "tie": i in found.ties, "support": int(result.support[i - 1]),
                 "votes": ";".join(f"{a}={c or ''}" for a, c in found.votes[i].items())} for i in range(1, n + 1)]
    rows = [o for objects in state["objects"].values() for o in objects]
    _write_cells(out / "cells.csv", rows)
    _write_rows(out / "consensus_cells.csv", [r for image_rows in state.get("consensus", {}).values()
                                              for r in image_rows],
                ["image_id", "image_name", "label", "class", "tie", "support", "votes"])
    atomic_write_json(out / "coco.json", _coco(meta, rows))
    atomic_write_json(out / "agreement.json", state.get("agreement", {}))
    atomic_write_json(state_path, state)
    return {"images": len(images), "pulled": pulled, "skipped": skipped, "cells": len(rows)}


def _write_cells(path: Path, rows: list[dict]) -> None:
    columns = ["image_id", "image_name", "annotator_id", "version", "label", "class", "area", "centroid_x",
               "centroid_y", "xmin", "ymin", "xmax", "ymax"]
    _write_rows(path, [dict(zip(columns, [r["image_id"], r["image_name"], r["annotator_id"], r["version"], r["label"],
                                          r["class"] or "", round(r["area"], 3),
                                          *(round(v, 3) for v in r["centroid"]), *(round(v, 3) for v in r["bbox"])],
                                strict=True)) for r in rows], columns)


def _write_rows(path: Path, rows: list[dict], columns: list[str]) -> None:
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, buffer.getvalue().encode("utf-8"))


def _coco(meta: dict, rows: list[dict]) -> dict:
    """COCO instance segmentation: one category per session class, polygons as flat [x, y, ...] lists."""
    classes = [c["name"] for c in meta["session"]["classes"]]
    images = {i["image_id"]: i for i in meta["images"]}
    image_index = {iid: n + 1 for n, iid in enumerate(sorted({r["image_id"] for r in rows}))}
    annotations = []
    for n, r in enumerate(rows, start=1):
        geometry = r["geometry"]
        polygons = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
        xmin, ymin, xmax, ymax = r["bbox"]
        annotations.append({
            "id": n, "image_id": image_index[r["image_id"]],
            "category_id": classes.index(r["class"]) + 1 if r["class"] in classes else 0,
            "segmentation": [[v for point in poly[0] for v in point] for poly in polygons],
            "area": r["area"], "bbox": [xmin, ymin, xmax - xmin, ymax - ymin], "iscrowd": 0,
            "attributes": {"annotator_id": r["annotator_id"], "version": r["version"], "label": r["label"]},
        })
    return {
        "info": {"description": f"colabel session {meta['session']['name']}", "version": "1"},
        "categories": [{"id": n + 1, "name": c} for n, c in enumerate(classes)],
        "images": [{"id": image_index[iid], "file_name": images[iid]["name"], "height": images[iid]["shape"][0],
                    "width": images[iid]["shape"][1], "colabel_image_id": iid} for iid in image_index],
        "annotations": annotations,
    }


def run_pull(source: str, out: Path, *, session: str | None = None, token: str | None = None) -> dict:
    """Pull from a provider URL or a local folder (``session`` needed for a folder)."""

    async def main():
        if source.startswith(("http://", "https://")):
            src = await RemoteSource.connect(source, token)
        else:
            if not session:
                raise InvalidInputError("pulling from a local folder needs --session SESSION_ID")
            src = LocalSource(Path(source), session)
        try:
            return await pull(src, out)
        finally:
            await src.close()

    return asyncio.run(main())


def labelled_pairs(folder: str | Path, annotator: str | None = None) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(image_id, image (H, W, C) as stored, instance mask (H, W) uint32)`` of every labelled image of a pulled set,
    in image-id order: ``annotator``'s masks (images they did not label are left out), or by default the consensus
    where an image has one, else its first annotator's in sorted order.

    Raises
    ------
    InvalidInputError
        ``folder`` holds no ``labels.zarr`` (not a pulled set).
    """
    import zarr

    store = Path(folder) / "labels.zarr"
    if not store.is_dir():
        raise InvalidInputError(f"{folder} is not a pulled set (no labels.zarr): run `colabel pull` first")
    root = zarr.open_group(str(store), mode="r")
    pairs = []
    for image_id in sorted(root["instances"].group_keys()):
        names = sorted(root[f"instances/{image_id}"].array_keys())
        if annotator is not None:
            if annotator not in names:
                continue
            mask = root[f"instances/{image_id}/{annotator}"][...]
        elif f"consensus/{image_id}" in root:
            mask = root[f"consensus/{image_id}"][...]
        else:
            mask = root[f"instances/{image_id}/{names[0]}"][...]
        pairs.append((image_id, np.asarray(root[f"images/{image_id}"][...]), np.asarray(mask)))
    return pairs


def __getattr__(name: str):
    """``PulledDataset`` lives in :mod:`colabel.apps.pulled_dataset` (it imports torch; ``pull`` does not)."""
    if name == "PulledDataset":
        from .pulled_dataset import PulledDataset

        return PulledDataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
