"""Batch designs for `wf suggest`, each against uncertainty alone, on the same seeds.

The simulation of ``benchmarks/label_next.py`` (start with 5% of the training labels, label 5%
of the pool a round, retrain the bottleneck top, stop at 50%), run for any of the designs below.
Prints, per dataset and design, the mean held-out accuracy over rounds 1-10 and its gap to
uncertainty alone paired seed by seed (mean ± standard error), the seeds and the rounds (of the
mean curve) where the design is ahead. Choose on some seeds, confirm on fresh ones
(``--first-seed``): with a dozen designs, the best of one set of seeds is partly luck.

Designs (``pool``: the unlabelled images' unit embeddings; margin: ``1 - (p1 - p2)``):

- ``uncertainty``: the smallest margins (modAL's ``margin_sampling``);
- ``wf``: `wf suggest` (``workflows.label.suggest.choose_batch``): least sure first, passing
  over an image within the pool's median nearest-neighbour distance of one labelled or chosen;
- ``radius-Q``: the same rule with the Q-quantile (0.4, 0.65) of those distances instead of
  the median; ``radius-quotas``: with the median, and at most ``budget / classes`` of each
  predicted class while others have candidates;
- ``badge``: BADGE (Ash et al., 2020): k-means++ seeding on gradient embeddings
  ``(p - onehot(argmax p)) x embedding``; ``badge-greedy``: farthest-first instead of
  sampling; ``badge-nodup``: near duplicates of labelled or picked images left out;
  ``badge-shortlist``: on the 3 x budget least sure only;
- ``kmeans``: diverse mini-batch (Zhdanov, 2019): the 10 x budget least sure, k-means weighted
  by margin into ``budget`` clusters, the image nearest each centre;
- ``cluster-margin``: Cluster-Margin (Citovsky et al., 2021): average-linkage clusters (cosine
  0.5) of the 10 x budget least sure, round robin from the smallest cluster, least sure first;
  ``cluster-margin-by-score``: clusters taken most uncertain first;
- ``clusters-B``: the B x budget least sure (B 3, 10) in ``budget`` average-linkage clusters,
  the least sure of each;
- ``ensemble-uncertainty``, ``ensemble-wf``: the margin of five fits' mean probabilities (the
  round's and four from other initial weights, on the same labels), then uncertainty alone or
  `wf suggest`'s rule; ``mc-uncertainty``, ``mc-wf``: the same from twenty passes of the
  round's fit with dropout on;
- ``density-uncertainty``, ``density-wf``, ``density2-wf``: information density (Settles and
  Craven, 2008): the margin's uncertainty times the image's typicality (its mean cosine
  similarity to its 10 nearest images, pool and labelled), to the power 1 (2 for
  ``density2``), then uncertainty alone or `wf suggest`'s rule; ``typical-wf``: the least
  typical 10% of the pool ranked after the rest (outliers that uncertainty picks and the model
  cannot learn: Karamcheti et al., 2021), then `wf suggest`'s rule.

``--prior-shift`` prints, per round instead, how far the labelled images' class shares drift
from the training set's under each design, and the held-out accuracy with the fit's class prior
moved back (the oracle prior: an upper bound on what correcting it can give).

Usage: python benchmarks/label_next_designs.py [--designs wf,badge] [--seeds 5] [--first-seed 0]
       [--prior-shift]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.label_next import (  # noqa: E402
    prepare,
    simulate,
    stored,
    uncertainty_batch,
    wf_batch,
)


def _margin_order(c: dict) -> np.ndarray:
    return np.argsort(-c["scores"], kind="stable")


def radius(c: dict, quantile: float = 0.5, quotas: bool = False) -> np.ndarray:
    pool, batch, k = c["pool"], c["batch"], c["classes"]
    similarity = pool @ pool.T
    np.fill_diagonal(similarity, -1)
    r = np.quantile(1 - similarity.max(1), quantile)
    known = 1 - (pool @ c["labelled"].T).max(1)
    quota, taken, chosen = -(-batch // k), np.zeros(k, int), []
    for capped in (True, False) if quotas else (False,):
        for i in _margin_order(c):
            if len(chosen) == batch:
                break
            if i in chosen or known[i] <= r or (capped and taken[c["predicted"][i]] >= quota):
                continue
            if chosen and (1 - pool[chosen] @ pool[i]).min() <= r:
                continue
            chosen.append(i)
            taken[c["predicted"][i]] += 1
    chosen += [i for i in _margin_order(c) if i not in chosen][: batch - len(chosen)]
    return np.array(chosen)


def badge(c: dict, greedy: bool = False, nodup: bool = False) -> np.ndarray:
    from workflows.label.suggest import _near_limit

    p, x = c["probs"], c["pool"]
    a = p.copy()
    a[np.arange(len(p)), p.argmax(1)] -= 1
    norm = (a * a).sum(1)  # the gradient embedding's squared length (x is unit length)
    allowed = np.ones(len(x), bool)
    if nodup:
        near = _near_limit(x, c["labelled"])
        allowed = (1 - (x @ c["labelled"].T).max(1)) > near
    rng = np.random.default_rng(0)
    chosen = [int(np.argmax(np.where(allowed, norm, -1.0)))]
    d2 = np.full(len(x), np.inf)
    while True:
        last = chosen[-1]
        d2 = np.maximum(np.minimum(d2, norm + norm[last] - 2 * (a @ a[last]) * (x @ x[last])), 0)
        if nodup:
            allowed &= (1 - x @ x[last]) > near
        weight = np.where(allowed, d2, 0.0)
        weight[chosen] = 0
        if len(chosen) == c["batch"]:
            return np.array(chosen)
        if weight.sum() <= 0:  # nothing apart from the picks: the least sure of the rest
            rest = [int(i) for i in _margin_order(c) if i not in chosen]
            return np.array(chosen + rest[: c["batch"] - len(chosen)])
        pick = np.argmax(weight) if greedy else rng.choice(len(x), p=weight / weight.sum())
        chosen.append(int(pick))


def badge_shortlist(c: dict, times: int = 3) -> np.ndarray:
    order = _margin_order(c)[: times * c["batch"]]
    return order[badge(dict(c, pool=c["pool"][order], probs=c["probs"][order]))]


def kmeans(c: dict, times: int = 10) -> np.ndarray:
    from sklearn.cluster import KMeans

    order = _margin_order(c)[: times * c["batch"]]
    x, weight = c["pool"][order], c["scores"][order]
    found = KMeans(c["batch"], n_init=1, random_state=0).fit(x, sample_weight=weight)
    chosen = []
    for centre in range(c["batch"]):
        members = np.flatnonzero(found.labels_ == centre)
        if len(members):
            gap = ((x[members] - found.cluster_centers_[centre]) ** 2).sum(1)
            chosen.append(order[members[np.argmin(gap)]])
    rest = [i for i in order if i not in chosen]  # an empty cluster: the least sure left
    return np.array(chosen + rest[: c["batch"] - len(chosen)])


def _clustered(c: dict, times: int, **clustering) -> list[list[int]]:
    """The ``times x budget`` least sure, in average-linkage (cosine) clusters, each least sure
    first."""
    from sklearn.cluster import AgglomerativeClustering

    order = _margin_order(c)[: times * c["batch"]]
    labels = AgglomerativeClustering(metric="cosine", linkage="average", **clustering)
    groups: dict[int, list[int]] = {}
    for i, label in zip(order, labels.fit(c["pool"][order]).labels_, strict=True):
        groups.setdefault(int(label), []).append(int(i))
    return list(groups.values())


def cluster_margin(c: dict, by_score: bool = False) -> np.ndarray:
    groups = _clustered(c, 10, n_clusters=None, distance_threshold=0.5)
    groups.sort(key=(lambda g: -c["scores"][g[0]]) if by_score else len)
    chosen: list[int] = []
    while len(chosen) < c["batch"] and any(groups):
        for group in groups:
            if group and len(chosen) < c["batch"]:
                chosen.append(group.pop(0))
    return np.array(chosen)


def clusters(c: dict, times: int) -> np.ndarray:
    return np.array([g[0] for g in _clustered(c, times, n_clusters=c["batch"])])


def _rescored(c: dict, probs: np.ndarray) -> dict:
    from workflows.label.suggest import margin_scores

    return dict(c, probs=probs, scores=margin_scores(probs), predicted=probs.argmax(1))


def ensemble(c: dict, members: int = 5) -> dict:
    """The round's fit and ``members - 1`` more from other initial weights, probabilities
    averaged (Lakshminarayanan et al., 2017; for active learning Beluch et al., 2018)."""
    seed = c["seed"]
    found = [c["probs"]] + [c["refit"](seed * 1000 + j) for j in range(1, members)]
    return _rescored(c, np.mean(found, axis=0))


def mc_dropout(c: dict, draws: int = 20) -> dict:
    """The round's fit with its dropout left on, ``draws`` passes averaged (Gal et al., 2017)."""
    from tasks.heads import probabilities

    found = [probabilities(c["model"](c["rows"], training=True).numpy(), c["classes"])
             for _ in range(draws)]  # fmt: skip
    return _rescored(c, np.mean(found, axis=0))


