"""The extraction pipeline: datasets in, one Parquet feature store per dataset out.

discover -> take each store's lease -> plan shards -> one Ray task per shard (read, decode,
augment, backbone; each task reads its images where they are) -> commit each finished shard ->
compact the manifest, write the rejects, remove what no manifest names.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace

import ray

from storage.errors import DatasetError, RunFailed
from storage.layout import StoreLayout
from storage.lease import Lease
from storage.logs import write_run_log
from storage.manifest import (
    ShardRecord,
    commit_shard,
    compact,
    now_iso,
    remove_unreferenced,
    shard_key,
)
from storage.rejects import write_rejects
from tasks.backbones import get_backbone
from tasks.extract_shard import ProgressCounter, ShardJob, ShardResult, extract_shard_task
from workflows.cluster import on_this_node, ray_cluster
from workflows.datasets import DatasetSpec, discover_dataset, expand_dataset_paths
from workflows.extract.calibration import backbone_preparer
from workflows.extract.plan import DatasetPlan, plan_dataset, release_freed_memory
from workflows.extract.settings import ExtractSettings


@dataclass(frozen=True)
class DatasetReport:
    """What one extraction run did to one dataset's store."""

    dataset: str
    backbone: str
    images: int
    rejects: int
    rows: int
    shards_done: int
    shards_skipped: int
    shards_failed: int
    seconds: float
    store_bytes: int
    peak_worker_rss_mib: float
    manifest_path: str
    rejects_path: str
    nodes: tuple[str, ...]
    warnings: tuple[str, ...]
    failures: tuple[str, ...]
    empty_classes: tuple[str, ...]
    commits: int = 0  # shards committed by this run
    commit_seconds: float = 0.0  # time the driver spent committing them
    commit_bytes: int = 0  # bytes it wrote to commit them
    # Where the time went (benchmarks/extract_throughput.py): seconds per stage summed over this
    # run's shards (tasks.extract_shard.STAGES), the shard tasks' own seconds summed, and when
    # (wall clock, time.time()) the extraction phase began and its first shard task started.
    stages: dict[str, float] = field(default_factory=dict)
    task_seconds: float = 0.0
    extract_started_at: float = 0.0
    first_shard_at: float = 0.0

    @property
    def images_per_second(self) -> float:
        """Source images (not augmented rows) extracted per second of this run."""
        return self.images / self.seconds if self.seconds > 0 else 0.0


ProgressHook = Callable[[dict[str, tuple[int, int, int]]], None]
MessageHook = Callable[[str], None]


