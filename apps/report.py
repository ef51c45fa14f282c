"""``colabel report``: a session's HALS workload and the live classifier's self-validation, from its event log.

* workload = fraction of shown suggestions the annotator changed: corrected / (accepted + corrected)
  (:func:`colabel.services.hals.metrics.workload_report`); workload reduction = 1 - workload, against
  labelling every cell by hand;
* self-validation AUC = area under the live ensemble's validation accuracy vs the number of labels N, from
  the ``retrain`` events with N <= 200 (:func:`retrain_curve`); N = 0 is chance (1 / number of classes); the
  area is normalised by the N range the session reached (0..N of its last retrain), so it reads as a mean
  accuracy over that range. Each point is the ensemble's accuracy on a 25% split of *its own* labels (a
  different split at each retrain, a few cells early on), not on held-out cells, and there is no control
  curve: it is **not** the HALS paper's effectiveness (``bench/hals.py`` measures that with a simulated
  annotator), and sessions that stop at different N are not comparable.

The report only reads the folder (:class:`~colabel.apps.provider.storage.AnnotationStore` opened read-only): it
is meant to run beside the ``colabel serve`` of the same folder, and creates, changes or deletes nothing there.
"""

from __future__ import annotations

import json
from pathlib import Path

from colabel.errors import NotFoundError

from .provider.events import LABEL_KINDS, EventLog


def retrain_curve(events: list[dict], n_classes: int, *, n_max: int = 200) -> list[tuple[int, float]]:
    """The live classifier's validation accuracy vs the number of labels, from a session's ``retrain`` events.

    Starts at ``(0, 1 / n_classes)`` (chance). Retrains are taken in log order with ``n_labels <= n_max``: of
    several retrains with the same N (relabels retrain without a new cell; a restarted provider may retrain
    on the same labels) the last one counts, and a retrain with fewer labels than an earlier one (labels left
    out because their cells left the segmentation) is dropped, so N is strictly increasing.

    Returns
    -------
    list of (N, accuracy)
        N in labels, accuracy in [0, 1].

    Examples
    --------
    >>> retrain_curve([{"kind": "retrain", "n_labels": 20, "val_accuracy": 0.8},
    ...                {"kind": "retrain", "n_labels": 20, "val_accuracy": 0.9},
    ...                {"kind": "retrain", "n_labels": 25, "val_accuracy": 0.95},
    ...                {"kind": "retrain", "n_labels": 24, "val_accuracy": 0.7}], 2)
    [(0, 0.5), (20, 0.9), (25, 0.95)]
    """
    curve = [(0, 1 / n_classes)]
    for event in events:
        if event.get("kind") != "retrain" or not 0 < event.get("n_labels", 0) <= n_max:
            continue
        point = (int(event["n_labels"]), float(event["val_accuracy"]))
        if point[0] == curve[-1][0]:
            curve[-1] = point
        elif point[0] > curve[-1][0]:
            curve.append(point)
    return curve


def session_report(folder: Path, session_id: str, *, n_max: int = 200, finished_only: bool = False) -> dict:
    """Workload and live self-validation of one session of the mounted ``folder``.

    ``self_validation_auc`` is the area under :func:`retrain_curve` normalised by its N range, ``n_range``
    that range ``[0, N of the last retrain counted]`` (None without a retrain). ``finished_only``: the agreement
    counts only the annotators who finished each image (:func:`session_agreement`).
    """
    from colabel.services.hals.metrics import area_under_curve, workload_report

    session_dir = Path(folder) / "annotations" / "sessions" / session_id
    manifest = session_dir / "session.json"
    if not manifest.is_file():
        raise NotFoundError(f"no session {session_id!r} in {folder}")
    classes = json.loads(manifest.read_text())["session"]["classes"]
    events = EventLog(session_dir / "events.jsonl").read()
    review = [e for e in events if e["kind"] != "retrain"]
    labelled = {(e.get("image_id"), e.get("cell_id")) for e in review if e["kind"] != "suggestion_shown"}
    out: dict = {"session_id": session_id, "events": len(events), "labels": len(labelled)}
    if any(e["kind"] in ("suggestion_accepted", "suggestion_corrected") for e in review):
        report = workload_report(review)
        out.update(shown=report.shown, accepted=report.accepted, corrected=report.corrected,
                   workload=report.corrected / (report.accepted + report.corrected))
        out["workload_reduction"] = 1 - out["workload"]
    else:
        out.update(shown=sum(e["kind"] == "suggestion_shown" for e in review), accepted=0, corrected=0,
                   workload=None, workload_reduction=None)
    curve = retrain_curve(events, len(classes), n_max=n_max)
    if len(curve) > 1:
        n, accuracy = zip(*curve, strict=True)
        out["self_validation_auc"] = area_under_curve(list(n), list(accuracy))
        out["n_range"] = [0, n[-1]]
        out["curve"] = curve
    else:
        out["self_validation_auc"] = None
        out["n_range"] = None
        out["curve"] = []
    out["agreement"] = session_agreement(folder, session_id, events, finished_only=finished_only)
    return out