def _typicality(c: dict, k: int = 10) -> np.ndarray:
    """Each pool image's mean cosine similarity to its ``k`` nearest images, pool and labelled
    together (the audit's neighbours): high in the dense regions of the data, low for
    outliers."""
    from tasks.audit import nearest

    found = nearest(np.concatenate([c["pool"], c["labelled"]]), k)
    return found.similarity[: len(c["pool"])].mean(axis=1)


def density(c: dict, beta: float = 1.0) -> dict:
    """Information density (Settles and Craven, 2008): the margin's uncertainty weighted by
    typicality to the power ``beta``, so a confusing outlier ranks below a confusing image
    like many others."""
    typical = np.clip(_typicality(c), 1e-6, None)
    return dict(c, scores=c["scores"] * (typical / typical.max()) ** beta)


def skip_outliers(c: dict, share: float = 0.1) -> dict:
    """The least typical ``share`` of the pool ranked after everything else (in the spirit of
    Karamcheti et al., 2021: collective outliers are what uncertainty picks and cannot learn)."""
    typical = _typicality(c)
    outlier = typical < np.quantile(typical, share)
    return dict(c, scores=np.where(outlier, c["scores"] - 2.0, c["scores"]))


DESIGNS: dict[str, Callable[[dict], np.ndarray]] = {
    "uncertainty": uncertainty_batch,
    "wf": wf_batch,
    "radius-0.4": lambda c: radius(c, 0.4),
    "radius-0.65": lambda c: radius(c, 0.65),
    "radius-quotas": lambda c: radius(c, 0.5, quotas=True),
    "badge": badge,
    "badge-greedy": lambda c: badge(c, greedy=True),
    "badge-nodup": lambda c: badge(c, nodup=True),
    "badge-shortlist": badge_shortlist,
    "kmeans": kmeans,
    "cluster-margin": cluster_margin,
    "cluster-margin-by-score": lambda c: cluster_margin(c, by_score=True),
    "clusters-3": lambda c: clusters(c, 3),
    "clusters-10": lambda c: clusters(c, 10),
    "ensemble-uncertainty": lambda c: uncertainty_batch(ensemble(c)),
    "ensemble-wf": lambda c: wf_batch(ensemble(c)),
    "mc-uncertainty": lambda c: uncertainty_batch(mc_dropout(c)),
    "mc-wf": lambda c: wf_batch(mc_dropout(c)),
    "density-uncertainty": lambda c: uncertainty_batch(density(c)),
    "density-wf": lambda c: wf_batch(density(c)),
    "density2-wf": lambda c: wf_batch(density(c, 2.0)),
    "typical-wf": lambda c: wf_batch(skip_outliers(c)),
}


