"""The training pipeline: every (dataset, method) job of a feature store, concurrently.

plan jobs (each store verified: every part at its recorded size and row count, every class
with training rows) -> a pool of long-lived training workers for the whole run, as many as the
cluster's CPUs allow (:class:`~tasks.training.engine.TrainingPool`), each job queued for it once
the job it depends on is done -> collect results -> summary (Markdown and HTML beside the runs).
A run whose jobs train in sync on several workers (``--workers 2``) starts a Ray Train run per
job instead, its runner a Ray task on the driver's node.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

import ray

from storage.errors import RunFailed, SettingsError, StoreError
from storage.feature_store import FeatureStore
from storage.filesystem import delete_folder
from storage.layout import StoreLayout
from storage.runs import Artifact, RunsLayout, job_key, job_run_name, split_job_key
from tasks.backbones import DEFAULT_BACKBONE, is_onnx_store
from tasks.methods import JobContext, Method, StoreSnapshot, get_method, in_dependency_order
from tasks.training.engine import TrainingPool
from tasks.training.job import JobBoard, JobResult, run_job_task
from workflows.cluster import on_this_node, ray_cluster
from workflows.train.cross_validate import cross_validate_dataset
from workflows.train.settings import TrainSettings
from workflows.train.summary import write_summary


@dataclass(frozen=True)
class PlannedJob:
    dataset: str
    method: str
    context: JobContext | None  # None when its store cannot be used
    depends_on: str | None
    problem: str = ""

    @property
    def key(self) -> str:
        return job_key(self.dataset, self.method)


def store_snapshot(store: FeatureStore) -> StoreSnapshot:
    manifest = store.manifest
    splits = sorted({r.split for r in manifest.shards.values()})
    return StoreSnapshot(
        backbone=manifest.backbone,
        input_size=tuple(manifest.input_size),
        taps={name: tuple(tap.shape) for name, tap in manifest.taps.items()},
        copies=manifest.augment_copies + 1,
        files={split: tuple(store.files(split)) for split in splits},
        rows={s: sum(r.rows for r in manifest.shards.values() if r.split == s) for s in splits},
        images={s: manifest.images_in(s) for s in splits},
        manifest_id=manifest.manifest_id,
        labelled_id=manifest.labelled_id,
        weights_source=manifest.weights_source,
        weights_sha256=manifest.weights_sha256,
        preprocessing=manifest.preprocessing,
    )


def _open_verified(layout: StoreLayout, dataset: str, backbone: str) -> FeatureStore:
    store = FeatureStore.open(layout, dataset, backbone)
    store.verify_parts()
    empty = store.empty_classes()
    if empty:
        raise StoreError(f"{store.name}: class {', '.join(map(repr, empty))} has no training rows")
    return store


def _onnx(store: FeatureStore) -> bool:
    return is_onnx_store(store.manifest.weights_source)


def _check_method(method: Method, store: FeatureStore) -> None:
    """What a method cannot do with its own store's backbone, as one line."""
    missing = [tap for tap in method.taps if tap not in store.manifest.taps]
    if _onnx(store) and missing:
        raise SettingsError(f"{method.name} cannot train on {store.manifest.backbone}, an ONNX "
                            "model: no last block to train")  # fmt: skip
    if missing:
        raise StoreError(f"{store.name} has no tap {', '.join(missing)} for {method.name}: "
                         "extract with --taps")  # fmt: skip


