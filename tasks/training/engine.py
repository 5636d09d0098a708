"""The training engine: long-lived workers that each import TensorFlow once and then run job
after job, fed from a queue, for a whole ``wf train-all`` (and for any number of small fits).

Why Ray Core actors and not one Ray Train run whose workers pull jobs: a Ray Train worker group
is one fixed-size gang. One lost worker restarts every worker of the group (each slot's job
would restart from its checkpoint, not only the lost one's), the group re-forms only where all
of its workers fit again (after a node is lost, a gang sized for the whole cluster does not),
and Train v2's ``report`` is a collective that every worker of the group joins, which
independent jobs cannot do. Ray's own answer for many small models is long-lived actors (Ray
Tune's ``reuse_actors`` is built on them). So each job that trains on one worker (the default)
runs on a :class:`TrainingWorker` of a :class:`TrainingPool`; a job that trains one model in sync
on several workers (``--workers 2``) still gets its own Ray Train run, whose gang
``MultiWorkerMirroredStrategy`` needs (:func:`tasks.training.job.run_job`).

A worker that dies (its node lost, killed, out of memory) is replaced, and what it was running
goes to the next free worker: a job resumes from its last epoch checkpoint in the runs folder.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray

from tasks.methods import JobContext

CLEAR_KERAS_EVERY = 8  # jobs


class TrainingWorker:
    """One long-lived training process: TensorFlow and both Kerases imported once, the job's
    threads set once, backbone weights resolved once, then any number of jobs and small fits.
    A plain class (tests call it in-process); :data:`TrainingWorkerActor` is its Ray actor."""

    def __init__(self, threads: int = 1) -> None:
        from tasks.training.worker import set_threads

        set_threads(threads)
        import keras  # noqa: F401  (Keras 3: the saved models)
        import tf_keras  # noqa: F401  (training)

        self._weights: dict = {}
        self._fits: dict = {}
        self.jobs_run = 0

    def ready(self) -> dict[str, Any]:
        """Where this worker runs (its node and process), once it is ready for work."""
        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
        return {"node": node, "pid": os.getpid()}

    def run_job(self, context: JobContext, board: Any, retry: bool = False) -> Any:
        """Train, score and save one job here (:func:`tasks.training.job.run_job_here`)."""
        from tasks.training.job import run_job_here

        try:
            return run_job_here(context, board, self._weights, retry=retry)
        finally:
            self.jobs_run += 1
            self._clear()

    def fit_rows(self, problem: Any, splits: list[tuple[np.ndarray, np.ndarray]]) -> list[Any]:
        """Small fits of one problem (:func:`tasks.training.small_fits.fit_and_predict`)."""
        from tasks.training.small_fits import fit_and_predict

        if isinstance(problem, ray.ObjectRef):
            problem = ray.get(problem)
        return [fit_and_predict(problem, train, held, self._fits) for train, held in splits]

    def build_ensemble(self, *args: Any) -> Any:
        """A dataset's methods averaged into one saved model (:mod:`tasks.ensemble`)."""
        from tasks.ensemble import build_ensemble

        try:
            return build_ensemble(*args)
        finally:
            self.jobs_run += 1
            self._clear()

    def _clear(self) -> None:
        """Free the finished job's graphs: a worker lives for many jobs. Keras 3's
        ``clear_session`` runs a full garbage collection (0.6 s here), so every few jobs."""
        import keras
        import tf_keras

        tf_keras.backend.clear_session()
        if self.jobs_run % CLEAR_KERAS_EVERY == 0:
            keras.backend.clear_session()


TrainingWorkerActor = ray.remote(max_restarts=0, max_task_retries=0)(TrainingWorker)


@dataclass
class _Work:
    key: str
    call: str  # a method of TrainingWorker
    args: tuple
    attempts: int = 0


@dataclass(frozen=True)
class Outcome:
    """What became of one submitted piece of work: its value, or the error that ended it."""

    key: str
    value: Any = None
    error: BaseException | None = None
    attempts: int = 1


