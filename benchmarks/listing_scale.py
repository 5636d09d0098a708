"""The driver's calls to an object store at scale: listing a dataset, and committing shards.

On the S3 test server (moto's server mode on 127.0.0.1, as the tests use it):

1. **Listing**: a dataset of N small objects (default 100,000; a few bytes each, only listing is
   measured) laid out as SPLIT/CLASS/IMAGE (2 splits x 20 classes), discovered the way
   `wf extract` plans it (`workflows.datasets.discover_dataset`), with the listing serial (one
   recursive listing, page after page: the old way) and in parallel by prefix
   (`storage.filesystem.LIST_THREADS`). Each in a fresh process: seconds, and the process's
   peak memory above what it held before listing.
2. **Commits**: 2,000 shard commit records written one after another (the old driver loop) and
   from the driver's pool (`workflows.extract.run.COMMIT_THREADS`): seconds and commits a second.

moto answers from one Python process on this machine's 2 cores, in well under a millisecond of
network; a real object store answers a LIST page or a PUT in 20-100 ms from another machine. So
each measurement runs twice: as moto answers, and behind a proxy that adds ``--latency-ms`` to
every request (default 20 ms, the low end of S3's), which is where serial round trips hurt.

Usage: python benchmarks/listing_scale.py [--objects 100000] [--commits 2000] [--latency-ms 20]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.planning_memory import in_fresh_process, memory_mib, reset_peak  # noqa: E402
from tests.s3 import Proxy, S3Server  # noqa: E402

SPLITS, CLASSES = ("train", "validation"), 20


def populate(server: S3Server, objects: int) -> None:
    """``objects`` small .jpg objects under s3://bench/data/SPLIT/CLASS/ (skipped if there)."""
    import boto3

    env = server.env()
    client = boto3.client(
        "s3", endpoint_url=f"http://127.0.0.1:{server.port}",
        region_name=env["AWS_DEFAULT_REGION"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )  # fmt: skip
    client.create_bucket(Bucket="bench")
    keys = [
        f"data/{SPLITS[i % 2]}/class{(i // 2) % CLASSES:02d}/image{i:07d}.jpg"
        for i in range(objects)
    ]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: client.put_object(Bucket="bench", Key=k, Body=b"wf"), keys))


def list_once(threads: int) -> dict:
    """Called with --one: discover s3://bench/data as `wf extract` plans it."""
    import storage.filesystem
    from workflows.datasets import discover_dataset

    storage.filesystem.LIST_THREADS = threads
    reset_peak()  # the imports' own peak is not the listing's
    before = memory_mib()
    started = time.perf_counter()
    spec = discover_dataset("s3://bench/data", 0.2)
    seconds = time.perf_counter() - started
    peak = memory_mib("VmHWM")
    images = sum(spec.split_size(split) for split in spec.splits)
    return {"threads": threads, "seconds": seconds, "images": images,
            "peak_mib": peak, "above_start_mib": peak - before}  # fmt: skip


def commit_many(commits: int, threads: int) -> dict:
    """Called with --one: ``commits`` shard commit records, ``threads`` at once."""
    from storage.layout import StoreLayout
    from storage.manifest import Manifest, ShardRecord, commit_shard

    layout = StoreLayout.at(f"s3://bench/store-{threads}")
    manifest = Manifest(
        dataset="d", dataset_root="s3://bench/data", dataset_fingerprint="f",
        classes=tuple(f"class{c:02d}" for c in range(CLASSES)), backbone="bb",
        weights_source="none", weights_sha256="", input_size=(224, 224), runtime="litert",
        augment_copies=0, augment_policy={}, seed=0, taps={}, feature_fingerprint="ff",
        num_shards=commits, split_sizes={"train": commits}, wf_version="0", shards={},
    )  # fmt: skip
    records = [
        ShardRecord("train", shard, commits, f"d/bb/train-{shard:05d}.parquet", "fp", 250, 250,
                    (), "0" * 64, 500_000, 12.5, class_images=(250,) + (0,) * (CLASSES - 1))
        for shard in range(commits)
    ]  # fmt: skip
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda record: commit_shard(layout, manifest, record), records))
    seconds = time.perf_counter() - started
    return {"threads": threads, "seconds": seconds, "per_second": commits / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=100_000)
    parser.add_argument("--commits", type=int, default=2_000)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--one", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        kind, threads, *rest = args.one
        if kind == "list":
            print(json.dumps(list_once(int(threads))))
        else:
            print(json.dumps(commit_many(int(rest[0]), int(threads))))
        return

    from benchmarks.machine import banner
    from storage.filesystem import LIST_THREADS
    from workflows.extract.run import COMMIT_THREADS

    print(banner())
    server = S3Server()
    try:
        started = time.perf_counter()
        populate(server, args.objects)
        print(f"{args.objects} objects written in {time.perf_counter() - started:.0f} s")
        slow = Proxy(server.port, latency=args.latency_ms / 1000)
        endpoints = {
            "moto as it answers": server.env(),
            f"+{args.latency_ms:g} ms a request": {
                **server.env(),
                "AWS_ENDPOINT_URL": f"http://127.0.0.1:{slow.port}",
            },
        }
        rows = []
        for label, env in endpoints.items():
            for threads in (1, LIST_THREADS):
                rows.append(
                    (label, "list", in_fresh_process(Path(__file__), ["list", str(threads)], env))
                )
            for threads in (1, COMMIT_THREADS):
                done = in_fresh_process(
                    Path(__file__), ["commit", str(threads), str(args.commits)], env
                )
                rows.append((label, "commit", done))
        slow.stop()
    finally:
        server.close()

    print(f"\nListing {args.objects} objects (2 splits x {CLASSES} classes), as `wf extract` plans")
    print("| endpoint | way | seconds | images found | peak memory | above start |")
    print("|---|---|---|---|---|---|")
    for label, kind, r in rows:
        if kind == "list":
            way = "serial (one listing)"
            if r["threads"] > 1:
                way = f"parallel ({r['threads']} prefixes at once)"
            print(
                f"| {label} | {way} | {r['seconds']:.1f} | {r['images']} | "
                f"{r['peak_mib']:.0f} MiB | {r['above_start_mib']:.0f} MiB |"
            )
    print(f"\n{args.commits} shard commits")
    print("| endpoint | way | seconds | commits a second |")
    print("|---|---|---|---|")
    for label, kind, r in rows:
        if kind == "commit":
            way = "serial (one after another)" if r["threads"] == 1 else f"pool of {r['threads']}"
            print(f"| {label} | {way} | {r['seconds']:.1f} | {r['per_second']:.0f} |")


if __name__ == "__main__":
    threading.excepthook = lambda hook: None  # the proxy's pipes end with the server
    main()