def plan_jobs(settings: TrainSettings) -> list[PlannedJob]:
    """Every selected (dataset, method) job, each after the job it depends on."""
    layout = StoreLayout.at(settings.store)
    found = layout.stores()
    available = sorted({d for d, _ in found})
    if not available:
        raise StoreError(f"no feature store under {settings.store}: run `wf extract` first")
    chosen = list(settings.datasets) if settings.datasets else available
    missing = [d for d in chosen if d not in available]
    if missing:
        raise StoreError(
            f"not in {settings.store}: {', '.join(missing)}; it has {', '.join(available)}"
        )
    runs = RunsLayout(settings.runs)
    jobs = []
    for dataset in chosen:
        backbones = [b for d, b in found if d == dataset]
        own = settings.backbone or (
            DEFAULT_BACKBONE if DEFAULT_BACKBONE in backbones else backbones[0]
        )
        if own not in backbones:
            raise StoreError(
                f"{dataset} has no store for backbone {own}; it has {', '.join(backbones)}"
            )
        for method in in_dependency_order(settings.methods):
            names = [own, *(b for b in backbones if b != own)] if method.all_backbones else [own]
            depends = job_key(dataset, method.depends_on) if method.depends_on else None
            try:
                stores = [_open_verified(layout, dataset, b) for b in names]
                _check_method(method, stores[0])
                if len({s.manifest.classes for s in stores}) > 1:
                    raise StoreError(f"{dataset}: its backbones' stores have different classes")
            except (StoreError, SettingsError) as error:
                jobs.append(PlannedJob(dataset, method.name, None, depends, str(error)))
                continue
            context = JobContext(
                dataset=dataset, method=method.name, classes=stores[0].manifest.classes,
                dataset_root=stores[0].manifest.dataset_root,
                stores=tuple(store_snapshot(s) for s in stores), store_filesystem=layout.filesystem,
                runs=runs, recipe=settings.recipes[method.name], options=settings.options,
            )  # fmt: skip
            jobs.append(PlannedJob(dataset, method.name, context, depends))
    return jobs


ProgressHook = Callable[[dict[str, dict]], None]


def _stale(jobs: list[PlannedJob], runs: RunsLayout) -> set[str]:
    """The jobs with artifacts trained on another content of their stores than today's (their
    labelled rows changed since): retrained, not kept. Unlabelled images change nothing."""
    stale = set()
    for job in jobs:
        files = runs.job(job.dataset, job.method)
        if job.context is None or not files.exists():
            continue
        try:
            metrics = files.metrics()
        except StoreError:
            continue  # reported as it is kept
        stores = job.context.stores
        if metrics.store_ids:
            now, then = {s.backbone: s.labelled_id for s in stores}, metrics.store_ids
        else:  # written before store_ids: the whole manifest's id
            now, then = {s.backbone: s.manifest_id for s in stores}, metrics.manifest_ids
        if then and then != now:
            stale.add(job.key)
    return stale


def _forget(runs: RunsLayout, dataset: str, method: str) -> None:
    """Remove a job's artifacts, Ray Train folder and checkpoints: it trains again."""
    runs.job(dataset, method).remove()
    delete_folder(runs.location.filesystem, runs.ray_run_dir(job_run_name(dataset, method)))
    runs.checkpoints(dataset, method).remove()


def _kept(job: PlannedJob, runs: RunsLayout) -> JobResult:
    return JobResult.from_artifacts(
        runs.job(job.dataset, job.method), "kept", "kept: it has artifacts (--force retrains)"
    )


def _failure(job: PlannedJob, error: BaseException, seconds: float) -> JobResult:
    lines = str(error).strip().splitlines()
    cause = getattr(error, "cause", None)
    kind = type(cause or error).__name__
    return JobResult(job.dataset, job.method, "failed", seconds=seconds,
                     error=f"{kind}: {lines[-1] if lines else ''}"[:500])  # fmt: skip