def discover_all(
    settings: ExtractSettings, dropped: dict[str, set[str]] | None = None
) -> list[DatasetSpec]:
    """Every dataset the settings name, with the classes in ``dropped`` left out."""
    specs = []
    for source in settings.datasets:
        found = expand_dataset_paths([source.path])
        if source.name and len(found) > 1:
            raise DatasetError(f"{source.path} holds several datasets; a name fits only one")
        fraction = (
            settings.validation_fraction
            if source.validation_fraction is None
            else source.validation_fraction
        )
        for root, tree in found:
            spec = discover_dataset(root, fraction, source.name, tree, settings.shards)
            if dropped and spec.name in dropped:
                spec = without_classes(spec, dropped[spec.name])
            specs.append(spec)
    names = [spec.name for spec in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DatasetError(f"several datasets are named {', '.join(duplicates)}; name them apart")
    return specs


def without_classes(spec: DatasetSpec, dropped: set[str]) -> DatasetSpec:
    """``spec`` without the classes in ``dropped``, the others re-indexed."""
    classes = tuple(c for c in spec.classes if c not in dropped)
    if len(classes) < 2:
        raise DatasetError(f"{spec.name}: fewer than two classes are left with usable images")
    warning = (
        f"{spec.name}: dropped classes with no usable training image: {', '.join(sorted(dropped))}"
    )
    # The planned images keep their classes; each shard is re-indexed as it is read.
    return replace(spec, classes=classes, warnings=(*spec.warnings, warning))


def run_extract(
    settings: ExtractSettings, on_progress: ProgressHook | None = None,
    on_message: MessageHook | None = None,
) -> list[DatasetReport]:  # fmt: skip
    """Extract every dataset of ``settings`` into its feature store; returns one report each.

    ``on_progress`` is called about twice a second with ``{dataset: (images done, images
    planned, rejects)}``. A shard task that fails is reported in its dataset's report and the
    other shards go on. A class left with no usable training image is reported (or, with
    ``drop_empty_classes``, dropped and its dataset extracted again without it).
    """
    backbone = get_backbone(settings.backbone)
    specs = discover_all(settings)
    layout = StoreLayout.at(settings.store)
    layout.location.ensure_writable()  # before the slow conversion: a bad store fails at once
    prepare = backbone_preparer(settings, backbone, backbone.resolve_weights(settings.weights))
    reports = _extract(settings, specs, prepare, layout, on_progress, on_message)
    empty = {r.dataset: set(r.empty_classes) for r in reports if r.empty_classes}
    if empty and settings.drop_empty_classes:
        again = [s for s in discover_all(settings, empty) if s.name in empty]
        redone = {
            r.dataset: r
            for r in _extract(settings, again, prepare, layout, on_progress, on_message)
        }
        reports = [redone.get(r.dataset, r) for r in reports]
    write_run_log(layout, "extract", [
        {"event": "extract", "backbone": settings.backbone_name, "shards": settings.shards,
         "augment": settings.augment, "runtime": settings.runtime, "datasets": len(reports)},
        *({"event": "dataset", **asdict(report)} for report in reports),
    ])  # fmt: skip
    return reports


def _extract(settings, specs, prepare, layout, on_progress, on_message) -> list[DatasetReport]:
    """Plan and run ``specs``; the list is emptied once they are planned: each plan keeps what
    its jobs need (their shards on the driver's disk)."""
    with ExitStack() as stack:
        leases = {
            spec.name: stack.enter_context(Lease(
                layout.filesystem, layout.lease_path(spec.name, settings.backbone_name),
                f"store {spec.name}/{settings.backbone_name}", command="wf extract",
                wait=settings.wait, on_wait=on_message,
            ))
            for spec in specs
        }  # fmt: skip
        prepared = {spec.name: prepare(spec) for spec in specs}
        plans = {s.name: plan_dataset(s, settings, prepared[s.name], layout) for s in specs}
        specs.clear()  # the plans keep their planned shards, all the run reads
        release_freed_memory()
        outcome = _run_shards(settings, layout, plans, leases, prepared, on_progress)
        reports = []
        for name, plan in plans.items():
            leases[name].check()
            reports.append(_finish(layout, plan, outcome, name))
        return reports


@dataclass
class _Outcome:
    started: float
    done: dict[str, int]
    images: dict[str, int]
    peak_rss: dict[str, float]
    nodes: dict[str, set[str]]
    failures: dict[str, list[str]]
    finished_at: dict[str, float]
    commit_seconds: dict[str, float] = field(default_factory=dict)
    commit_bytes: dict[str, int] = field(default_factory=dict)
    stages: dict[str, dict[str, float]] = field(default_factory=dict)
    task_seconds: dict[str, float] = field(default_factory=dict)
    first_shard_at: dict[str, float] = field(default_factory=dict)
    started_at: float = 0.0  # wall clock


def _run_shards(settings, layout, plans, leases, prepared, on_progress) -> _Outcome:
    names = list(plans)
    outcome = _Outcome(time.perf_counter(), dict.fromkeys(names, 0), dict.fromkeys(names, 0),
                       dict.fromkeys(names, 0.0), {n: set() for n in names}, {n: [] for n in names},
                       {})  # fmt: skip
    if not any(plan.jobs for plan in plans.values()):
        return outcome
    planned = {n: sum(len(j.items) for j in p.jobs) for n, p in plans.items()}
    with (
        ray_cluster(settings.cluster, api_server=False),
        ThreadPoolExecutor(COMMIT_THREADS) as committer,
    ):
        outcome.started = time.perf_counter()  # rates count extraction, not Ray's start-up
        outcome.started_at = time.time()
        refs = {p.key: ray.put(p) for p in prepared.values()}  # once each, to every node
        # Progress for people only: without a display (--json) no counter actor is started (a
        # process of its own, and a remote call from every batch).
        counter = (
            ProgressCounter.options(scheduling_strategy=on_this_node()).remote()
            if on_progress is not None
            else None
        )
        # Jobs are submitted a window at a time, each read from the driver's disk just before:
        # the jobs waiting hold no rows, on the driver or in Ray's object store.
        waiting = deque(job for plan in plans.values() for job in plan.jobs)
        window, asked = submit_window(), time.monotonic()  # asked again as nodes may join
        pending = {}

        def submit() -> None:
            nonlocal window, asked
            if time.monotonic() - asked > 5:
                window, asked = submit_window(), time.monotonic()
            while waiting and len(pending) < window:
                job = waiting.popleft()  # kept as it waited: its images went with the task
                task = extract_shard_task.options(num_cpus=settings.threads_per_task)
                pending[task.remote(job.loaded(), refs[prepared[job.dataset].key], counter)] = job

        submit()
        # Commits go to a small pool, so that a slow store's round trips do not queue behind
        # one another (each record is independent; the manifest is compacted once, at the end).
        # Their results are folded here, on the driver's thread, as they finish.
        commits: dict[Future, tuple[ShardJob, ShardRecord, ShardResult]] = {}
        unsettled = {name: len(plan.jobs) for name, plan in plans.items()}  # running or committing
        while pending or commits:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5) if pending else ([], [])
            for ref in ready:
                job = pending.pop(ref)
                try:
                    result: ShardResult = ray.get(ref)
                except Exception as error:  # a failed shard is reported, others go on
                    outcome.failures[job.dataset].append(_failure(job, error))
                    unsettled[job.dataset] -= 1
                    continue
                finally:
                    submit()  # its place in the window
                leases[job.dataset].check()  # a lost lease stops before the manifest moves
                record = _record(layout, plans[job.dataset], result)
                commit = committer.submit(_commit, layout, plans[job.dataset], record)
                commits[commit] = (job, record, result)
            finished = [f for f in commits if f.done()] if pending else list(commits)
            for future in finished:
                job, record, result = commits.pop(future)
                _fold(outcome, plans[job.dataset], job, record, result, future)
                unsettled[job.dataset] -= 1
                if not unsettled[job.dataset]:
                    outcome.finished_at[job.dataset] = time.perf_counter()
            if on_progress is not None:
                try:
                    totals = ray.get(counter.totals.remote(), timeout=5)
                except Exception:  # progress is for people; the run goes on
                    continue
                on_progress({n: (totals.get(n, [0, 0])[0], planned[n], totals.get(n, [0, 0])[1])
                             for n in plans})  # fmt: skip
    return outcome


