"""What to label next: wf suggest's batches against random and uncertainty-only batches, and
the prototype method against the dense top on a few images per class.

Simulated labelling on the real datasets of ``../shared/datasets`` (cats_vs_dogs, flowers),
from their stored EfficientNet-Lite0 bottleneck features (the store of
``benchmarks/honest_numbers.py``: train, validation and test halves, ``--augment 0``; extracted
here when it is missing). Start with 5% of the training images labelled (stratified), the rest
as the unlabelled pool; each round label a batch of 5% of the pool's first size with its true
labels, and retrain the bottleneck top (the blog's recipe: 50 epochs, batch 16, the same small
fit `wf train-all --cv` runs); stop at 50%. Accuracy on the held-out images (the original
validation folder: validation + test halves) after every round, three ways of choosing:

- ``random``: a uniform draw from the pool;
- ``uncertainty``: the smallest margins between the two most probable classes (modAL's
  ``margin_sampling``);
- ``wf``: `wf suggest`'s choice (``workflows.label.suggest.choose_batch``): least sure first,
  passing over an image within the pool's own spacing of one labelled or chosen, near
  duplicates left out.

Three seeds (the starting 5%, the random draws, the fits' initial weights). Then the prototype
method against the dense top with 1 to 50 training images per class (three draws).
Probabilities are the fits' own (no temperature): the margin's order is what matters here.

Usage: python benchmarks/label_next.py [--seeds 3] [--first-seed 0] [--work /tmp/wf-honest]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
DATASETS = ("cats_vs_dogs", "flowers")
SHOTS = (1, 2, 3, 5, 10, 20, 50)  # training images per class, for prototype against bottleneck


def stored(store: str, dataset: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Copy-0 bottleneck rows and labels of each split: train, and held (validation + test)."""
    from storage.feature_store import FeatureStore

    found = FeatureStore.open(store, dataset, "efficientnet_lite0")
    splits = [s for s in ("train", "validation", "test") if found.has_split(s)]
    rows = {s: found.read_numpy(s, "bottleneck", copies=False) for s in splits}
    held = [rows[s] for s in ("validation", "test") if s in rows]
    together = (np.concatenate([h[0] for h in held]), np.concatenate([h[1] for h in held]))
    return {"train": rows["train"], "held": together}


