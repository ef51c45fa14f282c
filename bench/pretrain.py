"""Pre-training from a few annotated images: how many objects must an annotator still fix?

The DSB2018 fluorescence image shipped with colabel (512x512, 125 hand-labelled nuclei, CC0) is cut into
16 tiles of 128 px. U-Nets are trained on 6 tiles (``train_segmenter``: random crops, flips, rot90,
intensity jitter; foreground + boundary + centre maps, BCE + Dice; by default on an EfficientNet-Lite0 encoder
starting from its ImageNet weights, ``--encoder none`` for the plain U-Net from random weights) and evaluated
on the other 10 tiles (each tile predicted on its own), against:

* **classical**: ``segment_nuclei(tile)`` (the default scikit-image watershed backend), no training;
* **from scratch**: nothing predicted, every object drawn by hand (fix-rate 100 % by definition).

Objects to fix = (false negatives + false positives at IoU 0.5) / ground-truth objects, summed over the
10 evaluation tiles (objects cut by a tile edge count in the tile where they are). Target: a fix-rate
<= 10 % (>= 90 % fewer objects to fix than drawing from scratch). Secondary columns: ``fix_no_fragments``
counts the same with ground-truth pieces under 20 px (nuclei lying almost wholly in the next tile, 2-9 px of
them inside this one) as "don't care" regions; ``fix_no_border`` with the image's last row and column as "don't
care" (the mask leaves them unlabelled: 0 of the last column's pixels and 8 of the last row's are labelled,
against 12 and 80 one pixel further in, where the image is as bright; a defect of the ground truth, not a
convention a network can learn from tiles); ``fix_dont_care`` with both. The target is judged on ``fix_rate``.

One training run of an ensemble of ``K`` members (member ``k`` uses seed ``seed + k``) gives every row:
each member alone (= ``K`` single-model runs with different seeds) and the ensemble's mean probabilities,
with test-time flips (the default) and without, and, as an ablation, the same maps separated by the
2-map rule (boundary + distance transform) instead of the centre map's peaks. Training time is
wall-clock on this machine's CPU (shared: see ``cpu_load_*`` in the JSON).

Run: ``python bench/pretrain.py [--seed 0] [--ensemble 3] [--epochs 700] [--crop 96] [--maps 3]
[--encoder efficientnet-lite0|none]``;
writes ``bench/results/pretrain.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import tifffile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_json  # noqa: E402

from colabel.services.nuclei import match_instances, segment_nuclei  # noqa: E402
from colabel.services.training.segmenter_training import (  # noqa: E402
    TrainedSegmenter,
    probabilities_to_labels,
    train_segmenter,
)
from colabel.services.training.unet import ENCODERS  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "colabel" / "data"
TRAIN_TILES = (0, 3, 5, 10, 12, 15)  # spread over the image: corners and the middle
FRAGMENT_PX = 20  # the segmenter's min_size: a piece of a nucleus cut by a tile edge this small cannot be matched


def tiles(image: np.ndarray, mask: np.ndarray, size: int = 128) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for r in range(0, image.shape[0], size):
        for c in range(0, image.shape[1], size):
            out.append((image[r:r + size, c:c + size], mask[r:r + size, c:c + size]))
    return out


def tile_borders(shape: tuple[int, int], size: int = 128) -> list[tuple[bool, bool]]:
    """Per tile of ``tiles`` (same order): whether it holds the image's last row, and its last column."""
    return [(r + size >= shape[0], c + size >= shape[1]) for r in range(0, shape[0], size)
            for c in range(0, shape[1], size)]


def fix_rate(pairs: list[tuple[np.ndarray, np.ndarray]], borders: list[tuple[bool, bool]] | None = None) -> dict:
    """Objects to fix over ``(ground truth, prediction)`` label pairs, plus secondary figures: the same count with
    ground-truth fragments smaller than ``FRAGMENT_PX`` ignored (``fix_rate_no_fragments``), with the image's
    unlabelled last row / column ignored where ``borders[i]`` says pair ``i`` holds it (``fix_rate_no_border``),
    and with both (``fix_rate_dont_care``)."""
    borders = borders or [(False, False)] * len(pairs)
    tp, fp, fn = _counts(pairs)
    out = {"tp": tp, "fp": fp, "fn": fn, "gt": tp + fn, "fix_rate": (fp + fn) / (tp + fn),
           "f1": 2 * tp / max(2 * tp + fp + fn, 1)}
    no_border = [_without_border(gt, pred, *b) for (gt, pred), b in zip(pairs, borders, strict=True)]
    for name, kept in (("no_fragments", [_without_fragments(gt, pred) for gt, pred in pairs]),
                       ("no_border", no_border),
                       ("dont_care", [_without_fragments(gt, pred) for gt, pred in no_border])):
        k_tp, k_fp, k_fn = _counts(kept)
        out[f"gt_{name}"] = k_tp + k_fn
        out[f"fix_rate_{name}"] = (k_fp + k_fn) / max(k_tp + k_fn, 1)
    return out