COMMIT_THREADS = 8  # commit records in flight at once (benchmarks/listing_scale.py)
SUBMIT_WINDOW_MIN = 16  # shard tasks submitted ahead of the results (at least twice the CPUs)


def submit_window() -> int:
    """How many shard tasks are submitted at once: enough to keep every CPU of the cluster busy
    while results are committed, few enough that the jobs waiting hold no rows."""
    return max(SUBMIT_WINDOW_MIN, 2 * int(ray.cluster_resources().get("CPU", 1)))


def _failure(job: ShardJob, error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{job.split} shard {job.shard}: {type(error).__name__}: {lines[-1] if lines else ''}"


def _record(layout: StoreLayout, plan: DatasetPlan, result: ShardResult) -> ShardRecord:
    key = shard_key(result.split, result.shard)
    return ShardRecord(
        split=result.split, shard=result.shard, num_shards=plan.manifest.num_shards,
        file=layout.relative(result.path), input_fingerprint=plan.fingerprints[key],
        images=result.images, rows=result.rows, rejects=result.rejects, sha256=result.sha256,
        size_bytes=result.size_bytes, seconds=round(result.seconds, 3),
        class_images=result.class_images, worker=result.worker, node=result.node,
        peak_rss_mib=round(result.peak_rss_mib, 1),
    )  # fmt: skip


def _commit(layout: StoreLayout, plan: DatasetPlan, record: ShardRecord) -> tuple[int, float]:
    """Make a finished shard count: one commit record. Returns its bytes and seconds."""
    started = time.perf_counter()
    written = commit_shard(layout, plan.manifest, record)
    return written, time.perf_counter() - started


def _fold(outcome: _Outcome, plan: DatasetPlan, job: ShardJob, record: ShardRecord,
          result: ShardResult, commit: Future) -> None:  # fmt: skip
    """A commit finished: the shard counts (or, if its record could not be written, fails)."""
    name = job.dataset
    try:
        written, seconds = commit.result()
    except Exception as error:
        outcome.failures[name].append(_failure(job, error))
        return
    plan.manifest = plan.manifest.with_shard(record)
    outcome.commit_seconds[name] = outcome.commit_seconds.get(name, 0.0) + seconds
    outcome.commit_bytes[name] = outcome.commit_bytes.get(name, 0) + written
    outcome.done[name] += 1
    outcome.images[name] += result.images
    stages = outcome.stages.setdefault(name, {})
    for stage, seconds in result.stages:
        stages[stage] = stages.get(stage, 0.0) + seconds
    outcome.task_seconds[name] = outcome.task_seconds.get(name, 0.0) + result.seconds
    first = outcome.first_shard_at.get(name, result.started_at)
    outcome.first_shard_at[name] = min(first, result.started_at)
    outcome.peak_rss[name] = max(outcome.peak_rss[name], record.peak_rss_mib)
    outcome.nodes[name].add(record.node)


def _finish(layout: StoreLayout, plan: DatasetPlan, outcome: _Outcome, name: str) -> DatasetReport:
    seconds = outcome.finished_at.get(name, time.perf_counter()) - outcome.started
    manifest = replace(plan.manifest, timings={"seconds": round(seconds, 3)}, updated_at=now_iso())
    compact(layout, manifest)
    rejects_path = write_rejects(layout, manifest)
    remove_unreferenced(layout, manifest)
    counts = manifest.images_per_class("train")
    empty = (
        tuple(c for c, n in zip(manifest.classes, counts, strict=True) if n == 0)
        if manifest.is_complete()
        else ()
    )
    records = manifest.shards.values()
    return DatasetReport(
        dataset=name, backbone=manifest.backbone, images=outcome.images[name],
        rejects=len(manifest.rejects), rows=sum(r.rows for r in records),
        shards_done=outcome.done[name], shards_skipped=plan.skipped,
        shards_failed=len(outcome.failures[name]), seconds=seconds,
        store_bytes=sum(r.size_bytes for r in records),
        peak_worker_rss_mib=round(outcome.peak_rss[name], 1),
        manifest_path=layout.location.display(layout.manifest_path(name, manifest.backbone)),
        rejects_path=layout.location.display(rejects_path),
        nodes=tuple(sorted(n for n in {r.node for r in records} if n)),
        warnings=plan.warnings, failures=tuple(outcome.failures[name]), empty_classes=empty,
        commits=outcome.done[name], commit_seconds=round(outcome.commit_seconds.get(name, 0.0), 4),
        commit_bytes=outcome.commit_bytes.get(name, 0),
        stages={k: round(v, 4) for k, v in outcome.stages.get(name, {}).items()},
        task_seconds=round(outcome.task_seconds.get(name, 0.0), 4),
        extract_started_at=outcome.started_at, first_shard_at=outcome.first_shard_at.get(name, 0.0),
    )  # fmt: skip


def check_reports(reports: list[DatasetReport]) -> None:
    """Raise what the run's outcome means for its exit: failed shards (1), empty classes (2)."""
    failed = sum(r.shards_failed for r in reports)
    if failed:
        raise RunFailed(f"{failed} shards failed; run the same command again to retry them")
    empty = [
        f"{r.dataset}: class {', '.join(map(repr, r.empty_classes))}"
        for r in reports
        if r.empty_classes
    ]
    if empty:
        raise DatasetError(
            f"no usable training image in {'; '.join(empty)} (see the rejects); "
            "fix the files, or pass --drop-empty-classes"
        )
