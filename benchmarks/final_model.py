"""The final model: trained on the training split (as `wf train-all` does), or on every
labelled image (train + validation) with the same epochs? Measured on a held-out test split.

The data are `benchmarks/honest_numbers.py`'s (its work folder: cats_vs_dogs and flowers from
``../shared/datasets``, half of each validation class held out as ``test``, the stores
extracted with ``--augment 0``); run that benchmark first. For each dataset and seed, the
bottleneck top (its recipe: 50 epochs, batch 16, RMSprop 1e-3) is fitted twice through the
engine's small fits, in this process (oneDNN on, as wf runs it): on the training split's rows,
and on the training and validation splits' rows; each scores the test split. Printed: each
way's test accuracy with its 95% interval, and McNemar's test between them on the same images.

Usage: python benchmarks/final_model.py [--work /tmp/wf-honest] [--seeds 5]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/wf-honest")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--datasets", default="cats_vs_dogs,flowers")
    args = parser.parse_args()
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    sys.path.insert(0, str(HERE.parent))
    sys.path.insert(0, str(HERE))
    from machine import banner

    from storage.errors import StoreError
    from storage.feature_store import FeatureStore
    from tasks.cross_validation import mcnemar
    from tasks.evaluation import accuracy_interval, format_accuracy
    from tasks.training.small_fits import FitProblem, fit_and_predict

    print(banner())
    print(f"\n{'dataset':<13} {'seed':>4} {'train only':>26} {'train + validation':>26} "
          f"{'only a':>6} {'only b':>6} {'p':>6}")  # fmt: skip
    totals: dict[str, list[tuple[int, int, int]]] = {}
    for dataset in args.datasets.split(","):
        try:
            store = FeatureStore.open(f"{args.work}/store", dataset, "efficientnet_lite0")
        except StoreError as error:
            sys.exit(f"{error}: run benchmarks/honest_numbers.py first")
        parts = {s: store.read_numpy(s, "bottleneck") for s in ("train", "validation", "test")}
        x = np.concatenate([parts[s][0] for s in parts]).astype(np.float32)
        y = np.concatenate([parts[s][1] for s in parts]).astype(np.int64)
        split = np.concatenate([[s] * len(parts[s][1]) for s in parts])
        train, labelled = np.flatnonzero(split == "train"), np.flatnonzero(split != "test")
        test = np.flatnonzero(split == "test")
        classes = len(store.manifest.classes)
        for seed in range(args.seeds):
            problem = FitProblem(x, y, classes, seed=seed)
            cache: dict = {}
            right_a = fit_and_predict(problem, train, test, cache).argmax(1) == y[test]
            right_b = fit_and_predict(problem, labelled, test, cache).argmax(1) == y[test]
            only_a, only_b, p = mcnemar(right_a, right_b)
            totals.setdefault(dataset, []).append((int(right_a.sum()), int(right_b.sum()),
                                                   len(test)))  # fmt: skip
            shown = [format_accuracy(float(r.mean()), accuracy_interval(int(r.sum()), len(r)),
                                     len(r)) for r in (right_a, right_b)]  # fmt: skip
            print(f"{dataset:<13} {seed:>4} {shown[0]:>26} {shown[1]:>26} {only_a:>6} "
                  f"{only_b:>6} {p:>6.3f}", flush=True)  # fmt: skip
    print()
    for dataset, rows in totals.items():
        a, b, n = (sum(r[i] for r in rows) for i in range(3))
        print(
            f"{dataset:<13} mean over {len(rows)} seeds: train only {a / n:.4f}, "
            f"train + validation {b / n:.4f} ({100 * (b - a) / n:+.2f} points)"
        )


if __name__ == "__main__":
    main()