def stratified(y: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    picked = []
    for label in np.unique(y):
        members = np.flatnonzero(y == label)
        picked.extend(rng.choice(members, max(1, round(fraction * len(members))), replace=False))
    return np.array(sorted(picked))


def random_batch(c: dict) -> np.ndarray:
    """A uniform draw from the pool."""
    return c["rng"].choice(len(c["pool"]), min(c["batch"], len(c["pool"])), replace=False)


def uncertainty_batch(c: dict) -> np.ndarray:
    """The smallest margins (modAL's ``margin_sampling``)."""
    return np.argsort(-c["scores"], kind="stable")[: c["batch"]]


def wf_batch(c: dict) -> np.ndarray:
    """`wf suggest`'s choice."""
    from workflows.label.suggest import choose_batch

    return np.asarray(choose_batch(c["pool"], c["labelled"], c["scores"], c["batch"])[0])


STRATEGIES: dict[str, Callable[[dict], np.ndarray]] = {
    "random": random_batch,
    "uncertainty": uncertainty_batch,
    "wf": wf_batch,
}


def simulate(x, y, held_x, held_y, choose: Callable[[dict], np.ndarray], seed: int,
             num_classes: int, measure: Callable | None = None,
             ) -> list[tuple[float, Any]]:  # fmt: skip
    """``(labelled share, held-out accuracy)`` at the start and after every round (or, with
    ``measure(held_probs, labelled)``, what it returns instead of the accuracy).

    ``choose(context)`` returns the positions in the pool to label this round, ``batch``
    different ones (or the whole pool when it is smaller); ``context`` holds ``pool`` and
    ``labelled`` (unit embeddings), the fit's ``probs`` of the pool, their ``scores`` (``1 -
    margin``), ``predicted``, ``classes``, ``batch``, the ``seed`` and its ``rng`` (which drew the
    start), ``refit(seed)`` (the pool's probabilities from the same fit begun from other initial
    weights), and the round's fitted ``model`` with the pool's bottleneck ``rows``."""
    from tasks.audit import normalise
    from tasks.training.small_fits import FitProblem, fit_and_predict
    from workflows.label.suggest import margin_scores

    rng = np.random.default_rng(seed)
    n = len(y)
    labelled = stratified(y, 0.05, rng)
    batch = round(0.05 * (n - len(labelled)))
    every = np.concatenate([x, held_x]).astype(np.float32)
    problem = FitProblem(every, np.concatenate([y, held_y]), num_classes, "bottleneck", seed=seed)
    unit, cache, out = normalise(x.reshape(n, -1)), {}, []
    while True:
        pool = np.setdiff1d(np.arange(n), labelled)
        asked = np.concatenate([pool, n + np.arange(len(held_y))])
        probs = fit_and_predict(problem, labelled, asked, cache)
        held = probs[len(pool) :]
        found = measure(held, labelled) if measure else float((held.argmax(1) == held_y).mean())
        out.append((len(labelled) / n, found))
        if len(labelled) / n >= 0.5 - 1e-9 or len(pool) == 0:
            return out
        mine = probs[: len(pool)]

        def refit(other: int, labelled=labelled, pool=pool) -> np.ndarray:
            """The pool's probabilities under the same fit from initial weights ``other``."""
            again = FitProblem(problem.x, problem.y, num_classes, "bottleneck", seed=other)
            return fit_and_predict(again, labelled, pool, cache)

        context = {"pool": unit[pool], "labelled": unit[labelled], "probs": mine,
                   "scores": margin_scores(mine), "predicted": mine.argmax(1),
                   "classes": num_classes, "batch": batch, "rng": rng, "seed": seed,
                   "refit": refit, "model": cache[problem.key].model,
                   "rows": problem.x[pool]}  # fmt: skip
        chosen = np.asarray(choose(context), np.int64)
        if len(set(chosen.tolist())) != len(chosen) or len(chosen) != min(batch, len(pool)):
            raise RuntimeError(f"chose {len(chosen)} images, not {batch} different ones")
        labelled = np.sort(np.concatenate([labelled, pool[chosen]]))


def full_accuracy(x, y, held_x, held_y, seed: int, num_classes: int) -> float:
    from tasks.training.small_fits import FitProblem, fit_and_predict

    every = np.concatenate([x, held_x]).astype(np.float32)
    problem = FitProblem(every, np.concatenate([y, held_y]), num_classes, "bottleneck", seed=seed)
    probs = fit_and_predict(problem, np.arange(len(y)), len(y) + np.arange(len(held_y)))
    return float((probs.argmax(1) == held_y).mean())


def few_shot(x, y, held_x, held_y, per_class: int, seed: int, num_classes: int) -> dict:
    from tasks.training.small_fits import FitProblem, fit_and_predict

    rng = np.random.default_rng(seed)
    train = np.concatenate([rng.choice(np.flatnonzero(y == c), per_class, replace=False)
                            for c in range(num_classes)])  # fmt: skip
    every = np.concatenate([x, held_x]).astype(np.float32)
    labels = np.concatenate([y, held_y])
    held = len(y) + np.arange(len(held_y))
    found = {}
    for method in ("bottleneck", "prototype"):
        problem = FitProblem(every, labels, num_classes, method, seed=seed)
        found[method] = float((fit_and_predict(problem, train, held).argmax(1) == held_y).mean())
    return found


def plot(curves: dict, full: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 4))
    for axis, (name, by_strategy) in zip(np.atleast_1d(axes), curves.items(), strict=True):
        for strategy, runs in by_strategy.items():
            share = [s for s, _ in runs[0]]
            mean = np.mean([[a for _, a in run] for run in runs], axis=0)
            axis.plot([100 * s for s in share], mean, marker="o", ms=3, label=strategy)
        axis.axhline(full[name], color="grey", ls="--", label="all labels")
        axis.set_title(name)
        axis.set_xlabel("% of training images labelled")
        axis.set_ylabel("held-out accuracy (mean of seeds)")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def prepare(work_dir: str, shared: str, datasets: str) -> tuple[Path, list[str]]:
    """Print the machine, lay the datasets out in ``work_dir/data`` (train, validation and
    test halves) and extract their store (``work_dir/store``, copy 0 only) if it is missing."""
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    from benchmarks.honest_numbers import split_folders
    from benchmarks.machine import banner
    from workflows.extract.run import run_extract
    from workflows.extract.settings import DatasetSource, ExtractSettings

    print(banner())
    work, names = Path(work_dir), datasets.split(",")
    for name in names:
        split_folders(Path(shared) / name, work / "data" / name)
    sources = tuple(DatasetSource(str(work / "data" / n)) for n in names)
    run_extract(ExtractSettings(datasets=sources, store=str(work / "store"), augment=0))
    return work, names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0,
                        help="seeds first-seed .. first-seed + seeds - 1 (fresh ones to confirm "
                             "a design chosen on others)")  # fmt: skip
    parser.add_argument("--work", default="/tmp/wf-honest")
    parser.add_argument("--shared", default=str(HERE.parent.parent / "shared" / "datasets"))
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--plot", default=str(HERE.parent / "docs" / "images" / "label_next.png"))
    parser.add_argument("--parts", default="curves,few-shot", help="curves, few-shot or both")
    args = parser.parse_args()
    work, names = prepare(args.work, args.shared, args.datasets)
    parts = set(args.parts.split(","))
    curves, full = {}, {}
    for name in names:
        data = stored(str(work / "store"), name)
        (x, y), (hx, hy) = data["train"], data["held"]
        k = int(max(y.max(), hy.max()) + 1)
        print(f"\n{name}: {len(y)} training images, {len(hy)} held out, {k} classes")
        if "curves" in parts:
            began = time.perf_counter()
            seeds = range(args.first_seed, args.first_seed + args.seeds)
            curves[name] = {s: [simulate(x, y, hx, hy, choose, seed, k) for seed in seeds]
                            for s, choose in STRATEGIES.items()}  # fmt: skip
            full[name] = float(np.mean([full_accuracy(x, y, hx, hy, s, k) for s in seeds]))
            print(f"accuracy with all {len(y)} labels: {full[name]:.4f} (mean of {args.seeds} "
                  f"seeds); {time.perf_counter() - began:.0f} s")  # fmt: skip
            report_curves(curves[name], full[name])
        if "few-shot" in parts:
            print("\n| per class | bottleneck | prototype | prototype - bottleneck |")
            print("|---|---|---|---|")
            for n in SHOTS:
                found = [
                    few_shot(x, y, hx, hy, n, s, k)
                    for s in range(args.first_seed, args.first_seed + args.seeds)
                ]
                b = np.mean([f["bottleneck"] for f in found])
                p = np.mean([f["prototype"] for f in found])
                print(f"| {n} | {b:.4f} | {p:.4f} | {p - b:+.4f} |", flush=True)
    if curves:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        plot(curves, full, Path(args.plot))
        print(f"\nplot: {args.plot}")


