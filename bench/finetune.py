"""The second round of pre-annotation: fine-tune the first round's network, or train a new one?

``bench/pretrain.py``'s set-up (the DSB2018 image in 16 tiles of 128 px; round 1 trained on 6 tiles). In round 2
the annotators have corrected 3 more tiles (``ROUND2``: 3 of the former evaluation tiles, spread over the
image), so 9 tiles are labelled and the other 7 (70 objects) are left to pre-annotate. For each seed:

* **round 1**: the network of round 1 (6 tiles, 700 epochs = 2100 steps), as it is;
* **round 2, new**: a network trained on the 9 tiles from the ImageNet weights, 700 epochs (3500 steps);
* **round 2, fine-tuned**: the round-1 network trained further on the 9 tiles (``train_segmenter(init=...)``,
  ``colabel train --init``), ``--finetune-epochs`` (default 140 = 700 steps).

Objects to fix as in ``bench/pretrain.py`` (FN + FP at IoU 0.5 over ground-truth objects; each tile predicted
on its own with flips; ``fix_no_border`` sets the mask's unlabelled last row / column aside). Training seconds
are wall-clock on this machine's CPU; the ratio is the fine-tuning's time over the new network's, in the
same process.

Run: ``python bench/finetune.py [--seeds 0 1] [--round1 PATH]`` (``PATH``: an ensemble saved by
``bench/pretrain.py --model PATH``, whose member ``k`` is seed ``k``'s round-1 network; trained here otherwise);
writes ``bench/results/finetune.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import tifffile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_json  # noqa: E402
from pretrain import DATA, TRAIN_TILES, evaluate, tile_borders, tiles  # noqa: E402

from colabel.services.training.segmenter_training import TrainedSegmenter, train_segmenter  # noqa: E402

ROUND2 = (6, 9, 13)  # tiles corrected in round 2: one per row of the image but the first, none beside another


def member(model: TrainedSegmenter, k: int) -> TrainedSegmenter:
    return TrainedSegmenter(config={**model.config, "ensemble": 1}, state_dicts=[model.state_dicts[k]],
                            training_set_version=model.training_set_version, metrics=model.metrics)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=700, help="round 1 and the new round-2 network")
    parser.add_argument("--finetune-epochs", type=int, default=140)
    parser.add_argument("--round1", default=None, metavar="PATH",
                        help="an ensemble saved by bench/pretrain.py --model PATH (member k = seed k)")
    args = parser.parse_args()

    image = tifffile.imread(DATA / "dsb2018_nuclei.tif")
    mask = tifffile.imread(DATA / "dsb2018_nuclei_mask.tif")
    all_tiles, borders = tiles(image, mask), tile_borders(image.shape)
    first = [all_tiles[i] for i in TRAIN_TILES]
    second = [all_tiles[i] for i in (*TRAIN_TILES, *ROUND2)]
    rest = [i for i in range(len(all_tiles)) if i not in TRAIN_TILES and i not in ROUND2]
    test, test_borders = [all_tiles[i] for i in rest], [borders[i] for i in rest]
    saved = TrainedSegmenter.load(args.round1) if args.round1 else None

    def train(pairs, epochs, seed, init=None):
        start = time.perf_counter()
        model = train_segmenter([im for im, _ in pairs], [m for _, m in pairs], epochs=epochs, crop=96, seed=seed,
                                init=init, progress=False)
        return model, time.perf_counter() - start

    rows, runs = [], []
    for seed in args.seeds:
        if saved is not None and seed < len(saved.state_dicts):
            round1, round1_s = member(saved, seed), saved.metrics["train_seconds"] / len(saved.state_dicts)
        else:
            round1, round1_s = train(first, args.epochs, seed)
        new, new_s = train(second, args.epochs, seed + 100)
        tuned, tuned_s = train(second, args.finetune_epochs, seed + 100, init=round1)
        run = {"seed": seed}
        for name, model, seconds in (("round 1 (6 tiles)", round1, round1_s), ("round 2, new (9 tiles)", new, new_s),
                                     ("round 2, fine-tuned (9 tiles)", tuned, tuned_s)):
            scores = evaluate(model, test, test_borders, members=[0], tta=True, rule="centre")
            result = {**scores, "train_seconds": seconds, "steps": model.config["steps"]}
            run[name] = result
            rows.append({"method": f"{name}, seed {seed}", "gt": result["gt"], "tp": result["tp"],
                         "fp": result["fp"], "fn": result["fn"], "fix_rate": f"{result['fix_rate']:.1%}",
                         "fix_no_border": f"{result['fix_rate_no_border']:.1%}", "steps": result["steps"],
                         "train_s": f"{seconds:.0f}"})
            print(f"seed {seed} {name}: {result['fix_rate']:.3f} ({seconds:.0f} s)", flush=True)
        run["time_ratio_finetuned_over_new"] = tuned_s / new_s
        runs.append(run)
    summary = {name: float(np.median([r[name]["fix_rate"] for r in runs]))
               for name in ("round 1 (6 tiles)", "round 2, new (9 tiles)", "round 2, fine-tuned (9 tiles)")}
    ratio = float(np.median([r["time_ratio_finetuned_over_new"] for r in runs]))
    print_table(f"Objects to fix on the {len(test)} tiles left ({runs[0]['round 1 (6 tiles)']['gt']} objects) after "
                f"round 2 corrected tiles {list(ROUND2)}",
                rows, ["method", "gt", "tp", "fp", "fn", "fix_rate", "fix_no_border", "steps", "train_s"])
    print(f"\nmedian over seeds: {', '.join(f'{k} {v:.1%}' for k, v in summary.items())}; fine-tuning takes "
          f"{ratio:.2f}x the new network's training time")
    out = write_json(Path(__file__).parent / "results" / "finetune.json",
                     {"round2_tiles": list(ROUND2), "test_tiles": rest, "epochs": args.epochs,
                      "finetune_epochs": args.finetune_epochs, "runs": runs, "median_fix_rate": summary,
                      "median_time_ratio": ratio})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