def accuracies(data: dict, design: str, seed: int, classes: int) -> list[float]:
    """Held-out accuracy at the start and after every round of ``design``."""
    (x, y), (hx, hy) = data["train"], data["held"]
    return [a for _, a in simulate(x, y, hx, hy, DESIGNS[design], seed, classes)]


def prior_shift(data: dict, design: str, seed: int, classes: int) -> np.ndarray:
    """Per round: the held-out accuracy, the same with the fit's class prior moved from the
    labelled images' class shares to the training set's (the oracle prior; Saerens et al.,
    2002), and how far the shares are from it (total variation)."""
    (x, y), (hx, hy) = data["train"], data["held"]
    true = np.bincount(y, minlength=classes) / len(y)

    def measure(held: np.ndarray, labelled: np.ndarray) -> tuple[float, float, float]:
        shares = np.bincount(y[labelled], minlength=classes) / len(labelled)
        corrected = (held * true / np.maximum(shares, 1e-9)).argmax(1)
        return (float((held.argmax(1) == hy).mean()), float((corrected == hy).mean()),
                float(np.abs(shares - true).sum() / 2))  # fmt: skip

    return np.array([m for _, m in simulate(x, y, hx, hy, DESIGNS[design], seed, classes, measure)])


def print_prior_shift(data: dict, designs: list[str], seeds: range, classes: int) -> None:
    print("| design | round | accuracy | prior corrected | gain | labelled shares' shift |")
    print("|---|---|---|---|---|---|")
    for design in ["uncertainty", *designs]:
        found = np.array([prior_shift(data, design, s, classes) for s in seeds])
        mean = found.mean(axis=0)
        for r, (raw, fixed, shift) in enumerate(mean):
            print(
                f"| {design} | {r} | {raw:.4f} | {fixed:.4f} | {fixed - raw:+.4f} | {shift:.3f} |"
            )
        gain = (found[:, 1:, 1] - found[:, 1:, 0]).mean(axis=1)
        error = gain.std(ddof=1) / np.sqrt(len(gain)) if len(gain) > 1 else float("nan")
        print(f"| {design} | 1-10 | | | {gain.mean():+.4f} ± {error:.4f} | |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--designs", default=",".join(d for d in DESIGNS if d != "uncertainty"),
                        help="uncertainty alone always runs, as the baseline")  # fmt: skip
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--work", default="/tmp/wf-honest")
    parser.add_argument("--shared", default=str(HERE.parent.parent / "shared" / "datasets"))
    parser.add_argument("--datasets", default="cats_vs_dogs,flowers")
    parser.add_argument("--prior-shift", action="store_true",
                        help="per round: the accuracy with the class prior corrected")  # fmt: skip
    args = parser.parse_args()
    designs = [d for d in args.designs.split(",") if d != "uncertainty"]
    unknown = [d for d in designs if d not in DESIGNS]
    if args.seeds < 1 or args.first_seed < 0:
        parser.error("--seeds must be at least 1 and --first-seed at least 0")
    if unknown:
        parser.error(f"unknown design {', '.join(unknown)}; choose from {', '.join(DESIGNS)}")
    work, names = prepare(args.work, args.shared, args.datasets)
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    for name in names:
        data = stored(str(work / "store"), name)
        k = int(max(data["train"][1].max(), data["held"][1].max()) + 1)
        if args.prior_shift:
            print(f"\n{name}: seeds {seeds.start}-{seeds.stop - 1}; the class prior per round")
            print_prior_shift(data, designs, seeds, k)
            continue
        print(f"\n{name}: seeds {seeds.start}-{seeds.stop - 1}; rounds 1-10 against uncertainty")
        print(
            "| design | mean accuracy | - uncertainty (paired) | seeds ahead | rounds ahead | s |"
        )
        print("|---|---|---|---|---|---|")
        base = np.array([accuracies(data, "uncertainty", s, k) for s in seeds])
        print(f"| uncertainty | {base[:, 1:].mean():.4f} | | | | |", flush=True)
        for design in designs:
            began = time.perf_counter()
            runs = np.array([accuracies(data, design, s, k) for s in seeds])
            gaps = (runs - base)[:, 1:].mean(axis=1)
            error = gaps.std(ddof=1) / np.sqrt(len(gaps)) if len(gaps) > 1 else float("nan")
            rounds = (runs.mean(axis=0) - base.mean(axis=0))[1:]
            print(f"| {design} | {runs[:, 1:].mean():.4f} | {gaps.mean():+.4f} ± {error:.4f} | "
                  f"{int((gaps > 0).sum())}/{len(gaps)} | {int((rounds > 0).sum())}/"
                  f"{len(rounds)} | {time.perf_counter() - began:.0f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
