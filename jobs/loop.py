"""One training loop's bookkeeping, written once: when to report, the throughput window, the
metrics record, report + checkpoint, resume, and the wrapper every training process runs in.

The finetune, DeepSpeed and pipeline-stage loops checkpoint through Ray Train's report; the
multitask workers (plain Ray tasks) keep the same state in a progress file under `.progress/`.
Each loop's file keeps only its algorithm: what a step does, what its state holds.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

from common.runfolder import EVENTS, METRICS, PROGRESS, dir_size, is_no_space, no_space
from jobs import checkpoints, preempt
from jobs.artifacts import RunDir, say


def mean_loss(losses: list) -> Optional[float]:
    """The mean of a report window's losses: one host sync for all of them (tensors stacked)."""
    if not losses:
        return None
    if not any(hasattr(v, "detach") for v in losses):
        return sum(losses) / len(losses)
    import torch

    return float(torch.stack([torch.as_tensor(v, dtype=torch.float32).reshape(()) for v in losses]).mean())


class Loop:
    """The bookkeeping of one loop over `total_steps` steps, reporting every `report_every`.

    `fields` go first into every record (`stage`, `task`) and tell this loop's records from
    others' in a shared metrics file (`metrics`: its name).
    `progress`: a file path; the state goes there instead of into Ray Train's checkpoints.
    `every_rank_saves`: each rank writes its part of the checkpoint (DeepSpeed's ZeRO shards);
    otherwise rank 0 writes it and the other ranks report the record alone.
    """

    def __init__(self, run_dir, total_steps: int, report_every: int, *, rank: int = 0, world: int = 1,
                 metrics: str = METRICS, fields: Optional[dict] = None, progress: Optional[str] = None,
                 every_rank_saves: bool = False):
        self.run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(str(run_dir))
        self.total_steps, self.report_every = total_steps, report_every
        self.rank, self.world = rank, world
        self.fields = dict(fields or {})
        self.metrics = metrics
        self.progress = Path(progress) if progress else None
        self.every_rank_saves = every_rank_saves
        self.started = self._window_start = time.time()
        self.total, self._window, self._losses = 0, 0, []
        self.preempting = False

    def begin(self) -> None:
        """The clock starts here: after the setup, as the first batch is asked for."""
        self.started = self._window_start = time.time()

    # -- when ----------------------------------------------------------------------------------

    def due(self, step: int) -> bool:
        """A report (and checkpoint) after this step: every `report_every` steps, the last, and the
        step at which the ranks learn of a preemption notice (jobs/preempt.py: every rank asks at
        every step, so the question is here; `report` then ends the attempt)."""
        notice = preempt.current()
        self.preempting = bool(notice and notice.agreed(self.world)) and step < self.total_steps
        return self.preempting or step % self.report_every == 0 or step >= self.total_steps

    def final(self, step: int) -> bool:
        return step >= self.total_steps

    # -- what happened since the last report ---------------------------------------------------

    def add(self, loss, count: int = 0) -> None:
        """One step's (or micro-batch's) loss, a float or a 0-d tensor kept where it is (on the
        GPU: read once per report, not once per step), and the tokens or rows it consumed."""
        self._losses.append(loss.detach() if hasattr(loss, "detach") else float(loss))
        self._window += count
        self.total += count

    def rate(self) -> float:
        """Tokens (or rows) per second since the last report."""
        return self._window / max(time.time() - self._window_start, 1e-9)

    def throughput(self) -> dict:
        return {"tokens": self.total, "tokens_per_s": self.rate()}

    def stepped(self, step: int) -> None:
        """Marks the first optimizer step in events.jsonl (bench/spine.py times the start-up by it)."""
        if step == 1 and self.rank == 0:
            self.run_dir.append(EVENTS, {"event": "first_step", "time": time.time()})

    def record(self, step: int, loss: Optional[float] = None, **extra) -> dict:
        """The metrics record of a report: the loss is the mean since the last record."""
        if loss is None:
            loss = mean_loss(self._losses)
        now = time.time()
        return {**self.fields, "step": step, "loss": loss, **extra,
                "elapsed_s": now - self.started, "time": now}

    # -- report, checkpoint, resume ------------------------------------------------------------

    def report(self, record: dict, save: Optional[Callable[[str], Any]] = None,
               extra: Optional[dict] = None) -> None:
        """Rank 0 appends `record` to the metrics file; `save(path)` writes the state at `path`
        (a fresh folder for Ray Train, a file for a progress file); Ray Train gets the record
        plus `extra` (what only the driver reads) with the checkpoint. The window then restarts."""
        if self.preempting:
            record = {**record, "preempted": True}
        if self.rank == 0:
            self.run_dir.append(self.metrics, record)
        if self.progress is not None:
            if save is not None:
                self.progress.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.progress.with_suffix(".tmp")
                save(str(tmp))
                os.replace(tmp, self.progress)  # atomic: a worker killed mid-save loses nothing
        else:
            import ray.train

            reported = {**record, **(extra or {})}
            if save is not None and (self.rank == 0 or self.every_rank_saves):
                path = tempfile.mkdtemp(prefix="ftl-ckpt-")
                try:
                    save(path)
                    checkpoints.write_listing(path, self.rank, self.world if self.every_rank_saves else 1)
                    try:
                        ray.train.report(reported, checkpoint=ray.train.Checkpoint.from_directory(path))
                    except OSError as exc:  # Ray Train's upload into storage (pyarrow's, no path in it)
                        if not is_no_space(exc):
                            raise
                        raise no_space(self.run_dir.path, dir_size(path)) from exc
                finally:  # Ray Train copied it into the run's storage
                    shutil.rmtree(path, ignore_errors=True)
            else:
                ray.train.report(reported)
        self._losses, self._window, self._window_start = [], 0, time.time()
        self.run_dir.sync()  # a run in object storage: this process's records reach the store now
        if self.preempting:
            if self.progress is None:
                # Ray Train registers a checkpoint once every rank's report of it is taken. Rank 0
                # uploads it while the others' reports are already queued: a rank that ended now
                # could be seen failed first, and the retry would start from the checkpoint
                # before. So each rank waits until its report is taken, then for the others.
                _await_report_taken()
                preempt.barrier(self.world)
            raise preempt.Preempted(f"Preempted: a worker was told to stop (SIGTERM); checkpoint at step "
                                    f"{record['step']}, where the retry (or ftlaunch resume) continues")

    def has_state(self) -> bool:
        """Whether an earlier attempt left a checkpoint (or progress file) to continue from."""
        if self.progress is not None:
            return self.progress.exists()
        import ray.train

        return ray.train.get_checkpoint() is not None

    def restore(self, load: Callable[[str], Any]) -> Any:
        """`load(path)` on the last report's state (Ray Train's checkpoint folder or the progress
        file) and its result; None when there is none."""
        if self.progress is not None:
            return load(str(self.progress)) if self.progress.exists() else None
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as path:
            return load(path)

    def truncate(self, step: int) -> None:
        """Drop this loop's records past `step`: they will be written again, and none twice."""
        if self.rank == 0:
            mine = self.fields.items()
            self.run_dir.truncate_jsonl(
                self.metrics, lambda r: any(r.get(k) != v for k, v in mine) or r["step"] <= step)

    def resume(self, load: Callable[[str], Optional[int]]) -> int:
        """Restore through `load(path)` (it returns the step reached) and truncate the metrics
        past it; 0 on a fresh start."""
        step = self.restore(load) or 0
        self.truncate(step)
        if step and self.rank == 0:
            say(f"[ftlaunch] resumed at step {step} from the last checkpoint")
        return step


