"""What a training job costs beyond its epochs, before and after a change, in one table.

N small generated datasets x some methods, 1 epoch each, in one `wf train-all` on a local
cluster of 2 CPUs. Per job: its wall time (from the moment its runner starts it to its
artifacts written) minus the time of its epochs is its overhead: starting workers, importing
TensorFlow, reading rows, building and saving the complete model, the validation metrics, the
artifacts. Printed per scenario: total wall time of the run (train-all alone, the store
already extracted), mean and max overhead, and the mean overhead of every job after the
run's first one, per method.

Scenarios: (a) 6 datasets x bottleneck + finetune, (b) 20 datasets x bottleneck + finetune +
scratch. Targets (issue 19): overhead after the first job <= 2 s for bottleneck and fusion,
<= 5 s for finetune and scratch; (a) <= 40 s, (b) <= 240 s.

"Before" is another revision's code run by this same script: check it out beside this one and
put it first on the path (the script uses only the public pipeline functions both have):

    git worktree add /tmp/wf-before <rev>
    PYTHONPATH=/tmp/wf-before python benchmarks/train_overhead.py --label before
    python benchmarks/train_overhead.py --label after
    python benchmarks/train_overhead.py --table        # both columns, from the saved results

Usage: python benchmarks/train_overhead.py [--label L] [--scenarios a,b] [--work DIR] [--table]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCENARIOS = {"a": (6, ("bottleneck", "finetune")), "b": (20, ("bottleneck", "finetune", "scratch"))}
TARGETS = {"a": 40.0, "b": 240.0}


def run_scenario(work: Path, datasets: int, methods: tuple[str, ...]) -> dict:
    from tasks.methods import TrainOptions
    from workflows.cli.demo import generate_shapes_dataset
    from workflows.cluster import ray_cluster
    from workflows.extract.run import run_extract
    from workflows.extract.settings import DatasetSource, ExtractSettings
    from workflows.settings import ClusterSettings
    from workflows.train.run import run_train_all
    from workflows.train.settings import TrainSettings, recipes_from_options

    data = work / f"data{datasets}"
    for index in range(datasets):
        generate_shapes_dataset(str(data / f"shapes{index}"), 20, size=64, seed=index,
                                classes=("circles", "squares"))  # fmt: skip
    cluster = ClusterSettings(num_cpus=2)
    runs = work / f"runs{datasets}"
    shutil.rmtree(runs, ignore_errors=True)
    options = TrainOptions(scratch_image_size=48)
    with ray_cluster(cluster):
        sources = (DatasetSource(str(data)),)
        store = str(work / f"store{datasets}")
        run_extract(ExtractSettings(datasets=sources, store=store, shards=1, input_size=64,
                                    augment=1, cluster=cluster))  # fmt: skip
        started = time.perf_counter()
        results = run_train_all(TrainSettings(
            store=store, runs=str(runs), methods=methods,
            recipes=recipes_from_options(1, None, {}, {}), options=options, cluster=cluster,
        ))  # fmt: skip
        total = time.perf_counter() - started
    jobs = []
    for r in results:
        epoch = (r.seconds_per_epoch or 0.0) * r.epochs
        jobs.append({"job": r.key, "method": r.method, "status": r.status,
                     "seconds": round(r.seconds, 3), "epoch_seconds": round(epoch, 3),
                     "overhead": round(r.seconds - epoch, 3)})  # fmt: skip
    return {"datasets": datasets, "methods": list(methods), "jobs": jobs,
            "total_seconds": round(total, 1)}  # fmt: skip


def summarise(result: dict) -> dict:
    jobs = result["jobs"]
    overheads = [j["overhead"] for j in jobs]
    # "After the run's first job": every job but the one that started first (the longest
    # overhead of the first wave pays the pool's start-up); per method, the mean of the rest.
    first = max(range(len(jobs)), key=lambda i: jobs[i]["overhead"])
    later = [j for i, j in enumerate(jobs) if i != first]
    per_method = {
        m: round(statistics.mean(j["overhead"] for j in later if j["method"] == m), 2)
        for m in result["methods"]
        if any(j["method"] == m for j in later)
    }
    return {"total": result["total_seconds"], "mean": round(statistics.mean(overheads), 2),
            "max": round(max(overheads), 2), "after_first": per_method,
            "failed": sum(j["status"] != "done" for j in jobs)}  # fmt: skip


def print_table(work: Path) -> None:
    from machine import banner

    print(banner())
    saved = {p.stem.removeprefix("train_overhead_"): json.loads(p.read_text())
             for p in sorted(work.glob("train_overhead_*.json"))}  # fmt: skip
    labels = sorted(saved, key=lambda label: (label != "before", label))
    print(f"\n{'scenario / measure':<44}" + "".join(f"{label:>12}" for label in labels))
    for name, (datasets, methods) in SCENARIOS.items():
        rows: dict[str, list[str]] = {}
        for label in labels:
            if name not in saved[label]["scenarios"]:
                continue
            s = summarise(saved[label]["scenarios"][name])
            cells = {
                f"total s (target <= {TARGETS[name]:.0f})": f"{s['total']:.1f}",
                "overhead per job, mean s": f"{s['mean']:.1f}",
                "overhead per job, max s": f"{s['max']:.1f}",
                **{f"  after the first, {m} s": f"{v:.2f}" for m, v in s["after_first"].items()},
                "jobs not done": str(s["failed"]),
            }
            for key, value in cells.items():
                rows.setdefault(key, ["-"] * len(labels))[labels.index(label)] = value
        print(f"({name}) {datasets} datasets x {' + '.join(methods)}, 1 epoch")
        for key, cells in rows.items():
            print(f"  {key:<42}" + "".join(f"{c:>12}" for c in cells))
    for label in labels:
        print(f"{label}: {saved[label].get('revision', '?')} on {saved[label]['machine']['cpu']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(HERE / "results" / "overhead"))
    parser.add_argument("--label", default="after")
    parser.add_argument("--scenarios", default="a,b")
    parser.add_argument("--table", action="store_true", help="print the saved results only")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.table:
        print_table(work)
        return
    import subprocess

    from machine import describe

    import workflows

    source = Path(workflows.__file__).resolve().parent.parent
    revision = subprocess.run(["git", "-C", str(source), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True).stdout.strip()  # fmt: skip
    out = work / f"train_overhead_{args.label}.json"
    saved = json.loads(out.read_text()) if out.exists() else {"scenarios": {}}
    for name in args.scenarios.split(","):
        datasets, methods = SCENARIOS[name]
        saved["scenarios"][name] = run_scenario(work / args.label, datasets, methods)
        saved.update(revision=f"{revision} ({source})", machine=describe())
        out.write_text(json.dumps(saved, indent=2))
        s = summarise(saved["scenarios"][name])
        print(f"({name}) {args.label}: {s}", flush=True)
    print_table(work)


if __name__ == "__main__":
    main()
