"""200 small fits of one bottleneck top (300 rows, 20 epochs each) through the engine's small-fit
function, on a pool of 2 one-CPU workers on a local cluster of 2 CPUs; target <= 120 s.

Rows: real bottleneck features when a store path is given (--store, --dataset), otherwise
generated rows of the same width (EfficientNet-Lite0's 1280). Each fit trains on 240 rows
and predicts the other 60 (a different random split each). Baseline, in the same run: the same
fits the way a job trains (tf-keras ``model.fit`` on a model built and compiled per fit, the
settings wf gives itself: oneDNN, threads), on a sample of the fits, in this process.

Usage: python benchmarks/small_fits.py [--fits 200] [--baseline-fits 10]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _rows(rows: int, width: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(rows) % 2
    x = np.maximum(rng.normal(size=(rows, width)), 0).astype(np.float32)  # relu-like features
    x[:, :64] += 0.8 * y[:, None]
    return x, y


def _splits(rows: int, fits: int, seed: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(fits):
        order = rng.permutation(rows)
        out.append((order[: rows * 4 // 5], order[rows * 4 // 5 :]))
    return out


def keras_way(x: np.ndarray, y: np.ndarray, splits: list, epochs: int) -> float:
    """Seconds per fit: build, compile and ``fit`` a fresh tf-keras top each time."""
    import tf_keras

    from tasks.heads import build_top, loss_name
    from tasks.methods import Recipe
    from tasks.training.worker import set_threads

    set_threads(1)
    recipe = Recipe(epochs=epochs)
    started = time.perf_counter()
    for train, held in splits:
        model = build_top(tf_keras, (x.shape[1],), 2)
        model.compile(recipe.optimizer_for(tf_keras), loss_name(2))
        model.fit(x[train], y[train], batch_size=recipe.batch_size, epochs=epochs, verbose=0)
        model.predict(x[held], verbose=0)
    return (time.perf_counter() - started) / len(splits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fits", type=int, default=200)
    parser.add_argument("--rows", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--baseline-fits", type=int, default=10)
    args = parser.parse_args()
    from machine import banner, describe

    from tasks.methods import Recipe
    from tasks.training.engine import TrainingPool
    from tasks.training.small_fits import FitProblem, out_of_sample_probabilities
    from workflows.cluster import ray_cluster
    from workflows.settings import ClusterSettings

    x, y = _rows(args.rows, 1280)
    problem = FitProblem(x, y, 2, recipe=Recipe(epochs=args.epochs))
    splits = _splits(args.rows, args.fits)
    with ray_cluster(ClusterSettings(num_cpus=2)):
        started = time.perf_counter()
        with TrainingPool(2) as pool:
            pool_up = time.perf_counter()
            found = out_of_sample_probabilities(problem, splits, pool)
        total = time.perf_counter() - started
    fits_s = total - (pool_up - started)
    held = [y[h] for _, h in splits]
    accuracy = float(np.mean([(p.argmax(1) == t).mean() for p, t in zip(found, held, strict=True)]))
    baseline = keras_way(x, y, splits[: args.baseline_fits], args.epochs)
    print(banner())
    print(f"\n{args.fits} fits of a bottleneck top, {args.rows} rows, {args.epochs} epochs, 2 CPUs")
    print(f"{'way':<44} {'s per fit':>10} {'200 fits s':>11}")
    print(
        f"{'wf small fits (2 pool workers), total':<44} {total / args.fits:>10.3f} {total:>11.1f}"
    )
    print(f"{'  (workers start, importing TensorFlow, inside it)':<44}")
    print(f"{'keras model.fit per fit (1 process, 1 CPU)':<44} {baseline:>10.3f} "
          f"{baseline * args.fits / 2:>11.1f}  (two at a time)")  # fmt: skip
    print(f"mean held-out accuracy {accuracy:.3f}; target: 200 fits <= 120 s")
    out = HERE / "results" / "small_fits.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"fits": args.fits, "total_s": round(total, 1),
                               "pool_start_s": round(pool_up - started, 1),
                               "fits_s": round(fits_s, 1), "keras_s_per_fit": round(baseline, 3),
                               "accuracy": accuracy, "machine": describe()}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
