"""What a training job costs beyond its epochs: 6 small datasets x 2 methods (bottleneck, then
finetune), 1 epoch each, in one `wf train-all` on a local cluster of 2 CPUs.

Per job: its wall time (from the runner's start to its artifacts written) minus the time of its
epoch is its overhead: starting Ray Train's controller and worker, the worker importing
TensorFlow and reading its rows, building and saving the complete model, the validation
metrics and the artifacts. Printed per job, with the total wall time of the run; the target is
at most 10 s per job.

Usage: python benchmarks/train_overhead.py [--work DIR] [--datasets 6]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(HERE / "results" / "overhead"))
    parser.add_argument("--datasets", type=int, default=6)
    args = parser.parse_args()
    from tasks.methods import TrainOptions
    from workflows.cluster import ray_cluster
    from workflows.demo import generate_shapes_dataset
    from workflows.extract import run_extract
    from workflows.settings import (
        ClusterSettings,
        DatasetSource,
        ExtractSettings,
        TrainSettings,
        recipes_from_options,
    )
    from workflows.train import run_train_all

    work = Path(args.work)
    data = work / "data"
    for index in range(args.datasets):
        generate_shapes_dataset(str(data / f"shapes{index}"), 20, size=64, seed=index,
                                classes=("circles", "squares"))  # fmt: skip
    cluster = ClusterSettings(num_cpus=2)
    runs = work / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    with ray_cluster(cluster):
        sources = (DatasetSource(str(data)),)
        run_extract(ExtractSettings(datasets=sources, store=str(work / "store"), shards=1,
                                    input_size=64, augment=1, cluster=cluster))  # fmt: skip
        started = time.perf_counter()
        results = run_train_all(TrainSettings(
            store=str(work / "store"), runs=str(runs), methods=("bottleneck", "finetune"),
            recipes=recipes_from_options(1, None, {}, {}), options=TrainOptions(), cluster=cluster,
        ))  # fmt: skip
        total = time.perf_counter() - started
    from machine import banner, describe

    print(banner())
    print(f"\n{'job':<22} {'status':<7} {'job s':>7} {'epoch s':>8} {'overhead s':>11}")
    rows = []
    for r in results:
        epoch = (r.seconds_per_epoch or 0.0) * r.epochs
        rows.append({"job": r.key, "status": r.status, "seconds": round(r.seconds, 2),
                     "epoch_seconds": round(epoch, 2),
                     "overhead": round(r.seconds - epoch, 2)})  # fmt: skip
        print(
            f"{r.key:<22} {r.status:<7} {r.seconds:>7.1f} {epoch:>8.2f} {r.seconds - epoch:>11.1f}"
        )
    overheads = [row["overhead"] for row in rows]
    mean = sum(overheads) / len(overheads)
    print(f"\n{len(results)} jobs in {total:.1f} s; overhead per job: mean {mean:.1f} s, "
          f"max {max(overheads):.1f} s (target <= 10 s)")  # fmt: skip
    facts = {"jobs": rows, "total_seconds": round(total, 1), "machine": describe()}
    (work / "train_overhead.json").write_text(json.dumps(facts, indent=2))


if __name__ == "__main__":
    main()
