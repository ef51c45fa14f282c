"""HALS benchmark: workload reduction and effectiveness of a simulated annotator on real images.

HALS (van der Wal et al., npj Digital Medicine 2021) reports 90.6% less work and +4.34% effectiveness. This
script reproduces both measurements with a simulated, error-free annotator whose ground truth is derived
from the stains or intensities of real images (no per-cell classes ship offline; see docs/hals-benchmark.md
for every rule):

* ``ihc``: scikit-image ``data.immunohistochemistry()``, nuclei from ``segment_nuclei`` (classical),
  class = DAB-positive vs negative by the mean DAB optical density in a 5 px ring around the nucleus;
* ``dsb``: the DSB2018 fluorescence image with its hand-labelled nuclei, class = bright vs dim (mean
  intensity above / below the median);
* ``he``: the H&E crop, nuclei from ``segment_nuclei``, class = dark vs pale (mean hematoxylin optical
  density above / below the median).

Features (``--features cell``, the classifier service's): EfficientNet-Lite0 on patches of 1.6 median
nucleus diameters, plus 12 per-nucleus stain and shape measurements, block-balanced in the classifier
(:mod:`colabel.services.hals.measurements`). ``--features cnn-fixed --patch-size 40`` gives HALS' original
40 px CNN features.

Per image and seed, a HALS run (random start of 20 cells per class, then Coreset-guided patches with
classifier suggestions) and a control run (patches in reading order, all by hand) are simulated by
:func:`colabel.services.hals.simulation.simulate`; workload reduction and effectiveness come from
:mod:`colabel.services.hals.metrics`. Two more label orders are measured as ablations: the control with
the same random start, and cells in random order.

Usage::

    python bench/hals.py                 # 5 seeds, learning curves every 10 labels, + 1M Coreset timing
    python bench/hals.py --quick         # 2 seeds, curve points every 25 labels (smoke run)
    python bench/hals.py --skip-1m       # without the 1M x 1280 Coreset timing (~30 s, 5 GB RAM)
    python bench/hals.py --skip-1m --features cnn-fixed --patch-size 40   # HALS' original 40 px CNN features

Results go to ``bench/results/hals.json``; features are cached in ``bench/results/cache``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Timing, percentile, print_table, write_json  # noqa: E402

from colabel.services.hals.metrics import (  # noqa: E402
    area_under_curve,
    effectiveness_ratio,
    learning_curve,
    workload_reduction,
    workload_report,
)
from colabel.services.hals.simulation import (  # noqa: E402
    curve_points,
    head_trainer,
    holdout_split,
    region_means,
    simulate,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
RESULTS = ROOT / "bench" / "results"

PAPER = {"workload_reduction": 0.906, "effectiveness": 0.0434}
TARGET = {"workload_reduction": 0.95, "effectiveness": 0.05}

#: Fixed seed of the held-out evaluation split of every image (the same for all run seeds).
EVAL_SEED = 2021
EVAL_FRACTION = 0.25
#: Ring width around each IHC nucleus in which DAB is measured (about a third of a nucleus diameter).
IHC_RING_PX = 5


@dataclass
class CellSet:
    """One image with its cells, derived classes, features and split."""

    name: str
    source: str
    rule: str
    class_names: tuple[str, str]
    image_shape: tuple[int, int]
    centroids_xy: np.ndarray
    values: np.ndarray
    threshold: float
    truth: np.ndarray
    features: np.ndarray
    pool: np.ndarray
    eval: np.ndarray
    notes: dict
    #: Classifier column weights (block balance of CNN and measurement columns); None: all 1.
    column_weights: np.ndarray | None = None


def _segment(image: np.ndarray):
    from colabel.services.nuclei import segment_nuclei

    result = segment_nuclei(image, backend="classical")
    ids = np.array([n.id for n in result.nuclei], dtype=np.int64)
    xy = np.array([n.centroid for n in result.nuclei], dtype=np.float64)
    return result.labels, ids, xy


def load_ihc() -> dict:
    from skimage import color, data
    from skimage.filters import threshold_otsu

    image = data.immunohistochemistry()
    labels, ids, xy = _segment(image)
    dab = color.rgb2hed(image)[..., 2]
    ring = region_means(dab, labels, ids, ring=IHC_RING_PX)
    inside = region_means(dab, labels, ids)
    no_ring = np.isnan(ring)
    values = np.where(no_ring, inside, ring)  # a nucleus fully enclosed by others: its own pixels
    threshold = float(threshold_otsu(values))
    truth = (values > threshold).astype(np.int64)
    inside_truth = (inside > threshold_otsu(inside)).astype(np.int64)
    return {
        "image": image, "labels": labels, "ids": ids, "xy": xy, "values": values, "threshold": threshold,
        "truth": truth, "source": "skimage.data.immunohistochemistry() (= tests/data/ihc_ki67.png), 512x512 RGB",
        "rule": f"mean DAB OD (rgb2hed) in a {IHC_RING_PX} px ring around the nucleus > Otsu",
        "class_names": ("DAB-negative", "DAB-positive"),
        "notes": {"segmentation": "segment_nuclei classical (hematoxylin)", "ring_px": IHC_RING_PX,
                  "nuclei_without_ring": int(no_ring.sum()),
                  "agreement_with_inside_rule": float(np.mean(inside_truth == truth))},
    }


def load_dsb() -> dict:
    import tifffile
    from skimage import measure

    image = tifffile.imread(DATA / "dsb2018_nuclei.tif")
    mask = tifffile.imread(DATA / "dsb2018_nuclei_mask.tif")
    props = measure.regionprops(mask)
    ids = np.array([p.label for p in props], dtype=np.int64)
    xy = np.array([p.centroid for p in props])[:, ::-1] + 0.5  # pixel centres, xy corner convention
    values = region_means(image.astype(np.float64), mask, ids)
    threshold = float(np.median(values))
    return {
        "image": image, "labels": mask, "ids": ids, "xy": xy, "values": values, "threshold": threshold,
        "truth": (values > threshold).astype(np.int64),
        "source": "tests/data/dsb2018_nuclei.tif + hand-labelled dsb2018_nuclei_mask.tif (DSB2018, CC0)",
        "rule": "mean intensity inside the hand-labelled nucleus > median (bright vs dim)",
        "class_names": ("dim", "bright"),
        "notes": {"segmentation": "hand-labelled mask"},
    }


def load_he() -> dict:
    import imageio.v3 as iio
    from skimage import color

    image = iio.imread(DATA / "he_histo.jpg")[..., :3]
    labels, ids, xy = _segment(image)
    values = region_means(color.rgb2hed(image)[..., 0], labels, ids)
    threshold = float(np.median(values))
    return {
        "image": image, "labels": labels, "ids": ids, "xy": xy, "values": values, "threshold": threshold,
        "truth": (values > threshold).astype(np.int64),
        "source": "tests/data/he_histo.jpg (StarDist test image), 300x500 RGB",
        "rule": "mean hematoxylin OD (rgb2hed) inside the nucleus > median (dark vs pale)",
        "class_names": ("pale", "dark"),
        "notes": {"segmentation": "segment_nuclei classical (hematoxylin)"},
    }


LOADERS = {"ihc": load_ihc, "dsb": load_dsb, "he": load_he}


def prepare(name: str, *, features: str = "cell", patch_size: int = 40, cache_dir: Path,
            ambiguous_band: float = 0.0, balance: float = 1.0) -> CellSet:
    """Load *name*, derive its classes and compute its features.

    ``features``: ``"cell"`` (the service's default, :func:`~colabel.services.hals.measurements.cell_features`:
    CNN on a patch of 1.6 median nucleus diameters + 12 nucleus measurements), ``"cnn"`` (that CNN block
    only) or ``"cnn-fixed"`` (CNN on fixed *patch_size* px patches: HALS' 40 px, the previous default).
    """
    from colabel.services.hals.features import EfficientNetLite0Features, FeatureStore
    from colabel.services.hals.measurements import (
        cell_features,
        column_weights,
        median_diameter,
        patch_size_for,
    )

    d = LOADERS[name]()
    store = FeatureStore(cache_dir)
    extractor = EfficientNetLite0Features()
    diameter = median_diameter(d["labels"], d["ids"])
    weights = None
    if features == "cell":
        x = cell_features(d["image"], d["labels"], d["ids"], d["xy"], extractor, store=store)
        weights = column_weights(extractor.dim, ratio=balance)
        patch_size = patch_size_for(diameter)
    elif features == "cnn":
        patch_size = patch_size_for(diameter)
        x = store.get_or_compute(d["image"], d["xy"], extractor, patch_size=patch_size)
    elif features == "cnn-fixed":
        x = store.get_or_compute(d["image"], d["xy"], extractor, patch_size=patch_size)
    else:
        raise ValueError(f"unknown features {features!r}")
    features = x
    xy, values, truth, notes = d["xy"], d["values"], d["truth"], dict(d["notes"])
    notes.update({"median_nucleus_diameter_px": round(diameter, 2), "cnn_patch_px": int(patch_size),
                  "feature_dim": int(x.shape[1])})
    if ambiguous_band > 0:
        # Leave out the cells whose value is nearest the threshold (before the split: never labelled nor
        # evaluated), i.e. the cells whose derived class is least certain.
        closeness = np.argsort(np.argsort(np.abs(values - d["threshold"]))) / len(values)
        keep = closeness >= ambiguous_band
        xy, values, truth, features = xy[keep], values[keep], truth[keep], features[keep]
        notes["ambiguous_band_left_out"] = int((~keep).sum())
    pool, held = holdout_split(len(truth), fraction=EVAL_FRACTION, seed=EVAL_SEED)
    return CellSet(name=name, source=d["source"], rule=d["rule"], class_names=d["class_names"],
                   image_shape=tuple(d["image"].shape[:2]), centroids_xy=xy, values=values,
                   threshold=d["threshold"], truth=truth, features=features, pool=pool, eval=held, notes=notes,
                   column_weights=weights)


def full_pool_accuracy(cells: CellSet, seed: int = 0) -> float:
    """Eval accuracy of a 5-member ensemble trained on every pool cell: the ceiling of the learning curves."""
    from colabel.services.hals.classifier import Ensemble

    ens = Ensemble().fit(cells.features[cells.pool], cells.truth[cells.pool], n_classes=2, n_members=5, seed=seed,
                         column_weights=cells.column_weights)
    return float(np.mean(ens.predict(cells.features[cells.eval])[0] == cells.truth[cells.eval]))


def curve(cells: CellSet, result, points: np.ndarray, *, repeats: int, seed: int) -> np.ndarray:
    train = head_trainer(cells.features, n_classes=2, repeats=repeats, seed=seed,
                         column_weights=cells.column_weights)
    _, acc = learning_curve(train, result.label_order, result.labels,
                            (cells.eval, cells.truth[cells.eval]), n_values=points, repeats=repeats,
                            seed=seed, n_classes=2)
    return acc


def run_seed(cells: CellSet, seed: int, args) -> dict:
    common = dict(image_shape=cells.image_shape, pool=cells.pool, patch_size=args.grid, max_labels=args.max_labels,
                  seed=seed, image_id=cells.name,
                  classifier_options={"column_weights": cells.column_weights, "n_members": args.members})
    t0 = time.perf_counter()
    runs = {
        "hals": simulate(cells.features, cells.truth, cells.centroids_xy, policy="hals", k=args.k,
                         initial_per_class=args.initial, **common),
        "control": simulate(cells.features, cells.truth, cells.centroids_xy, policy="control", **common),
        "control+start": simulate(cells.features, cells.truth, cells.centroids_xy, policy="control",
                                  initial_per_class=args.initial, **common),
        "random": simulate(cells.features, cells.truth, cells.centroids_xy, policy="random", **common),
    }
    # Suggestions without Coreset: the same random start, then random cells (label order of "random" with
    # the start prepended), to tell the classifier's errors from the cells Coreset sends the annotator to.
    random_ai = simulate(cells.features, cells.truth, cells.centroids_xy, policy="random", suggestions=True,
                         initial_per_class=args.initial, **common)
    sim_seconds = time.perf_counter() - t0
    hals = runs["hals"]
    report = workload_report(hals.events)
    # Corrections among the cells nearest the class threshold (the ambiguous band of the derived rule):
    # closeness rank of every cell's |value - threshold|, 0 = nearest.
    closeness = np.argsort(np.argsort(np.abs(cells.values - cells.threshold))) / len(cells.values)
    wrong = hals.label_order[(hals.suggested >= 0) & (hals.suggested != hals.labels)]
    n_max = min(len(r.label_order) for r in runs.values())
    points = curve_points(n_max, args.step)
    t0 = time.perf_counter()
    curves = {name: curve(cells, r, points, repeats=args.repeats, seed=seed) for name, r in runs.items()}
    curve_seconds = time.perf_counter() - t0
    aucs = {name: area_under_curve(points, acc) for name, acc in curves.items()}
    suggested = hals.suggested >= 0
    return {
        "seed": seed,
        "workload_reduction": workload_reduction(hals.events),
        "workload_reduction_incl_manual": workload_reduction(hals.events, include_manual=True),
        "workload": {"shown": report.shown, "accepted": report.accepted, "corrected": report.corrected,
                     "manual": report.manual, "labels": len(hals.label_order), "initial": hals.n_initial},
        "suggestion_accuracy_first_half": float(np.mean((hals.suggested == hals.labels)[suggested][
            : suggested.sum() // 2])) if suggested.any() else None,
        "suggestion_accuracy_second_half": float(np.mean((hals.suggested == hals.labels)[suggested][
            suggested.sum() // 2:])) if suggested.any() else None,
        "corrected_in_nearest_20pct": float(np.mean(closeness[wrong] < 0.2)) if len(wrong) else None,
        "workload_reduction_random_order_with_suggestions": workload_reduction(random_ai.events),
        "effectiveness": effectiveness_ratio(aucs["hals"], aucs["control"]),
        "effectiveness_vs": {name: effectiveness_ratio(aucs["hals"], aucs[name]) for name in runs if name != "hals"},
        "auc": aucs,
        "curve_n": points.tolist(),
        "curves": {name: [round(float(v), 4) for v in acc] for name, acc in curves.items()},
        "positive_fraction": {name: float(r.labels.mean()) for name, r in runs.items()},
        "patches_visited": {name: len(r.patches) for name, r in runs.items()},
        "retrains": len(hals.retrain_at),
        "retrain_ms": [round(s * 1000, 2) for s in hals.retrain_seconds],
        "simulation_seconds": round(sim_seconds, 2),
        "curve_seconds": round(curve_seconds, 2),
    }


def mean_sd(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def pct(mean: float, sd: float, *, sign: bool = False) -> str:
    return f"{mean * 100:+.2f}% ± {sd * 100:.2f}" if sign else f"{mean * 100:.1f}% ± {sd * 100:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=None, help="seeds per image (default 5; --quick: 2)")
    parser.add_argument("--quick", action="store_true", help="2 seeds, learning-curve points every 25 labels")
    parser.add_argument("--skip-1m", action="store_true", help="skip the 1M x 1280 Coreset timing (~30 s, 5 GB)")
    parser.add_argument("--images", default="ihc,dsb,he", help="comma-separated subset of ihc,dsb,he")
    parser.add_argument("--features", choices=("cell", "cnn", "cnn-fixed"), default="cell",
                        help="cell: CNN on a 1.6-nucleus-diameter patch + 12 nucleus measurements (the service's "
                             "default); cnn: that CNN block only; cnn-fixed: CNN on --patch-size px patches")
    parser.add_argument("--patch-size", type=int, default=40, help="patch side in px for --features cnn-fixed")
    parser.add_argument("--balance", type=float, default=1.0,
                        help="--features cell: measurement block variance / CNN block variance (service: 1)")
    parser.add_argument("--members", type=int, default=5, help="ensemble members of the online classifier")
    parser.add_argument("--grid", type=int, default=128, help="guidance patch side in px")
    parser.add_argument("--k", type=int, default=10, help="Coreset cells per patch choice")
    parser.add_argument("--initial", type=int, default=20, help="random start: labels per class")
    parser.add_argument("--max-labels", type=int, default=200)
    parser.add_argument("--step", type=int, default=None, help="learning-curve spacing in labels (10; --quick: 25)")
    parser.add_argument("--repeats", type=int, default=10, help="trainings per learning-curve point")
    parser.add_argument("--ambiguous-band", type=float, default=0.0,
                        help="leave out this fraction of cells nearest the class threshold (label-noise check)")
    parser.add_argument("--timings-only", action="store_true",
                        help="only the retrain and Coreset timings (no simulated sessions)")
    parser.add_argument("--out", type=Path, default=RESULTS / "hals.json")
    args = parser.parse_args(argv)
    args.seeds = args.seeds or (2 if args.quick else 5)
    args.step = args.step or (25 if args.quick else 10)
    names = [n.strip() for n in args.images.split(",") if n.strip()]
    unknown = set(names) - set(LOADERS)
    if unknown:
        parser.error(f"unknown images {sorted(unknown)}; choose from {sorted(LOADERS)}")
    if args.timings_only:
        names = []
    from tqdm.auto import tqdm

    started = time.perf_counter()
    feature_text = (f"CNN on fixed {args.patch_size} px patches" if args.features == "cnn-fixed" else
                    "CNN on patches of 1.6 nucleus diameters" + (" + 12 nucleus measurements"
                                                                 if args.features == "cell" else ""))
    print(f"HALS benchmark: images {names}, {args.seeds} seeds, features: {feature_text}, {args.members} members, "
          f"grid {args.grid} px, k={args.k}, start {args.initial}/class, {args.max_labels} labels, "
          f"curve every {args.step} labels x {args.repeats} trainings")
    cell_sets = {}
    for name in tqdm(names, desc="images (segment, derive classes, features)", unit="image"):
        cell_sets[name] = prepare(name, features=args.features, patch_size=args.patch_size,
                                  cache_dir=RESULTS / "cache", ambiguous_band=args.ambiguous_band,
                                  balance=args.balance)

    per_image: dict[str, dict] = {}
    tasks = [(name, seed) for name in names for seed in range(args.seeds)]
    bar = tqdm(tasks, desc="simulated sessions", unit="run")
    for name, seed in bar:
        bar.set_postfix(image=name, seed=seed)
        cells = cell_sets[name]
        entry = per_image.setdefault(name, {"runs": []})
        entry["runs"].append(run_seed(cells, seed, args))
    bar.close()

    rows, seed_rows, ablation_rows, workload_rows, all_retrain_ms = [], [], [], [], []
    for name in names:
        cells, entry = cell_sets[name], per_image[name]
        runs = entry["runs"]
        wr = mean_sd([r["workload_reduction"] for r in runs])
        wr_all = mean_sd([r["workload_reduction_incl_manual"] for r in runs])
        ef = mean_sd([r["effectiveness"] for r in runs])
        ceiling = full_pool_accuracy(cells)
        entry.update({
            "source": cells.source, "rule": cells.rule, "class_names": list(cells.class_names),
            "threshold": cells.threshold, "n_cells": int(len(cells.truth)), "n_pool": int(len(cells.pool)),
            "n_eval": int(len(cells.eval)), "positive_fraction": float(cells.truth.mean()),
            "full_pool_accuracy": ceiling, "notes": cells.notes,
            "summary": {"workload_reduction_mean": wr[0], "workload_reduction_sd": wr[1],
                        "workload_reduction_incl_manual_mean": wr_all[0],
                        "workload_reduction_incl_manual_sd": wr_all[1],
                        "effectiveness_mean": ef[0], "effectiveness_sd": ef[1],
                        "meets_workload_target": wr[0] >= TARGET["workload_reduction"],
                        "meets_effectiveness_target": ef[0] >= TARGET["effectiveness"]},
        })
        rows.append({
            "image": name, "cells (pool/eval)": f"{len(cells.pool)}/{len(cells.eval)}",
            "pos": f"{cells.truth.mean():.2f}", "CNN patch": f"{cells.notes['cnn_patch_px']} px",
            "seeds": len(runs),
            "workload red.": pct(*wr), "paper": "90.6%", "target": "≥95%",
            "effectiveness": pct(*ef, sign=True), "paper ": "+4.34%", "target ": "≥+5%",
            "ceiling acc": f"{ceiling:.3f}",
        })
        for r in runs:
            all_retrain_ms += r["retrain_ms"]
            w = r["workload"]
            seed_rows.append({
                "image": name, "seed": r["seed"], "shown": w["shown"], "accepted": w["accepted"],
                "corrected": w["corrected"], "manual": w["manual"],
                "workload red.": f"{r['workload_reduction'] * 100:.1f}%",
                "incl. manual": f"{r['workload_reduction_incl_manual'] * 100:.1f}%",
                "AUC hals": f"{r['auc']['hals']:.4f}", "AUC control": f"{r['auc']['control']:.4f}",
                "effectiveness": f"{r['effectiveness'] * 100:+.2f}%", "N max": r["curve_n"][-1],
            })
        for other in ("control", "control+start", "random"):
            vs = mean_sd([r["effectiveness_vs"][other] for r in runs])
            share = np.mean([r["positive_fraction"][other] for r in runs])
            share_hals = np.mean([r["positive_fraction"]["hals"] for r in runs])
            ablation_rows.append({"image": name, "HALS vs": other, "effectiveness": pct(*vs, sign=True),
                                  "AUC": f"{np.mean([r['auc'][other] for r in runs]):.4f}",
                                  "AUC hals": f"{np.mean([r['auc']['hals'] for r in runs]):.4f}",
                                  "positive share of labels": f"{share:.2f} (hals {share_hals:.2f})"})
        near = [r["corrected_in_nearest_20pct"] for r in runs if r["corrected_in_nearest_20pct"] is not None]
        workload_rows.append({
            "image": name,
            "HALS (Coreset order)": pct(*wr),
            "incl. manual labels": pct(*wr_all),
            "suggestions, random order": pct(*mean_sd([r["workload_reduction_random_order_with_suggestions"]
                                                        for r in runs])),
            "corrections near threshold": f"{np.mean(near) * 100:.0f}%" if near else "-",
        })

    if names:  # not with --timings-only
        print_table("HALS simulated annotator: per image (mean ± sd over seeds)", rows, list(rows[0]))
        print_table("Per seed", seed_rows, list(seed_rows[0]))
        print_table("Ablations: effectiveness of HALS against other label orders", ablation_rows,
                    list(ablation_rows[0]))
        for name in names:
            runs = per_image[name]["runs"]
            n = np.asarray(runs[0]["curve_n"])
            show = [i for i, v in enumerate(n) if v in (0, 10, 20, 40, 60, 80, 120, 160, 200) or i == len(n) - 1]
            curve_rows = [{"N": int(n[i]), **{policy: f"{np.mean([r['curves'][policy][i] for r in runs]):.3f}"
                                              for policy in runs[0]["curves"]}} for i in show]
            print_table(f"Learning curves, {name}: eval accuracy after the first N labels (mean over seeds)",
                        curve_rows, list(curve_rows[0]))
        print_table("Workload reduction: paper definition, with the manual labels counted, without Coreset; share "
                    "of corrections among the 20% of cells nearest the class threshold", workload_rows,
                    list(workload_rows[0]))

    # --- timings -------------------------------------------------------------------------------------------
    from colabel.services.hals.classifier import bench_retrain
    from colabel.services.hals.measurements import N_MEASUREMENTS, column_weights

    timings: dict = {}
    # The service's configuration (1280 CNN + 12 measurement columns, block-balanced) and, in the same
    # process, HALS' plain 1280-d features as the baseline; alternated twice to even out machine load.
    dim = 1280 + N_MEASUREMENTS
    cell_runs, plain_runs = [], []
    for _ in range(2):
        cell_runs.append(bench_retrain(n_labels=200, dim=dim, repeats=10, column_weights=column_weights(1280)))
        plain_runs.append(bench_retrain(n_labels=200, dim=1280, repeats=10))
    retrain = {"median_ms": float(np.median([r["median_ms"] for r in cell_runs])),
               "p95_ms": float(np.median([r["p95_ms"] for r in cell_runs])), "dim": dim, "runs": cell_runs}
    plain = {"median_ms": float(np.median([r["median_ms"] for r in plain_runs])),
             "p95_ms": float(np.median([r["p95_ms"] for r in plain_runs])), "dim": 1280, "runs": plain_runs}
    timings["bench_retrain_200"] = retrain
    timings["bench_retrain_200_plain_1280"] = plain
    timings["retrain_ratio_cell_vs_plain"] = retrain["median_ms"] / plain["median_ms"]
    in_runs = Timing(all_retrain_ms)
    timings["retrain_in_runs"] = {**in_runs.as_dict(), "max_ms": max(all_retrain_ms) if all_retrain_ms else None}
    timing_rows = [
        {"what": f"retrain, 5-member ensemble, 200 labels x {dim}-d cell features (bench_retrain, 2 x 10 reps)",
         "median": f"{retrain['median_ms']:.1f} ms", "p95": f"{retrain['p95_ms']:.1f} ms"},
        {"what": "  baseline, same process: 200 labels x 1280-d CNN features",
         "median": f"{plain['median_ms']:.1f} ms (ratio {timings['retrain_ratio_cell_vs_plain']:.2f})",
         "p95": f"{plain['p95_ms']:.1f} ms"},
        {"what": f"retrain during the HALS runs ({len(all_retrain_ms)} retrains, 40-200 labels)",
         "median": f"{in_runs.median:.1f} ms", "p95": f"{percentile(all_retrain_ms, 95):.1f} ms"},
    ]
    if not args.skip_1m:
        from colabel.services.hals.coreset import bench_coreset

        print("\nCoreset 1M x 1280 (generating 5 GB of synthetic features, ~30 s) ...", flush=True)
        core = bench_coreset(n=1_000_000, d=1280, k=100, reduce_dim=64, verbose=False)
        core.pop("indices", None)
        timings["bench_coreset_1m"] = core
        timing_rows.append({"what": "Coreset k=100 of 1M x 1280, 200 labelled, reduce_dim=64 (bench_coreset)",
                            "median": f"{core['seconds']:.2f} s (1 run)",
                            "p95": f"peak RSS {core['peak_rss_bytes'] / 2**30:.2f} GiB"})
    print_table("Timings", timing_rows, ["what", "median", "p95"])

    elapsed = time.perf_counter() - started
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    results = {"command": "python bench/hals.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "config": config, "eval_seed": EVAL_SEED, "eval_fraction": EVAL_FRACTION,
               "paper": PAPER, "target": TARGET, "images": per_image, "timings": timings,
               "elapsed_seconds": round(elapsed, 1)}
    path = write_json(args.out, results)
    print(f"\nwrote {path} in {elapsed:.0f} s "
          f"(simulation {sum(r['simulation_seconds'] for e in per_image.values() for r in e['runs']):.0f} s, "
          f"curves {sum(r['curve_seconds'] for e in per_image.values() for r in e['runs']):.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