def _await_report_taken(timeout_s: float = 60.0) -> None:
    """Wait until Ray Train's controller has polled this rank's last report off its queue
    (Ray Train 2.60 keeps it in the worker's execution context; its poll marks it done)."""
    from ray.train.v2._internal.execution.context import get_train_context

    queue = get_train_context().execution_context.result_queue
    deadline = time.monotonic() + timeout_s
    while queue.unfinished_tasks and time.monotonic() < deadline:
        time.sleep(0.05)


def progress_file(run_dir, key: str) -> str:
    """Where a multitask worker keeps its progress (key: task-<name>, or pack)."""
    return str(Path(str(run_dir)) / PROGRESS / f"{key}.pt")


# ---------------------------------------------------------------------------------------------
# The process every loop runs in


def quiet_ray_train() -> None:
    """Drop Ray Train's per-report INFO lines (one per rank per report) from the job's log;
    ftlaunch prints its own progress line per report."""
    import logging

    from ray.train.v2._internal.execution import context, storage

    for name in (context.__file__, storage.__name__):
        logging.getLogger(name).setLevel(logging.WARNING)


@contextlib.contextmanager
def plain_errors():
    """Re-raise worker errors as RuntimeError carrying type and message.

    Some library exceptions cannot be unpickled on the driver (transformers' config validation
    errors need extra constructor arguments), which would replace the real cause with a
    TypeError. The full traceback stays in the worker's log.
    """
    try:
        yield
    except preempt.Preempted:
        raise  # plain already, and what the multitask worker and Ray Train's retry look for
    except Exception as exc:
        traceback.print_exc()
        raise RuntimeError(f"{type(exc).__name__}: {exc}") from None


