"""Preemption against Ray Train's own report path, on the session's real head: the checkpoint a
notice asked for is the one the retry starts from, even when rank 0 is slow to write it and the
notice came to another rank (the slow upload is injected; Ray Train registers a checkpoint once every rank's report is taken;
a rank that ended first used to be seen failed before it, and the retry began a report earlier)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

STEPS, EVERY, NOTICE_AT = 6, 2, 3


def _train(config: dict) -> None:
    import ray.train

    from jobs import preempt
    from jobs.loop import Loop

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    run_dir = Path(config["run_dir"])
    notice = preempt.listen(grace_s=120)
    loop = Loop(str(run_dir), STEPS, EVERY, rank=rank, world=world)
    step = loop.resume(lambda path: int(Path(path, "step").read_text()))
    first_attempt = step == 0

    if rank == 0:  # slow storage: rank 0's upload (after the ranks' report barrier) takes 3 s
        from ray.train.v2._internal.execution.context import TrainContext

        upload = TrainContext._upload_checkpoint

        def slow_upload(self, *args, **kwargs):
            time.sleep(3)
            return upload(self, *args, **kwargs)

        TrainContext._upload_checkpoint = slow_upload

    def save(path: str) -> None:
        Path(path, "step").write_text(str(step))

    while step < STEPS:
        step += 1
        if first_attempt and rank == 1 and step == NOTICE_AT:
            os.kill(os.getpid(), signal.SIGTERM)  # a spot reclaim's notice, to rank 1 alone
            while not notice.flag.is_set():
                time.sleep(0.01)
        if loop.due(step):
            loop.report(loop.record(step, loss=0.0, attempt="first" if first_attempt else "retry"), save=save)


def test_the_retry_starts_from_the_preempted_checkpoint_when_rank_0_writes_it_slowly(ray_local, tmp_path):
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    trainer = TorchTrainer(
        _train, train_loop_config={"run_dir": str(run_dir)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="preempt-report", storage_path=str(tmp_path / "storage"),
                             failure_config=FailureConfig(max_failures=1)))
    result = trainer.fit()
    assert result.error is None, result.error
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # The preempted report at the notice's step survived (a retry from step 2's checkpoint would
    # have truncated it), and the retry went on from it: step 4 and 6, each once.
    assert [(r["step"], r["attempt"], r.get("preempted", False)) for r in records] == [
        (2, "first", False), (3, "first", True), (4, "retry", False), (6, "retry", False)], records