class TrainingPool:
    """``size`` :class:`TrainingWorker` actors of ``threads`` CPUs each, spread over the
    cluster's nodes, and a queue of work for them: :meth:`submit`, then :meth:`wait` for what
    finished. A worker that dies is replaced and its work queued again, up to
    ``max_failures`` times for one piece of work (then it is reported as failed). Workers
    that keep dying as they start (more than twice the pool's size in a row) end the queued
    work with that error rather than waiting for ever. ``gpus``: GPUs per worker."""

    def __init__(self, size: int, threads: int = 1, max_failures: int = 2, gpus: float = 0) -> None:
        self.size, self.threads, self.max_failures = max(1, size), threads, max_failures
        self.gpus = gpus
        self.start_failures = 0  # in a row
        self._starting: dict[ray.ObjectRef, Any] = {}
        self._idle: list[Any] = []
        self._running: dict[ray.ObjectRef, tuple[_Work, Any]] = {}
        self._queue: deque[_Work] = deque()
        self.workers: dict[Any, dict[str, Any]] = {}  # actor -> where it runs
        self.replaced = 0
        for _ in range(self.size):
            self._start_worker()

    def _start_worker(self) -> None:
        actor = TrainingWorkerActor.options(
            num_cpus=self.threads, num_gpus=self.gpus, scheduling_strategy="SPREAD"
        ).remote(self.threads)
        self._starting[actor.ready.remote()] = actor

    def submit(self, key: str, call: str, *args: Any) -> None:
        """Queue ``TrainingWorker.<call>(*args)``; it runs on the next free worker."""
        self._queue.append(_Work(key, call, args))
        self._dispatch()

    @property
    def running(self) -> set[str]:
        return {work.key for work, _ in self._running.values()}

    @property
    def busy(self) -> bool:
        return bool(self._queue or self._running)

    def worker_of(self, key: str) -> Any:
        """The actor running ``key`` now (None while it waits for a free worker)."""
        return next((a for work, a in self._running.values() if work.key == key), None)

    @property
    def free(self) -> int:
        """Workers (started or starting) with nothing queued for them."""
        return max(0, len(self._idle) + len(self._starting) - len(self._queue))

    def _dispatch(self) -> None:
        while self._queue and self._idle:
            work, actor = self._queue.popleft(), self._idle.pop(0)
            args = (*work.args, True) if work.call == "run_job" and work.attempts else work.args
            self._running[getattr(actor, work.call).remote(*args)] = (work, actor)

    def wait(self, timeout: float | None = None) -> list[Outcome]:
        """What finished within ``timeout`` seconds (at least one piece, unless it ran out)."""
        refs = [*self._running, *self._starting]
        if not refs:
            return []
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        if ready:  # and whatever else is ready by now
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        done: list[Outcome] = []
        for ref in ready:
            if ref in self._starting:
                actor = self._starting.pop(ref)
                try:
                    self.workers[actor] = ray.get(ref)
                    self._idle.append(actor)
                    self.start_failures = 0
                except ray.exceptions.RayActorError as error:  # it died starting
                    self.start_failures += 1
                    if self.start_failures <= 2 * self.size:
                        self._replace(actor)
                    elif not (self._idle or self._running or self._starting):
                        while self._queue:  # no worker can start: say so, do not hang
                            work = self._queue.popleft()
                            done.append(Outcome(work.key, error=error, attempts=work.attempts))
                continue
            work, actor = self._running.pop(ref)
            try:
                value = ray.get(ref)
            except ray.exceptions.RayActorError as error:
                self._replace(actor)
                work.attempts += 1
                if work.attempts > self.max_failures:
                    done.append(Outcome(work.key, error=error, attempts=work.attempts))
                else:
                    self._queue.appendleft(work)
                continue
            except Exception as error:  # the work failed; its worker is fine
                self._idle.append(actor)
                done.append(Outcome(work.key, error=error, attempts=work.attempts + 1))
                continue
            self._idle.append(actor)
            done.append(Outcome(work.key, value=value, attempts=work.attempts + 1))
        self._dispatch()
        return done

    def _replace(self, actor: Any) -> None:
        """A new worker for one that died (killed too, in case it was only unreachable)."""
        with contextlib.suppress(Exception):
            ray.kill(actor, no_restart=True)
        self.workers.pop(actor, None)
        self.replaced += 1
        self._start_worker()

    def started(self, timeout: float | None = None) -> int:
        """Wait, before any work is submitted, until every worker has started or ``timeout``
        seconds passed; how many workers are ready."""
        if self.busy:
            raise RuntimeError("wait for the workers to start before submitting work")
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._starting:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            self.wait(timeout=left)
        return len(self.workers)

    def drain(self) -> list[Outcome]:
        """Wait for everything submitted."""
        out: list[Outcome] = []
        while self.busy:
            out.extend(self.wait(timeout=1.0))
        return out

    def close(self) -> None:
        for actor in [
            *self._idle,
            *self._starting.values(),
            *(a for _, a in self._running.values()),
        ]:
            ray.kill(actor, no_restart=True)
        self._idle, self._starting, self._running = [], {}, {}

    def __enter__(self) -> TrainingPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
