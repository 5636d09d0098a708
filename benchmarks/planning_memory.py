"""The driver's memory while it plans an extraction: listing a dataset and splitting it into shards.

`wf extract` lists every image of a dataset on the driver and plans its shards before the first
task runs; at ten million images what the plan holds per image decides whether the head node
copes (docs/scaling.md). This measures, each in a fresh process, a dataset of N empty ``.jpg``
files laid out as SPLIT/CLASS/IMAGE (2 splits x 20 classes; only names, sizes and times are
read) on a local folder and, with ``--s3``, on the S3 test server (moto on 127.0.0.1):

- ``discover_dataset`` then every shard of every split (``--shards``) cut and fingerprinted,
  and the dataset's fingerprint, as `wf extract`'s planning does, with the shards kept to the
  end and the spec let go (and, in a checkout that has ``release_freed_memory``, Arrow's freed
  pages given back), as `wf extract` does. A checkout whose planning streams (its
  ``discover_dataset`` takes ``shards``) cuts the shards as it lists and keeps them on disk
  (the last column); an older one cuts them from the lists in memory (``plan_shards``). Both
  must give the same fingerprints (checked);
- the process's peak resident memory above what it held before listing (the peak reset once
  the imports are done), and what it still holds with the plan alive, per image;
- each way ``--repeats`` times, alternated (moto's first listing of a bucket is slower).

``--baseline CHECKOUT`` runs the same in another checkout of wf (for example a ``git worktree``
of the revision before the columnar plan), in the same sitting and on the same files: the
"before" column.

Usage: python benchmarks/planning_memory.py [--images 200000] [--shards 64] [--s3]
       [--baseline /tmp/wf-before]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SPLITS, CLASSES = ("train", "validation"), 20


def keys(images: int) -> list[str]:
    return [
        f"{SPLITS[i % 2]}/class{(i // 2) % CLASSES:02d}/image{i:07d}.jpg" for i in range(images)
    ]


def populate_local(folder: Path, images: int) -> None:
    marker = folder / f".wf-bench-{images}"
    if marker.exists():
        return
    for key in keys(images):
        path = folder / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    marker.touch()


def memory_mib(field: str = "VmRSS") -> float:
    """This process's resident memory (``VmRSS``) or its peak (``VmHWM``), from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise SystemExit("no /proc/self/status: this benchmark needs Linux")


def reset_peak() -> None:
    """Start the peak (``VmHWM``) again from the current resident memory (Linux 4.0 and
    later): the imports' own peak must not count as the plan's."""
    Path("/proc/self/clear_refs").write_text("5")


def plan_once(where: str, shards: int) -> dict:
    """Called with --one, in the checkout under test: list and plan ``where`` as `wf extract`'s
    planning does (``workflows.extract.plan.plan_dataset``): every shard cut and fingerprinted,
    the dataset's fingerprint, the shards kept to the end and the spec let go."""
    import inspect

    import pyarrow as pa

    pa.array([b"x"]).to_pylist()  # pyarrow imports pandas here: not the plan's memory

    import workflows
    from storage.hashing import fingerprint_with_rows
    from workflows.datasets import discover_dataset
    from workflows.extract import plan as planning

    streamed = "shards" in inspect.signature(discover_dataset).parameters
    reset_peak()
    before = memory_mib()
    started = time.perf_counter()
    if streamed:  # the shards are cut as the listing streams, and wait on the driver's disk
        spec = discover_dataset(where, 0.2, shards=shards)
        listed = time.perf_counter() - started
        plan = [spec.shard(split, k) for split in spec.splits for k in range(shards)]
        marks = [fingerprint_with_rows([], ref.load().signature_rows()) for ref in plan]
        keep = spec.planned  # what the run's plan keeps (its shards' files)
    else:
        spec = discover_dataset(where, 0.2)
        listed = time.perf_counter() - started
        plan = [s for items in spec.images.values() for s in planning.plan_shards(items, shards)]
        marks = [fingerprint_with_rows([], items.signature_rows()) for items in plan]
    dataset = spec.fingerprint
    seconds = time.perf_counter() - started
    images = sum(len(items) for items in plan)
    # As `wf extract` does once its shards are cut: the spec goes, and a checkout that has it
    # gives Arrow's freed pages back (an older one keeps them, as it did).
    del spec
    getattr(planning, "release_freed_memory", lambda: None)()
    peak, held = memory_mib("VmHWM"), memory_mib()
    disk = 0
    if streamed:
        folder = Path(keep._keep.name)
        disk = sum(f.stat().st_size for f in folder.iterdir())
    return {"code": str(Path(workflows.__file__).parents[1]), "images": images,
            "list_s": listed, "plan_s": seconds,
            "peak_above_mib": peak - before, "held_above_mib": held - before,
            "disk_mib": disk / 2**20,
            "fingerprints": fingerprint_with_rows([dataset], marks)}  # fmt: skip