def session_agreement(folder: Path, session_id: str, events: list[dict] | None = None, *,
                      finished_only: bool = False) -> dict:
    """Inter-annotator agreement (Segebarth et al. 2020) for images with two or more annotators.

    ``images``: per image (:func:`~colabel.services.training.consensus.image_consensus` on the annotators' latest
    versions), F1 at IoU 0.5 and Cohen's kappa of the object classes (over the objects the pair matched
    one-to-one and both classed) per annotator pair, and the consensus's object, classified and tie counts.
    ``pairs``: per annotator pair over every image both labelled, the same figures with the objects pooled
    (:func:`~colabel.services.training.consensus.pooled_pair_agreement`). ``class_kappa``: ``[{a, b, kappa,
    n_cells}]``, Cohen's kappa per annotator pair over the ``n_cells`` cells both labelled in the HALS loop (each
    annotator's latest label of a cell, from the event log); pairs that share no cell are left out. ``names``:
    annotator id -> display name (from the session's annotators, else their saved annotations), image id ->
    image name, for printing. ``left_out``: ``[{image_id, annotator_id, shape, latest_shape}]``, the labels of an
    image whose size (``[H, W]``) is not that of the image's latest save (drawn before its file was replaced by one
    of another size, as ``colabel pull`` drops them): they take no part in the figures, and the image none when
    fewer than two annotators are left. ``unfinished``: ``[{image_id, annotator_id, finished_version}]``, an
    annotator's latest labels of an image that are not the version they finished it at (``finished_version`` None:
    work in progress, or left midway; else a correction since that finish); listed for images two or more
    annotators saved. With ``finished_only`` the figures take each annotator's finished version, and leave out
    those who have not finished the image (as ``colabel pull --finished-only``).
    """
    import itertools

    import tifffile

    from colabel.services.training.consensus import image_consensus, pairwise_kappa, pooled_pair_agreement

    from .provider.storage import AnnotationStore
    from .pull import label_classes

    store = AnnotationStore(Path(folder) / "annotations", read_only=True)  # the live folder of a running serve
    per_image, labelled, left_out, unfinished = {}, {}, [], []
    names: dict[str, str] = _annotator_names(Path(folder), session_id)
    finished = store.finished(session_id)
    for image_id, counts in sorted(store.counts(session_id).items()):
        ended = {a: mark["version"] for a, mark in finished.get(image_id, {}).items()}
        if len(counts) >= 2:  # where there is agreement to speak of
            unfinished += [{"image_id": image_id, "annotator_id": a, "finished_version": ended.get(a)}
                           for a in sorted(counts) if ended.get(a) != store.versions(session_id, image_id, a)[-1]]
            for a in sorted(a for a in counts if a not in names):  # the name, also of an image left out below
                names[a] = store.record(session_id, image_id, a).get("display_name") or a
            if image_id not in names:
                names[image_id] = store.record(session_id, image_id, min(counts)).get("image_name") or image_id
        annotators = sorted(a for a in counts if a in ended or not finished_only)
        if len(annotators) < 2:
            continue
        version = {a: ended.get(a) if finished_only else None for a in annotators}  # None: the latest
        masks = {a: tifffile.imread(store.label_path(session_id, image_id, a, version[a])) for a in annotators}
        collections = {a: store.load(session_id, image_id, a, version[a]) for a in annotators}
        newest = max(annotators, key=lambda a: str(collections[a].get("colabel", {}).get("saved_at") or ""))
        size = masks[newest].shape[:2]
        for a in [a for a in annotators if masks[a].shape[:2] != size]:  # drawn before the file was replaced
            left_out.append({"image_id": image_id, "annotator_id": a, "shape": list(masks[a].shape[:2]),
                             "latest_shape": list(size)})
            annotators.remove(a)
        if len(annotators) < 2:
            continue
        masks = {a: masks[a] for a in annotators}
        classes = {a: label_classes(collections[a]) for a in annotators}
        per_image[image_id] = image_consensus(masks, classes).agreement
        labelled[image_id] = (masks, classes)
    pairs = []
    for a, b in itertools.combinations(sorted({a for masks, _ in labelled.values() for a in masks}), 2):
        both = [(m[a], m[b], c[a], c[b]) for m, c in labelled.values() if a in m and b in m]
        if both:
            pairs.append({"a": a, "b": b, **pooled_pair_agreement(both)})
    table: dict[str, dict] = {}
    for event in events or []:
        if event["kind"] in LABEL_KINDS and event.get("annotator_id"):
            table.setdefault(event["annotator_id"], {})[f"{event['image_id']}/{event['cell_id']}"] = event["class"]
    kappa = []
    for (a, b), value in (pairwise_kappa(table).items() if len(table) >= 2 else []):
        shared = sum(1 for cell in table[a] if cell in table[b])
        if shared:
            kappa.append({"a": a, "b": b, "kappa": value, "n_cells": shared})
    return {"images": per_image, "pairs": pairs, "class_kappa": kappa, "names": names, "left_out": left_out,
            "unfinished": unfinished, "finished_only": finished_only}


