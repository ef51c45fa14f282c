"""``colabel report``: a session's HALS workload and effectiveness, read from its event log.

* workload = fraction of shown suggestions the annotator changed: corrected / (accepted + corrected)
  (:func:`colabel.services.hals.metrics.workload_report`); workload reduction = 1 - workload, against
  labelling every cell by hand;
* effectiveness = area under the live classifier's validation accuracy vs the number of labels N, for
  N = 0..200 (HALS's range), from the ``retrain`` events; N = 0 is chance (1 / number of classes); the area is
  normalised by the N range, so it reads as a mean accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

from colabel.errors import NotFoundError

from .provider.events import EventLog


def session_report(folder: Path, session_id: str, *, n_max: int = 200) -> dict:
    """Workload and effectiveness of one session of the mounted ``folder``."""
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
    retrains = [e for e in events if e["kind"] == "retrain" and e["n_labels"] <= n_max]
    if retrains:
        n = [0] + [e["n_labels"] for e in retrains]
        accuracy = [1 / len(classes)] + [e["val_accuracy"] for e in retrains]
        out["effectiveness_auc"] = area_under_curve(n, accuracy)
        out["curve"] = list(zip(n, accuracy, strict=True))
    else:
        out["effectiveness_auc"] = None
        out["curve"] = []
    return out


def print_report(report: dict) -> None:
    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}%"

    print(f"session {report['session_id']}: {report['events']} events, {report['labels']} cells labelled")
    print(f"  suggestions shown {report['shown']}, accepted {report['accepted']}, corrected {report['corrected']}")
    print(f"  workload (corrected / reviewed suggestions): {pct(report['workload'])}")
    print(f"  workload reduction vs labelling by hand:     {pct(report['workload_reduction'])}  (HALS paper: 90.6%)")
    auc = report["effectiveness_auc"]
    print(f"  effectiveness (area under validation accuracy vs N, N <= 200): "
          f"{'n/a' if auc is None else f'{auc:.4f}'}")
    for n, accuracy in report["curve"]:
        print(f"    N = {n:4d}  validation accuracy {accuracy:.3f}")