def in_fresh_process(
    script: Path, args: list[str], env: dict, checkout: Path | None = None
) -> dict:
    """The last line of ``script --one ARGS``, run in a new Python process, as JSON; with
    ``checkout``, that checkout's code is the one imported (``benchmarks/listing_scale.py``
    uses this too)."""
    env = {**os.environ, **env, **({"PYTHONPATH": str(checkout)} if checkout else {})}
    done = subprocess.run([sys.executable, str(script), "--one", *args], env=env, cwd=checkout,
                          capture_output=True, text=True, check=False)  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200_000)
    parser.add_argument("--shards", type=int, default=64)
    parser.add_argument("--work", default="/tmp/wf-planning", help="where the local files go")
    parser.add_argument("--s3", action="store_true", help="also on the S3 test server")
    parser.add_argument("--baseline", type=Path, help="another checkout of wf: the before")
    parser.add_argument("--repeats", type=int, default=2, help="each way, alternated")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(plan_once(args.one[0], int(args.one[1]))))
        return

    sys.path.insert(0, str(HERE.parent))
    from benchmarks.machine import banner

    print(banner())
    checkouts = {"this checkout": HERE.parent}
    if args.baseline:
        checkouts = {f"baseline ({args.baseline})": args.baseline.resolve(), **checkouts}
    folder = Path(args.work) / f"data-{args.images}"
    started = time.perf_counter()
    populate_local(folder, args.images)
    print(f"{args.images} local files ready in {time.perf_counter() - started:.0f} s")
    where = {"local folder": (str(folder), {}), "local, train/ only": (str(folder / "train"), {})}
    server = None
    if args.s3:
        from benchmarks.listing_scale import populate
        from tests.s3 import S3Server

        server = S3Server()
        started = time.perf_counter()
        populate(server, args.images)
        print(f"{args.images} objects written in {time.perf_counter() - started:.0f} s")
        where["S3 (moto)"] = ("s3://bench/data", server.env())
        # Half the objects (train/ alone, read as a dataset without split folders): with the
        # whole, what each image adds beyond the fixed cost of an S3 client and its threads.
        where["S3 (moto), train/ only"] = ("s3://bench/data/train", server.env())
    rows = []
    try:
        for label, (root, env) in where.items():
            for name, checkout in [*checkouts.items()] * args.repeats:
                done = in_fresh_process(Path(__file__), [root, str(args.shards)], env, checkout)
                assert Path(done["code"]) == checkout, (done["code"], checkout)  # the code it ran
                rows.append((label, name, done))
    finally:
        if server:
            server.close()
    print(f"\nListing and planning {args.images} images into {args.shards} shards a split")
    print("| where | code | list s | list+plan s | peak above start | per image | held | "
          "per image | driver's disk |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for label, name, r in rows:
        n = r["images"]
        print(
            f"| {label} | {name} | {r['list_s']:.1f} | {r['plan_s']:.1f} | "
            f"{r['peak_above_mib']:.0f} MiB | {r['peak_above_mib'] * 2**20 / n:.0f} B | "
            f"{r['held_above_mib']:.0f} MiB | {r['held_above_mib'] * 2**20 / n:.0f} B | "
            f"{r['disk_mib']:.0f} MiB |"
        )
    for label in where:
        marks = {r["fingerprints"] for place, _, r in rows if place == label}
        print(f"{label}: the dataset's and shards' fingerprints "
              f"{'agree in every run' if len(marks) == 1 else 'DIFFER between runs'}")  # fmt: skip


if __name__ == "__main__":
    main()
