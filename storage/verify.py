"""``wf verify``: every byte a store or a runs folder claims, checked against its record.

For a store: each part the manifest names exists and has the recorded size, row count and
SHA-256, and no committed shard is missing. For a runs folder: each file in every job's
``artifacts.json`` has the recorded size and SHA-256. Problems are returned, one line each,
naming the file; nothing is changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from storage.errors import StoreError
from storage.feature_store import FeatureStore
from storage.filesystem import read_bytes
from storage.hashing import sha256_stream
from storage.layout import StoreLayout
from storage.runs import RunsLayout


@dataclass
class VerifyReport:
    checked: int = 0  # files
    bytes: int = 0
    problems: list[str] = field(default_factory=list)


def verify_store(layout: StoreLayout, report: VerifyReport) -> None:
    for dataset, backbone in layout.stores():
        try:
            store = FeatureStore.open(layout, dataset, backbone)
        except StoreError as error:
            report.problems.append(str(error))
            continue
        report.problems.extend(store.part_problems(sha256=True))
        report.checked += len(store.manifest.shards)
        report.bytes += sum(r.size_bytes for r in store.manifest.shards.values())


def verify_runs(runs: RunsLayout, report: VerifyReport) -> None:
    for job in runs.jobs():
        try:
            index = job.index()
        except StoreError as error:
            report.problems.append(str(error))
            continue
        for name, expected in sorted(index.items()):
            report.checked += 1
            try:
                data = read_bytes(job.location.filesystem, job.path(name))
            except FileNotFoundError:
                report.problems.append(f"{job.display(name)}: missing (named by artifacts.json)")
                continue
            if len(data) != expected["bytes"] or sha256_stream([data]) != expected["sha256"]:
                report.problems.append(f"{job.display(name)}: SHA-256 differs from artifacts.json")
            report.bytes += len(data)


def verify(store: str | None, runs: str | None) -> VerifyReport:
    """Check a store, a runs folder or both (paths or URIs)."""
    from storage.errors import WfError

    if store is None and runs is None:
        raise WfError("name a STORE, --runs RUNS, or both")
    report = VerifyReport()
    if store is not None:
        verify_store(StoreLayout.at(store), report)
    if runs is not None:
        verify_runs(RunsLayout(runs), report)
    return report
