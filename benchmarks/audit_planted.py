"""`wf audit` against planted issues in real photos, beside cleanlab's Datalab.

For each dataset (``../shared/datasets/cats_vs_dogs`` and ``flowers``) a copy is made under the
work folder (never in the repository) and issues are planted in it, seeded:

- near-duplicate leaks: training photos copied into validation (same class) after one of four
  changes, an equal number of each: re-encoded at JPEG quality 60, resized to 60%, cropped by
  5% on every side, brightened by 20%;
- exact leaks: training photos copied into validation byte for byte;
- flipped labels: a few percent of the training photos moved to another class's folder.

Then ``wf extract`` (Lite0, 224 px, --augment 0) and ``wf audit`` at its defaults, and
cleanlab's Datalab on the same stored embeddings (its defaults: near duplicates within 0.13 x the
median nearest-neighbour distance, label issues from its own k-NN classifier on the features).
Reported for each: recall and precision of the leaks (a planted copy is found when it is flagged
as leakage together with its source), the share of truly flipped images among the top k label
issues (k = the number flipped), and seconds per 1,000 images. Flags that match nothing planted
are listed for a look: the original datasets have duplicates and wrong labels of their own.

Datalab needs the ``datasets`` package (``.venv/bin/pip install -e '.[dev,bench]'``); without
it, its column is skipped with a note.

A third dataset is generated (``confusable``, no photos): six classes that differ in small
ways (a circle, a square or a triangle, solid or ringed, small, among clutter on a noisy
ground), 50 training and 20 validation images each, with 12 training labels flipped.

Each dataset's label ranking is also compared with a plain 10-nearest-neighbour vote on the same
embeddings (the share of an image's 10 nearest other images that carry its label, lowest
first; ties counted at their expected share). ``wf audit`` runs twice on each store: cold (it
computes the out-of-fold probabilities itself, on the engine's pool) and warm (it reuses those
that ``wf train-all --cv`` or the first audit cached for the unchanged store); the seconds per
1,000 images are the audit's own (``summary.json``), Ray's start not included.

Usage: python benchmarks/audit_planted.py [--work DIR] [--datasets cats_vs_dogs,flowers,confusable]
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "datasets"
CHANGES = ("quality60", "resize60", "crop5", "bright20")


def change(data: bytes, how: str) -> bytes:
    from PIL import Image, ImageEnhance

    image = Image.open(io.BytesIO(data)).convert("RGB")
    quality = 90
    if how == "quality60":
        quality = 60
    elif how == "resize60":
        image = image.resize((int(image.width * 0.6), int(image.height * 0.6)), Image.BILINEAR)
    elif how == "crop5":
        dx, dy = int(image.width * 0.05), int(image.height * 0.05)
        image = image.crop((dx, dy, image.width - dx, image.height - dy))
    elif how == "bright20":
        image = ImageEnhance.Brightness(image).enhance(1.2)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def plant(source: Path, target: Path, near: int, exact: int, flip: float, seed: int) -> dict:
    """A copy of ``source`` with issues planted; what was planted, as dataset-relative paths."""
    rng = np.random.default_rng(seed)
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    classes = sorted(p.name for p in (target / "train").iterdir() if p.is_dir())
    train = sorted(p for c in classes for p in (target / "train" / c).iterdir() if p.is_file())
    chosen = rng.permutation(len(train))
    sources, rest = chosen[: near + exact], chosen[near + exact :]
    leaks = []  # (validation copy, its training source, how)
    for n, index in enumerate(sources):
        photo = train[index]
        how = CHANGES[n % len(CHANGES)] if n < near else "exact"
        copy = target / "validation" / photo.parent.name / f"planted_{n:03d}_{how}.jpg"
        data = photo.read_bytes()
        copy.write_bytes(data if how == "exact" else change(data, how))
        leaks.append((str(copy.relative_to(target)), str(photo.relative_to(target)), how))
    flipped = {}
    for index in rest[: round(flip * len(train))]:
        photo = train[index]
        other = [c for c in classes if c != photo.parent.name]
        label = other[int(rng.integers(len(other)))]
        moved = target / "train" / label / f"flipped_{photo.name}"
        photo.rename(moved)
        flipped[str(moved.relative_to(target))] = photo.parent.name
    return {"leaks": leaks, "flipped": flipped}


def score_leaks(leaks: list, groups_of: dict[str, set]) -> dict:
    """Recall per change and overall: a planted copy counts when flagged in one leakage group with
    its source. ``groups_of`` maps a path to the group ids it is flagged in."""
    found: dict[str, list[bool]] = {}
    for copy, source, how in leaks:
        hit = bool(groups_of.get(copy, set()) & groups_of.get(source, set()))
        found.setdefault(how, []).append(hit)
    recall = {how: round(float(np.mean(hits)), 3) for how, hits in found.items()}
    recall["all"] = round(float(np.mean([h for hits in found.values() for h in hits])), 3)
    planted = {p for copy, source, _ in leaks for p in (copy, source)}
    flagged = set(groups_of)
    precision = round(len(flagged & planted) / len(flagged), 3) if flagged else 1.0
    return {"recall": recall, "precision": precision, "unplanted": sorted(flagged - planted)}


def top_k_flipped(ranked: list[str], flipped: dict) -> float:
    k = len(flipped)
    return round(len(set(ranked[:k]) & set(flipped)) / k, 3) if k else 1.0


def extract(data: Path, store: Path, cache: str) -> None:
    from workflows.extract.run import run_extract
    from workflows.extract.settings import DatasetSource, ExtractSettings
    from workflows.settings import ClusterSettings

    if store.exists():
        shutil.rmtree(store)
    run_extract(ExtractSettings(datasets=(DatasetSource(str(data)),), store=str(store), shards=8,
                                augment=0, taps=("bottleneck",), cache_dir=cache,
                                cluster=ClusterSettings(num_cpus=2)))  # fmt: skip


def run_wf(data: Path, store: Path, output: Path, fresh: bool) -> tuple[dict, list[dict]]:
    """``wf audit`` of one store; ``fresh``: its cached out-of-fold probabilities removed first."""
    import pyarrow.csv as pacsv

    from workflows.audit.run import run_audit
    from workflows.audit.settings import AuditSettings
    from workflows.settings import ClusterSettings

    if fresh:
        for cached in store.glob("*/*/_derived"):
            shutil.rmtree(cached)
    started = time.perf_counter()
    (summary,) = run_audit(AuditSettings(store=str(store), output=str(output),
                                         cluster=ClusterSettings(num_cpus=2))).values()  # fmt: skip
    summary["wall_seconds"] = round(time.perf_counter() - started, 2)
    return summary, pacsv.read_csv(output / data.name / "issues.csv").to_pylist()


def wf_scores(rows: list[dict], planted: dict) -> dict:
    groups_of: dict[str, set] = {}
    for row in rows:
        if row["issue"] == "leakage":
            groups_of.setdefault(row["path"], set()).add(row["group"])
    labels = sorted((r for r in rows if r["issue"] == "label_issue"), key=lambda r: -r["score"])
    return {
        "leaks": score_leaks(planted["leaks"], groups_of),
        "label_top_k": top_k_flipped([r["path"] for r in labels], planted["flipped"]),
        "label_flagged": len(labels),
        "unplanted_labels": [
            (r["path"], r["label"], r["suggested_label"])
            for r in labels[: len(planted["flipped"])]
            if r["path"] not in planted["flipped"]
        ],
    }


def run_datalab(store: Path, dataset: str, planted: dict) -> dict:
    try:
        from cleanlab import Datalab
    except ImportError as error:
        return {"skipped": f"cleanlab's Datalab is not importable ({error})"}
    from storage.feature_store import FeatureStore
    from storage.layout import StoreLayout
    from workflows.audit.run import load_images

    images = load_images(FeatureStore.open(StoreLayout.at(str(store)), dataset,
                                           "efficientnet_lite0"))  # fmt: skip
    started = time.perf_counter()
    lab = Datalab(data={"label": images.label}, label_name="label", verbosity=0)
    lab.find_issues(features=images.embedding, issue_types={"near_duplicate": {}, "label": {},
                                                             "outlier": {}})  # fmt: skip
    seconds = time.perf_counter() - started
    groups_of: dict[str, set] = {}
    sets = lab.get_info("near_duplicate")["near_duplicate_sets"]
    # Datalab's sets are per image (an image and its near duplicates): leakage is a set that
    # spans splits. Each image's set is its own group id, shared with the images in it.
    for i, members in enumerate(sets):
        members = [i, *map(int, members)]
        if len(members) > 1 and len({images.split[m] for m in members}) > 1:
            for m in members:
                groups_of.setdefault(images.path[m], set()).add(i)
    issues = lab.get_issues("label")
    train = [i for i, s in enumerate(images.split) if s == "train"]
    flagged = [i for i in train if issues["is_label_issue"].iloc[i]]
    ranked = sorted(flagged, key=lambda i: issues["label_score"].iloc[i])
    return {
        "leaks": score_leaks(planted["leaks"], groups_of),
        "label_top_k": top_k_flipped([images.path[i] for i in ranked], planted["flipped"]),
        "label_flagged": len(flagged),
        "outliers": int(lab.get_issues("outlier")["is_outlier_issue"].sum()),
        "seconds": round(seconds, 2),
        "images": len(images.path),
    }


def generate_confusable(target: Path, seed: int = 0, train: int = 50, validation: int = 20) -> None:
    """Six classes that differ in small ways: a shape (circle, square, triangle) drawn solid or
    as a ring, 18-34 px on a 160 px noisy ground among grey clutter, in random colours."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    if target.exists():
        shutil.rmtree(target)
    classes = [f"{shape}_{fill}" for shape in ("circle", "square", "triangle")
               for fill in ("solid", "ring")]  # fmt: skip
    for split, count in (("train", train), ("validation", validation)):
        for name in classes:
            shape, fill = name.split("_")
            folder = target / split / name
            folder.mkdir(parents=True)
            for n in range(count):
                ground = rng.normal(rng.uniform(60, 190), 25, (160, 160, 3))
                image = Image.fromarray(np.clip(ground, 0, 255).astype(np.uint8))
                draw = ImageDraw.Draw(image)
                for _ in range(int(rng.integers(3, 8))):  # clutter: grey lines and blobs
                    x, y = rng.uniform(0, 160, 2)
                    grey = int(rng.integers(40, 220))
                    draw.line((x, y, x + rng.uniform(-40, 40), y + rng.uniform(-40, 40)),
                              fill=(grey, grey, grey), width=int(rng.integers(1, 4)))  # fmt: skip
                size = rng.uniform(18, 34)
                cx, cy = rng.uniform(size, 160 - size, 2)
                colour = tuple(int(c) for c in rng.integers(0, 256, 3))
                box = (cx - size, cy - size, cx + size, cy + size)
                style = ({"fill": colour} if fill == "solid"
                         else {"outline": colour, "width": max(2, int(size / 5))})  # fmt: skip
                if shape == "circle":
                    draw.ellipse(box, **style)
                elif shape == "square":
                    draw.rectangle(box, **style)
                else:
                    points = [(cx, cy - size), (cx + size, cy + size), (cx - size, cy + size)]
                    draw.polygon(points, fill=style.get("fill"), outline=style.get("outline"),
                                 width=style.get("width", 1))  # fmt: skip
                image.save(folder / f"{name}_{n:03d}.jpg", "JPEG", quality=90)