@contextlib.contextmanager
def worker_scope(env: dict, run_dir, name: str | None = None, grace_s: float | None = None):
    """How every training process starts: its output teed into `<run_dir>/logs/<name>.log`
    (secrets redacted), the spec's `env:` references resolved from the cluster's environment,
    worker errors made plain, and SIGTERM taken as a preemption notice (`grace_s`: jobs/preempt.py).
    `name` defaults to `worker-<rank>` of the Ray Train run.
    """
    from jobs.logs import Tee, resolve_env_refs, secret_values
    from jobs.preempt import listen

    if name is None:
        import ray.train

        name = f"worker-{ray.train.get_context().get_world_rank()}"
    env = env or {}
    with plain_errors():
        resolve_env_refs(env)
    folder = RunDir(str(run_dir))
    log = folder.path / "logs" / f"{name}.log"
    try:
        with Tee(log, secret_values(env), header=f"{name} pid {os.getpid()}"):
            with plain_errors():
                notice = listen(grace_s, str(folder.path)) if grace_s is not None else None
                try:
                    yield
                finally:
                    if notice is not None:
                        notice.armed = False
    finally:
        folder.sync()  # a run in object storage: this worker's log and files, whole


def _here(spec: dict) -> dict:
    """The spec with the model and adapter it starts from as this node's copies, when they are in
    the run's folder in object storage (an earlier stage's export, written on another node)."""
    from jobs.artifacts import on_this_node

    spec = dict(spec)
    source = (spec.get("model") or {}).get("source", "")
    if source.startswith("hf:"):
        spec["model"] = {**spec["model"], "source": "hf:" + on_this_node(source[len("hf:"):])}
    if spec.get("init_adapter"):
        spec["init_adapter"] = on_this_node(spec["init_adapter"])
    return spec


def run_worker(body: Callable, config: dict) -> None:
    """A Ray Train worker: `body(spec, config)` with the spec validated back into its model
    (it travels as JSON in `config["spec"]`), in the worker scope, Ray Train's chatter quieted."""
    from jobs.watch import NoRetry, record_fatal
    from launcher.spec import validate

    quiet_ray_train()
    config = {**config, "run_dir": str(RunDir(config["run_dir"]).path)}  # this node's mirror of a run in a store
    spec = validate(_here(config["spec"]))
    train = getattr(spec, "train", None)
    with worker_scope(spec.env, config["run_dir"], grace_s=getattr(train, "preemption_grace_s", None)):
        try:
            body(spec, config)
        except NoRetry as exc:  # the driver ends the job with its line (jobs/watch.py watch_fatal)
            record_fatal(config["run_dir"], str(exc))
            raise