def run_train_all(
    settings: TrainSettings, on_progress: ProgressHook | None = None
) -> list[JobResult]:
    """Run every planned job; one failed job is reported and does not stop the others."""
    jobs = plan_jobs(settings)
    from tasks.ensemble import ENSEMBLE

    runs = RunsLayout(settings.runs)
    stale = _stale(jobs, runs)
    for job in jobs if settings.force else [j for j in jobs if j.key in stale]:
        _forget(runs, job.dataset, job.method)
    for dataset in {job.dataset for job in jobs if job.key in stale}:
        _forget(runs, dataset, ENSEMBLE)  # built from members that are retrained
    results: dict[str, JobResult] = {}
    with ray_cluster(settings.cluster):
        options = settings.options
        limit = settings.max_concurrent_jobs or max(
            1, int(ray.cluster_resources().get("CPU", 1)) // (options.workers * options.threads)
        )
        board = JobBoard.options(scheduling_strategy=on_this_node()).remote()
        # No more pool workers than jobs to train: each one imports TensorFlow.
        to_train = sum(1 for j in jobs if j.context and not runs.job(j.dataset, j.method).exists())
        runner = (_PoolRunner(min(limit, max(1, to_train)), options.threads, options.max_failures,
                              gpus=1 if options.use_gpu else 0)
                  if options.workers == 1
                  else _TrainerPerJob(limit, max(1, min(limit * options.workers, to_train)),
                                      options.threads, options.max_failures))  # fmt: skip
        try:
            if settings.cv != 0:
                jobs = _cross_validated(jobs, runs, settings, runner, on_progress)
            _run_jobs(jobs, runs, runner, board, results, on_progress)
            extra = _ensembles(jobs, runs, settings, runner, results)
        finally:
            runner.close()
    ordered = [results[job.key] for job in jobs] + extra
    write_summary(runs, ordered)
    return ordered


def _cross_validated(
    jobs: list[PlannedJob], runs: RunsLayout, settings: TrainSettings,
    runner: _PoolRunner | _TrainerPerJob, on_progress: ProgressHook | None,
) -> list[PlannedJob]:  # fmt: skip
    """The jobs, those to train on stored rows carrying what cross-validation found (their
    dataset's folds fitted on the run's pool first); a dataset whose cross-validation fails
    fails those jobs with its error."""
    chosen: dict[str, list[PlannedJob]] = {}
    for job in jobs:
        if (job.context is not None and get_method(job.method).fits_on_rows
                and not runs.job(job.dataset, job.method).exists()):  # fmt: skip
            chosen.setdefault(job.dataset, []).append(job)
    if not chosen:
        return jobs
    keys = {job.key for planned in chosen.values() for job in planned}
    if on_progress is not None:
        on_progress({job.key: {"state": "cross-validating" if job.key in keys else "waiting",
                               "epochs": job.context.recipe.epochs if job.context else 0,
                               "epoch": 0} for job in jobs})  # fmt: skip
    pool, own = runner.cv_pool()
    replaced: dict[str, PlannedJob] = {}
    try:
        for planned in chosen.values():
            try:
                found = cross_validate_dataset([j.context for j in planned if j.context],
                                               settings.store, settings.cv, pool)  # fmt: skip
            except Exception as error:  # reported with its jobs; other datasets go on
                for job in planned:
                    replaced[job.key] = dataclasses.replace(
                        job, context=None, problem=f"cross-validation failed: {error}"[:500]
                    )
                continue
            for job in planned:
                if job.key in found and job.context is not None:
                    context = dataclasses.replace(job.context, cv=found[job.key])
                    replaced[job.key] = dataclasses.replace(job, context=context)
    finally:
        if own:
            pool.close()
    return [replaced.get(job.key, job) for job in jobs]