def knn_vote_top_k(store: Path, dataset: str, flipped: dict, k: int = 10) -> float:
    """The share of flips among the top ``len(flipped)`` of a plain k-NN vote's ranking of the
    training images, with ties at the cut counted at their expected share."""
    from storage.feature_store import FeatureStore
    from storage.layout import StoreLayout
    from tasks.audit import nearest, neighbour_votes
    from workflows.audit.run import load_images

    images = load_images(FeatureStore.open(StoreLayout.at(str(store)), dataset,
                                           "efficientnet_lite0"))  # fmt: skip
    votes = neighbour_votes(nearest(images.embedding, k), images.label_index,
                            int(images.label_index.max()) + 1)  # fmt: skip
    train = np.array([i for i, s in enumerate(images.split) if s == "train"])
    own = votes[train, images.label_index[train]]
    is_flip = np.array([images.path[i] in flipped for i in train])
    cut = len(flipped)
    if not cut:
        return 1.0
    boundary = np.sort(own)[cut - 1]
    above, tied = own < boundary, own == boundary
    expected = is_flip[above].sum() + is_flip[tied].mean() * (cut - above.sum())
    return round(float(expected) / cut, 3)


PLANTS = {  # near leaks, exact leaks, share of training labels flipped
    "cats_vs_dogs": (40, 10, 0.03),
    "flowers": (40, 10, 0.03),
    "confusable": (8, 4, 12 / 300),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/wf-bench/audit")
    parser.add_argument("--datasets", default="cats_vs_dogs,flowers,confusable")
    parser.add_argument("--reuse", action="store_true", help="reuse planted data and stores")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE.parent))
    from machine import banner, describe

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    for dataset in args.datasets.split(","):
        data, store = work / "data" / dataset, work / "stores" / dataset
        near, exact, flip = PLANTS[dataset]
        planted_file = work / f"planted-{dataset}.json"
        if args.reuse and planted_file.exists() and store.exists():
            planted = json.loads(planted_file.read_text())
        else:
            if dataset == "confusable":
                source = work / "source" / dataset
                generate_confusable(source)
            else:
                source = SHARED / dataset
                if not source.is_dir():
                    sys.exit(f"{source} is missing: this benchmark needs ../shared/datasets")
            planted = plant(source, data, near, exact, flip, seed=0)
            planted_file.write_text(json.dumps(planted))
            extract(data, store, str(work / "cache"))
        runs = {}
        for how in ("cold", "warm"):
            summary, rows = run_wf(data, store, work / f"audit-{how}", fresh=how == "cold")
            runs[how] = {**wf_scores(rows, planted), "summary": summary}
        results[dataset] = {"wf": runs["cold"], "wf_warm": runs["warm"],
                            "datalab": run_datalab(store, dataset, planted),
                            "knn": {"label_top_k": knn_vote_top_k(store, dataset,
                                                                  planted["flipped"])},
                            "planted": {"leaks": len(planted["leaks"]),
                                        "flipped": len(planted["flipped"])}}  # fmt: skip
    print(banner())
    print(f"\n{'dataset':<13} {'tool':<14} {'leak recall':>11} {'near':>5} {'exact':>5} "
          f"{'leak prec':>9} {'top-k flipped':>13} {'s/1k img':>8}")  # fmt: skip
    for dataset, r in results.items():
        images = r["wf"]["summary"]["images"]
        for tool, label in (("wf", "wf audit cold"), ("wf_warm", "wf audit warm"),
                            ("datalab", "Datalab"), ("knn", "10-NN vote")):  # fmt: skip
            t = r[tool]
            if "skipped" in t:
                print(f"{dataset:<13} {label:<14} skipped: {t['skipped']}")
                continue
            if tool == "knn":
                print(f"{dataset:<13} {label:<14} {'':>11} {'':>5} {'':>5} {'':>9} "
                      f"{t['label_top_k']:>13.3f}")  # fmt: skip
                continue
            seconds = t["seconds"] if tool == "datalab" else t["summary"]["seconds"]
            near = np.mean([t["leaks"]["recall"][c] for c in CHANGES])
            print(f"{dataset:<13} {label:<14} {t['leaks']['recall']['all']:>11.3f} {near:>5.2f} "
                  f"{t['leaks']['recall'].get('exact', 0):>5.2f} {t['leaks']['precision']:>9.3f} "
                  f"{t['label_top_k']:>13.3f} {1000 * seconds / images:>8.2f}")  # fmt: skip
        for change_ in CHANGES:
            print(f"{'':<13} recall by change, {change_}: wf {r['wf']['leaks']['recall'][change_]}"
                  + ("" if "skipped" in r["datalab"]
                     else f", datalab {r['datalab']['leaks']['recall'][change_]}"))  # fmt: skip
        for how in ("wf", "wf_warm"):
            print(f"{'':<13} {how}: {r[how]['summary']['images']} images, "
                  f"wall {r[how]['summary']['wall_seconds']} s (Ray start included), "
                  f"stages {r[how]['summary']['timings']}")  # fmt: skip
        print(f"{'':<13} planted: {r['planted']}; wf counts {r['wf']['summary']['counts']}")
    out = work / "audit_planted.json"
    out.write_text(json.dumps({"results": results, "machine": describe(), "args": vars(args)},
                              indent=2, default=str))  # fmt: skip
    print(f"\nfull results (with the unplanted flags to look at): {out}")


if __name__ == "__main__":
    main()