def report_curves(curves: dict[str, list], full: float) -> None:
    """The round-by-round table (means of seeds; each gap ± its paired standard error over the
    seeds) and how wf compares."""
    print("| labelled | random | uncertainty | wf | wf - random | wf - uncertainty |")
    print("|---|---|---|---|---|---|")
    runs_of = {s: np.array([[a for _, a in run] for run in runs]) for s, runs in curves.items()}
    means = {s: runs.mean(axis=0) for s, runs in runs_of.items()}
    shares = [s for s, _ in curves["wf"][0]]

    def paired(other: str) -> tuple[np.ndarray, np.ndarray]:
        """wf's accuracy less ``other``'s, seed by seed: the mean and its standard error."""
        gaps = runs_of["wf"] - runs_of[other]
        seeds = len(gaps)
        error = gaps.std(axis=0, ddof=1) / np.sqrt(seeds) if seeds > 1 else np.nan * gaps[0]
        return gaps.mean(axis=0), error

    (to_random, random_se), (to_uncertainty, uncertainty_se) = (
        paired("random"),
        paired("uncertainty"),
    )
    for i, share in enumerate(shares):
        r, u, w = means["random"][i], means["uncertainty"][i], means["wf"][i]
        cells = (f"{100 * share:.0f}%", f"{r:.4f}", f"{u:.4f}", f"{w:.4f}",
                 f"{to_random[i]:+.4f} ± {random_se[i]:.4f}",
                 f"{to_uncertainty[i]:+.4f} ± {uncertainty_se[i]:.4f}")  # fmt: skip
        print(f"| {' | '.join(cells)} |")
    later = range(1, len(shares))  # the start is the same 5% for all three
    for other in ("random", "uncertainty"):  # each seed's mean over the rounds after the start
        gaps = (runs_of["wf"][:, 1:] - runs_of[other][:, 1:]).mean(axis=1)
        error = gaps.std(ddof=1) / np.sqrt(len(gaps)) if len(gaps) > 1 else float("nan")
        print(f"wf - {other} over the rounds (mean of seeds ± its standard error, paired): "
              f"{gaps.mean():+.4f} ± {error:.4f}; seeds where wf is ahead: "
              f"{int((gaps > 0).sum())}/{len(gaps)}")  # fmt: skip
    above_random = sum(means["wf"][i] > means["random"][i] for i in later)
    above_uncertainty = sum(means["wf"][i] > means["uncertainty"][i] for i in later)
    reached = [shares[i] for i in range(len(shares)) if means["wf"][i] >= full - 1e-9]
    when = f"{100 * reached[0]:.0f}% labelled" if reached else "no round"
    print(f"wf above random at {above_random}/{len(later)} rounds, above uncertainty at "
          f"{above_uncertainty}/{len(later)}; all labels' accuracy ({full:.4f}) reached at "
          f"{when}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