def _annotator_names(folder: Path, session_id: str) -> dict[str, str]:
    """Annotator id -> display name of a session's joined annotators, from its manifest ({} when unreadable)."""
    manifest = Path(folder) / "annotations" / "sessions" / session_id / "session.json"
    try:
        annotators = json.loads(manifest.read_text(encoding="utf-8")).get("annotators", {})
        return {a: str(v["display_name"]) for a, v in annotators.items()
                if isinstance(v, dict) and v.get("display_name")}
    except (OSError, ValueError, AttributeError):
        return {}


def print_report(report: dict) -> None:
    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}%"

    print(f"session {report['session_id']}: {report['events']} events, {report['labels']} cells labelled")
    print(f"  suggestions shown {report['shown']}, accepted {report['accepted']}, corrected {report['corrected']}")
    print(f"  workload (corrected / reviewed suggestions): {pct(report['workload'])}")
    print(f"  workload reduction vs labelling by hand:     {pct(report['workload_reduction'])}  (HALS paper: 90.6%)")
    auc = report["self_validation_auc"]
    reached = "" if report["n_range"] is None else f" over the N range reached, N = 0..{report['n_range'][1]}"
    print(f"  self-validation accuracy AUC{reached}: {'n/a' if auc is None else f'{auc:.4f}'}")
    if auc is not None:
        print("    (the live classifier's accuracy on a 25% split of its own labels at each retrain, N = 0 at "
              "chance; not the HALS paper's effectiveness, which compares held-out learning curves with a control)")
    for n, accuracy in report["curve"]:
        print(f"    N = {n:4d}  self-validation accuracy {accuracy:.3f}")
    agreement = report.get("agreement") or {}
    names = agreement.get("names", {})

    def who(annotator_id: str) -> str:
        name = names.get(annotator_id, annotator_id)
        return name if name == annotator_id else f"{name} ({annotator_id})"

    def figures(p: dict) -> str:
        return f"F1 {p['f1']:.3f}" + (f" kappa {p['kappa']:.3f}" if p.get("kappa") is not None else "")

    for pair in agreement.get("pairs", []):
        print(f"  agreement {who(pair['a'])} / {who(pair['b'])} over {pair['images']} images: {figures(pair)} "
              f"({pair['matched']} objects matched at IoU 0.5, {pair['only_a']} drawn by the first only, "
              f"{pair['only_b']} by the second only; kappa over {pair['n_cells']} classed)")
    for image_id, image in agreement.get("images", {}).items():
        pairs = ", ".join(f"{who(p['a'])}/{who(p['b'])} {figures(p)}" for p in image["pairs"])
        print(f"  agreement on {names.get(image_id, image_id)} (F1 at IoU 0.5, Cohen's kappa of classes): {pairs}")
        consensus = image.get("consensus")
        if consensus:
            ties = f" (objects {', '.join(map(str, consensus['ties']))})" if consensus["ties"] else ""
            print(f"    consensus: {consensus['objects']} objects, {consensus['classified']} with a majority class, "
                  f"{len(consensus['ties'])} ties{ties}")
    for entry in agreement.get("left_out", []):
        (h, w), (latest_h, latest_w) = entry["shape"], entry["latest_shape"]
        print(f"  left out of the agreement on {names.get(entry['image_id'], entry['image_id'])}: the labels of "
              f"{who(entry['annotator_id'])}: they were drawn on an image {w} pixels wide and {h} high, the "
              f"image's latest save on one {latest_w} pixels wide and {latest_h} high (its file was replaced)")
    unfinished: dict[str, list[str]] = {}
    for entry in agreement.get("unfinished", []):
        corrected = entry.get("finished_version")
        unfinished.setdefault(entry["image_id"], []).append(
            who(entry["annotator_id"]) + (f" (finished at version {corrected}, corrected since)" if corrected else ""))
    for image_id, people in unfinished.items():
        counted = ("the agreement takes the finished versions only: --finished-only" if agreement.get("finished_only")
                   else "counted in the agreement as they are; --finished-only takes the finished versions only")
        print(f"  not finished on {names.get(image_id, image_id)}: the labels of {', '.join(people)}; {counted}")
    for pair in agreement.get("class_kappa", []):
        kappa = pair["kappa"]
        cells = f"{pair['n_cells']} cell{'' if pair['n_cells'] == 1 else 's'}"
        print(f"  class agreement {who(pair['a'])} / {who(pair['b'])} over {cells} both labelled: "
              f"Cohen's kappa {'n/a' if kappa is None else f'{kappa:.3f}'}")