def _ensembles(
    jobs: list[PlannedJob], runs: RunsLayout, settings: TrainSettings,
    runner: _PoolRunner | _TrainerPerJob, results: dict[str, JobResult],
) -> list[JobResult]:  # fmt: skip
    """With ``--ensemble``: each cross-validated dataset's methods averaged into one saved model
    (:mod:`tasks.ensemble`), on the engine's pool; with ``beyond-noise``, only where
    cross-validation shows the average right more often than the best method beyond noise
    (else a skipped result that says why)."""
    from tasks.ensemble import ENSEMBLE

    if settings.ensemble == "off":
        return []
    offered: dict[str, tuple[PlannedJob, dict]] = {}
    for job in jobs:
        result = results.get(job.key)
        ensemble = ((result.cv or {}).get("choice") or {}).get("ensemble") if result else None
        if job.context is not None and ensemble and job.dataset not in offered:
            offered[job.dataset] = (job, {**ensemble, "folds": result.cv["folds"]})
    out: list[JobResult] = []
    build: list[tuple[PlannedJob, dict]] = []
    for dataset, (job, ensemble) in offered.items():
        unfinished = [
            m
            for m in ensemble["members"]
            if getattr(results.get(job_key(dataset, m)), "status", "") not in ("done", "kept")
        ]
        if unfinished:
            why = f"not built: {', '.join(unfinished)} did not finish"
        elif not job.context.has_split("validation"):
            why = "not built: no validation split to score it on"
        elif any(runs.job(dataset, m).model_name == Artifact.ONNX_MODEL
                 for m in ensemble["members"]):  # fmt: skip
            why = "not built: an average of model.onnx files is not built yet"
        elif settings.ensemble == "beyond-noise" and not ensemble["beats_best"]:
            why = (f"not built: within noise of {ensemble['against']} alone (McNemar "
                   f"p={ensemble['p_value']:.3f}); --ensemble always builds it")  # fmt: skip
        else:
            build.append((job, ensemble))
            continue
        out.append(JobResult(dataset, ENSEMBLE, "skipped", error=why))
    if not build:
        return out
    pool, own = runner.cv_pool()
    try:
        for job, ensemble in build:
            context = job.context
            assert context is not None
            store = FeatureStore.open(StoreLayout.at(settings.store), job.dataset,
                                      context.store.backbone)  # fmt: skip
            table = store.read_table("validation", ["path", "label_index"], first_copy_only=True)
            validation = list(zip(table["path"].to_pylist(), table["label_index"].to_pylist(),
                                  strict=True))  # fmt: skip
            pool.submit(job_key(job.dataset, ENSEMBLE), "build_ensemble", runs, job.dataset,
                        ensemble["members"], list(context.classes), context.dataset_root,
                        validation, ensemble)  # fmt: skip
        for outcome in pool.drain():
            dataset, _ = split_job_key(outcome.key)
            if outcome.error is not None:
                lines = str(outcome.error).strip().splitlines()
                out.append(
                    JobResult(
                        dataset,
                        ENSEMBLE,
                        "failed",
                        error=(f"{type(outcome.error).__name__}: {lines[-1] if lines else ''}")[
                            :500
                        ],
                    )
                )
            else:
                out.append(JobResult.from_artifacts(runs.job(dataset, ENSEMBLE), "done"))
    finally:
        if own:
            pool.close()
    return sorted(out, key=lambda r: r.dataset)


class _PoolRunner:
    """Jobs on the run's pool of long-lived workers (one worker a job), started at the first
    job to train (a run whose jobs are all kept starts none)."""

    def __init__(self, size: int, threads: int, max_failures: int, gpus: float = 0) -> None:
        self.settings = (size, threads, max_failures, gpus)
        self.pool: TrainingPool | None = None
        self.started: dict[str, float] = {}

    def has_room(self) -> bool:
        return self.pool is None or self.pool.free > 0

    def cv_pool(self) -> tuple[TrainingPool, bool]:
        """The run's pool, for cross-validation's small fits before the jobs (not the caller's
        to close)."""
        if self.pool is None:
            self.pool = TrainingPool(*self.settings)
        return self.pool, False

    def start(self, job: PlannedJob, board: object) -> None:
        if self.pool is None:
            self.pool = TrainingPool(*self.settings)
        self.started[job.key] = time.perf_counter()
        self.pool.submit(job.key, "run_job", job.context, board)

    @property
    def active(self) -> set[str]:
        return self.pool.running if self.pool else set()

    @property
    def busy(self) -> bool:
        return bool(self.pool and self.pool.busy)

    def wait(self) -> list[tuple[str, JobResult | None, BaseException | None, float]]:
        if self.pool is None:
            return []
        return [(o.key, o.value, o.error, time.perf_counter() - self.started[o.key])
                for o in self.pool.wait(timeout=1.0)]  # fmt: skip

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()