def _counts(pairs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[int, int, int]:
    """Summed (TP, FP, FN) at IoU 0.5 over label pairs."""
    counts = [match_instances(gt, pred, iou=0.5) for gt, pred in pairs]
    return tuple(sum(c[i] for c in counts) for i in range(3))


def _without_border(gt: np.ndarray, pred: np.ndarray, last_row: bool, last_col: bool) -> tuple[np.ndarray, np.ndarray]:
    """The image's last row and / or column (which the DSB2018 mask leaves unlabelled) removed from both."""
    gt, pred = gt.copy(), pred.copy()
    for flag, index in ((last_row, np.s_[-1, :]), (last_col, np.s_[:, -1])):
        if flag:
            gt[index] = 0
            pred[index] = 0
    return gt, pred


def _without_fragments(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ground-truth objects under ``FRAGMENT_PX`` pixels become "don't care": removed, and so are predicted objects
    lying mostly (> 50 % of their pixels) on them."""
    sizes = np.bincount(gt.ravel())
    tiny = (sizes < FRAGMENT_PX) & (sizes > 0)
    tiny[0] = False
    ignore = tiny[gt]
    pred = pred.copy()
    if ignore.any() and pred.any():
        on = np.bincount(pred[ignore].ravel(), minlength=int(pred.max()) + 1)
        total = np.bincount(pred.ravel(), minlength=int(pred.max()) + 1)
        drop = on > total / 2
        drop[0] = False
        pred[drop[pred]] = 0
    return np.where(ignore, 0, gt), pred


def evaluate(model, test, borders, *, members: list[int], tta: bool, rule: str) -> dict:
    """Fix rate of the mean probabilities of ``members`` of ``model`` on the ``test`` tiles (``borders``: see
    ``tile_borders``)."""
    cfg = model.config
    pairs, start = [], time.perf_counter()
    for im, m in test:
        p = model.predict_probabilities(im, tta=tta)[members].mean(axis=0)
        centre = p[2] if rule == "centre" and len(p) > 2 else None
        pairs.append((m, probabilities_to_labels(p[0], p[1], centre, threshold=cfg["threshold"],
                                                 min_size=cfg["min_size"], centre_h=cfg["centre_h"])))
    return {**fix_rate(pairs, borders), "predict_seconds_per_tile": (time.perf_counter() - start) / len(test)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ensemble", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=700)
    parser.add_argument("--crop", type=int, default=96)
    parser.add_argument("--maps", type=int, default=3, choices=(2, 3))
    parser.add_argument("--encoder", default="efficientnet-lite0", choices=ENCODERS,
                        help="efficientnet-lite0: ImageNet-pretrained encoder (default); none: plain U-Net")
    parser.add_argument("--model", default=None, metavar="PATH",
                        help="reuse the ensemble saved at PATH (no training; its own settings apply), or train "
                        "and save it there")
    args = parser.parse_args()

    image = tifffile.imread(DATA / "dsb2018_nuclei.tif")
    mask = tifffile.imread(DATA / "dsb2018_nuclei_mask.tif")
    all_tiles = tiles(image, mask)
    train = [all_tiles[i] for i in TRAIN_TILES]
    test = [t for i, t in enumerate(all_tiles) if i not in TRAIN_TILES]
    borders = [b for i, b in enumerate(tile_borders(image.shape)) if i not in TRAIN_TILES]
    n_train_objects = sum(len(np.unique(m[m > 0])) for _, m in train)

    rows, results = [], {"train_tiles": list(TRAIN_TILES), "tile_px": 128, "n_test_tiles": len(test),
                         "n_train_objects": n_train_objects, "epochs": args.epochs, "crop": args.crop,
                         "ensemble": args.ensemble, "seed": args.seed, "maps": args.maps, "encoder": args.encoder,
                         "cpu_load_before": os.getloadavg()[0]}
    scratch = fix_rate([(m, np.zeros_like(m)) for _, m in test], borders)
    rows.append({"method": "from scratch (draw all)", **_row(scratch), "train_s": "-"})
    results["from_scratch"] = scratch

    start = time.perf_counter()
    classical = fix_rate([(m, segment_nuclei(im).labels) for im, m in test], borders)
    classical["seconds"] = time.perf_counter() - start
    rows.append({"method": "classical segment_nuclei", **_row(classical), "train_s": "-"})
    results["classical"] = classical

    if args.model and Path(args.model).exists():
        model = TrainedSegmenter.load(args.model)
        cfg = model.config
        args.epochs, args.crop, args.seed, args.maps = cfg["epochs"], cfg["crop"], cfg["seed"], cfg["out_channels"]
        args.encoder = model.encoder
        args.ensemble = len(model.state_dicts)
        results.update({"epochs": args.epochs, "crop": args.crop, "ensemble": args.ensemble, "seed": args.seed,
                         "maps": args.maps, "encoder": args.encoder, "model": str(args.model)})
        print(f"reusing {args.model} (trained in {model.metrics['train_seconds']:.0f} s)", flush=True)
    else:
        model = train_segmenter([im for im, _ in train], [m for _, m in train], epochs=args.epochs,
                                crop=args.crop, seed=args.seed, ensemble=args.ensemble, maps=args.maps,
                                encoder=args.encoder, progress=False)
        if args.model:
            model.save(args.model)
    train_s = model.metrics["train_seconds"]
    results.update({"cpu_load_after": os.getloadavg()[0], "train_seconds": train_s,
                    "train_seconds_per_member": train_s / args.ensemble, "steps_per_member": model.config["steps"],
                    "final_loss": model.metrics["final_loss"]})
    rule = "centre" if args.maps == 3 else "boundary"
    net_name = "U-Net" if args.encoder == "none" else "EffNet-U-Net"
    runs = []
    for k in range(args.ensemble):
        run = {"seed": args.seed + k, **evaluate(model, test, borders, members=[k], tta=True, rule=rule)}
        runs.append(run)
        rows.append({"method": f"{net_name} seed {args.seed + k}, flips", **_row(run),
                     "train_s": f"{train_s / args.ensemble:.0f}"})
        print(f"seed {args.seed + k}: fix-rate {run['fix_rate']:.3f}", flush=True)
    results["single_runs"] = runs
    rates = [r["fix_rate"] for r in runs]
    results["single_fix_rate_mean"] = float(np.mean(rates))
    results["single_fix_rate_max"] = float(np.max(rates))
    rows.append({"method": f"{net_name} single, mean of {len(runs)}", "fix_rate": f"{np.mean(rates):.1%}",
                 "reduction": f"{1 - np.mean(rates):.1%}", "train_s": f"{train_s / args.ensemble:.0f}"})
    variants = {"ensemble_flips": ("flips", True, rule), "ensemble_no_flips": ("no flips", False, rule)}
    if args.maps == 3:
        variants["ensemble_flips_2map_rule"] = ("flips, 2-map rule", True, "boundary")
    for key, (label, tta, how) in variants.items():
        result = evaluate(model, test, borders, members=list(range(args.ensemble)), tta=tta, rule=how)
        results[key] = result
        rows.append({"method": f"{net_name} ensemble K={args.ensemble}, {label}", **_row(result),
                     "train_s": f"{train_s:.0f}"})
    results["ensemble_fix_rate"] = results["ensemble_flips"]["fix_rate"]
    results["target_fix_rate"] = 0.10
    results["target_met_ensemble"] = bool(results["ensemble_fix_rate"] <= 0.10)
    columns = ["method", "gt", "tp", "fp", "fn", "f1", "fix_rate", "reduction", "fix_no_fragments", "fix_no_border",
               "fix_dont_care", "train_s"]
    print_table(f"Objects to fix on {len(test)} held-out DSB2018 tiles (IoU 0.5), trained on "
                f"{len(train)} tiles / {n_train_objects} objects", rows, columns)
    print(f"\nwrote {write_json(Path(__file__).parent / 'results' / 'pretrain.json', results)}")


def _row(r: dict) -> dict:
    return {"gt": r["gt"], "tp": r["tp"], "fp": r["fp"], "fn": r["fn"], "f1": f"{r['f1']:.3f}",
            "fix_rate": f"{r['fix_rate']:.1%}", "reduction": f"{1 - r['fix_rate']:.1%}",
            "fix_no_fragments": f"{r['fix_rate_no_fragments']:.1%}", "fix_no_border": f"{r['fix_rate_no_border']:.1%}",
            "fix_dont_care": f"{r['fix_rate_dont_care']:.1%}"}


if __name__ == "__main__":
    main()
