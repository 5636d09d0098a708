"""How long `wf suggest`'s batch choice takes on a large pool, against the same rule with each
pick's distances updated over the whole pool (the first version of the rule, 7eeb791).

Synthetic unit embeddings (1,280 floats, EfficientNet-Lite0's bottleneck size; 50 clusters),
2,000 labelled images, random margins. Both ways choose the same batch (checked); the table
prints seconds for each pool size and budget, best of ``--repeats``.

Usage: python benchmarks/suggest_speed.py [--pools 20000,100000] [--budgets 100,1000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def eager(pool, labelled, scores, budget):
    """The rule with the distance of every image updated after every pick."""
    from tasks.abstention import nearest_distance
    from workflows.label.suggest import NEAR_FLOOR, _near_limit, redundancy_radius

    n = len(pool)
    budget = min(budget, n)
    near = max(_near_limit(pool, labelled), NEAR_FLOOR)
    radius = max(near, redundancy_radius(pool, near))
    distance = nearest_distance(pool, labelled, k=1)
    taken, chosen = np.zeros(n, bool), []
    for limit in (radius, near):
        for i in np.argsort(-scores, kind="stable"):
            if len(chosen) == budget:
                return chosen
            if taken[i] or distance[i] <= limit:
                continue
            taken[i] = True
            chosen.append(int(i))
            distance = np.minimum(distance, 1.0 - pool @ pool[i])
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pools", default="20000,100000")
    parser.add_argument("--budgets", default="100,1000")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    from benchmarks.machine import banner
    from tasks.audit import normalise
    from workflows.label.suggest import choose_batch

    print(banner())
    print("| pool | budget | eager update s | wf s | speed-up | same batch |")
    print("|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(50, 1280)).astype(np.float32)

    def images(n: int) -> np.ndarray:
        noise = 1.5 * rng.normal(size=(n, 1280)).astype(np.float32)
        return normalise(centres[rng.integers(0, 50, n)] + noise)

    labelled = images(2000)
    for n in (int(p) for p in args.pools.split(",")):
        pool, scores = images(n), rng.uniform(size=n)
        for budget in (int(b) for b in args.budgets.split(",")):
            took = {}
            for name, way in (("eager", eager), ("wf", lambda *a: choose_batch(*a)[0])):
                best = float("inf")
                for _ in range(args.repeats):
                    began = time.perf_counter()
                    took[name + "_batch"] = way(pool, labelled, scores, budget)
                    best = min(best, time.perf_counter() - began)
                took[name] = best
            same = took["eager_batch"] == took["wf_batch"]
            print(f"| {n:,} | {budget} | {took['eager']:.1f} | {took['wf']:.1f} | "
                  f"{took['eager'] / took['wf']:.1f}x | {same} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