class _TrainerPerJob:
    """Jobs trained in sync on several workers: a Ray Train run each, its runner a task on the
    driver's node (so losing a worker node never takes the runner)."""

    def __init__(self, limit: int, pool_size: int, threads: int, max_failures: int) -> None:
        self.limit = limit
        self.pool_settings = (pool_size, threads, max_failures)
        self.running: dict[ray.ObjectRef, tuple[str, float]] = {}

    def has_room(self) -> bool:
        return len(self.running) < self.limit

    def cv_pool(self) -> tuple[TrainingPool, bool]:
        """A pool of its own for cross-validation's small fits (the caller closes it)."""
        return TrainingPool(*self.pool_settings), True

    def start(self, job: PlannedJob, board: object) -> None:
        task = run_job_task.options(scheduling_strategy=on_this_node())
        self.running[task.remote(job.context, board)] = (job.key, time.perf_counter())

    @property
    def active(self) -> set[str]:
        return {key for key, _ in self.running.values()}

    @property
    def busy(self) -> bool:
        return bool(self.running)

    def wait(self) -> list[tuple[str, JobResult | None, BaseException | None, float]]:
        if not self.running:
            return []
        ready, _ = ray.wait(list(self.running), num_returns=1, timeout=1.0)
        out: list[tuple[str, JobResult | None, BaseException | None, float]] = []
        for ref in ready:
            key, started = self.running.pop(ref)
            try:
                out.append((key, ray.get(ref), None, time.perf_counter() - started))
            except Exception as error:  # a failed job is reported, others go on
                out.append((key, None, error, time.perf_counter() - started))
        return out

    def close(self) -> None:
        pass


def _run_jobs(
    jobs: list[PlannedJob], runs: RunsLayout, runner: _PoolRunner | _TrainerPerJob,
    board: object, results: dict[str, JobResult], on_progress: ProgressHook | None,
) -> None:  # fmt: skip
    """Start each job once what it depends on is done and the runner has room; collect."""
    waiting, planned = list(jobs), {job.key for job in jobs}
    by_key = {job.key: job for job in jobs}
    while waiting or runner.busy:
        for job in list(waiting):
            if not runner.has_room():
                break
            if job.depends_on in planned and job.depends_on not in results:
                continue  # what it starts from is not there yet
            waiting.remove(job)
            needed = results.get(job.depends_on) if job.depends_on else None
            if job.context is None:
                results[job.key] = JobResult(job.dataset, job.method, "failed", error=job.problem)
            elif needed is not None and needed.status not in ("done", "kept"):
                reason = f"{job.depends_on} did not finish"
                results[job.key] = JobResult(job.dataset, job.method, "skipped", error=reason)
            elif runs.job(job.dataset, job.method).exists():
                results[job.key] = _kept(job, runs)
            else:
                runner.start(job, board)
        if not runner.busy:
            continue
        for key, value, error, seconds in runner.wait():
            if error is not None:  # a failed job is reported, others go on
                results[key] = _failure(by_key[key], error, seconds)
            else:
                results[key] = value
        if on_progress is not None:
            on_progress(_status(jobs, results, runner.active, board))


def _status(
    jobs: list[PlannedJob], results: dict[str, JobResult], active: set[str], board: object
) -> dict[str, dict]:
    try:
        posted = ray.get(board.all.remote(), timeout=5)  # type: ignore[attr-defined]
    except Exception:  # progress is for people; the run goes on
        posted = {}
    status = {}
    for job in jobs:
        epochs = job.context.recipe.epochs if job.context else 0
        if job.key in results:
            status[job.key] = {"state": results[job.key].status, "epochs": epochs,
                               "epoch": results[job.key].epochs}  # fmt: skip
        else:
            state = "running" if job.key in active else "waiting"
            epoch = posted[job.key].epoch if job.key in posted else 0
            status[job.key] = {"state": state, "epochs": epochs, "epoch": epoch}
    return status


def check_results(results: list[JobResult]) -> None:
    """Raise :class:`RunFailed` when any job failed (exit 1); the others' artifacts are kept."""
    failed = [r for r in results if r.status == "failed"]
    if failed:
        raise RunFailed(f"{len(failed)} of {len(results)} jobs failed")
