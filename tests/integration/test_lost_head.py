"""A lost head (issue 20 item 1): the session's head is stopped under a running job, as
`ftlaunch cluster down` (or a machine restart) does, and a new one started on new ports. The run
is LOST with the time, and `ftlaunch resume` on the new head finishes it with every step once.

This module restarts the session head, so it holds no Ray connection of its own (`ray_local`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import launcher
from tests.integration.test_faults import steps_of, wait_for_step
from tests.integration.test_jobs import cli

pytestmark = [pytest.mark.integration, pytest.mark.slow]
STEPS = 100  # the head is stopped at step 10, synchronously: the run cannot end first


def assert_every_report_once(steps: list[int], every: int, total: int, lost_at: int) -> None:
    """Each report once, in order, none lost; besides them at most the checkpoint that a worker
    told to stop by the head's going writes at its next step (preemption, item 2), at `lost_at`."""
    assert steps == sorted(set(steps)), steps  # none twice
    assert [s for s in steps if s % every == 0] == list(range(every, total + every, every)), steps
    assert [s for s in steps if s % every] in ([], [lost_at]), (steps, lost_at)


def test_a_run_whose_head_is_stopped_is_lost_and_resumes_on_a_new_head_with_every_step_once(ray_head, tiny_spec):
    tiny_spec["train"].update(max_steps=STEPS, report_every=5)
    handle = launcher.submit(tiny_spec, "ray", address=ray_head.address, submission_id="ft-lost-head")
    run_dir = Path(handle.run_dir)
    wait_for_step(run_dir, 10)
    old = ray_head.address

    lost = ray_head.restart()  # the head and every process it started, the job's driver included
    assert ray_head.address != old
    assert [m["run_id"] for m in lost] == [run_dir.name]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "LOST" and manifest["finished"], manifest
    assert manifest["error"].startswith(f"Lost: its Ray head {old} was stopped (ftlaunch cluster down) at ")
    lost_at = steps_of(run_dir)[-1]
    assert 10 <= lost_at < STEPS

    status = cli("status", str(run_dir), "--address", ray_head.address)
    assert "LOST" in status.stdout and f"ftlaunch resume {run_dir}" in status.stdout, status.stdout

    out = cli("resume", str(run_dir), "--address", ray_head.address)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "SUCCEEDED" and manifest["summary"]["steps"] == STEPS
    assert [a["submission_id"] for a in manifest["attempts"]] == ["ft-lost-head", "ft-lost-head-resume1"]
    assert manifest["attempts"][-1]["address"] == ray_head.address  # the new head ran the rest
    assert_every_report_once(steps_of(run_dir), 5, STEPS, lost_at)


def test_a_pipeline_in_stage_two_and_a_multitask_run_lose_their_head_together_and_each_resumes(
        ray_head, vqa_data, mt_data, tmp_path):
    # One head lost under two runs of the other job shapes: the pipeline resumes in its stage 2
    # (stage 1 not re-run), the multitask run's adapter worker from its progress file.
    import time

    from tests.integration.test_multitask import spec_for
    from tests.integration.test_pipeline import metrics, mini_spec, sha

    # Stage 2 is ~25 ms a step and the multitask run ~75 ms: both long enough that the head goes
    # while each trains, and the multitask run is submitted once stage 1 reports, so that its
    # start overlaps the pipeline's hand-on from stage 1 to stage 2.
    lora_total, mt_total = 600, 800
    pipe_spec = mini_spec(vqa_data, tmp_path / "pipe", steps=(20, lora_total, 20))
    mt_spec = spec_for(mt_data, tmp_path)
    mt_spec["tasks"] = mt_spec["tasks"][:1]
    mt_spec["train"].update(max_steps=mt_total, report_every=10)
    pipe = launcher.submit(pipe_spec, "ray", address=ray_head.address, submission_id="pipe-lost-head")
    pipe_dir = Path(pipe.run_dir)

    def lora_steps():
        return [m["step"] for m in metrics(pipe_dir) if m["stage"] == "lora"]

    def mt_steps():
        f = mt_dir / "metrics-counting.jsonl"
        return [json.loads(x)["step"] for x in f.read_text().splitlines()] if f.exists() else []

    deadline = time.monotonic() + 300
    while not metrics(pipe_dir):
        assert time.monotonic() < deadline and pipe.status() in ("PENDING", "RUNNING"), pipe.logs()[-3000:]
        time.sleep(0.3)
    mt = launcher.submit(mt_spec, "ray", address=ray_head.address, submission_id="mt-lost-head")
    mt_dir = Path(mt.run_dir)
    while not (lora_steps() and lora_steps()[-1] >= 20 and mt_steps()):  # both have checkpointed
        assert time.monotonic() < deadline, (lora_steps(), mt_steps())
        assert pipe.status() in ("PENDING", "RUNNING") and mt.status() in ("PENDING", "RUNNING")
        time.sleep(0.3)
    lost = ray_head.restart()
    restarted = time.time()  # the first attempts' every process is gone: what they wrote is older
    assert sorted(m["run_id"] for m in lost) == sorted([pipe_dir.name, mt_dir.name])
    for run_dir in (pipe_dir, mt_dir):
        assert json.loads((run_dir / "manifest.json").read_text())["status"] == "LOST"
    stage1 = pipe_dir / "stages" / "texture" / "state.pt"
    digest = sha(stage1)
    mt_lost_at, lora_lost_at = mt_steps()[-1], lora_steps()[-1]
    assert 10 <= mt_lost_at < mt_total and lora_lost_at < lora_total

    out = cli("resume", str(pipe_dir), "--address", ray_head.address)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "stage texture: already SUCCEEDED, skipped" in out.stdout and sha(stage1) == digest
    stages = json.loads((pipe_dir / "pipeline.json").read_text())["stages"]
    assert [s["status"] for s in stages] == ["SUCCEEDED"] * 3
    assert_every_report_once(lora_steps(), 10, lora_total, lora_lost_at)  # stage 2
    assert f"step 10/{lora_total} " not in out.stdout.split("stage 2/3 lora")[-1], out.stdout[-3000:]  # not from its start

    out = cli("resume", str(mt_dir), "--address", ray_head.address)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    manifest = json.loads((mt_dir / "manifest.json").read_text())
    assert manifest["status"] == "SUCCEEDED" and len(manifest["attempts"]) == 2
    records = [json.loads(x) for x in (mt_dir / "metrics-counting.jsonl").read_text().splitlines()]
    assert_every_report_once([r["step"] for r in records], 10, mt_total, mt_lost_at)
    # ... and the resume continued from the progress file: the reports from before the loss stand.
    assert [r["step"] for r in records if r["time"] < restarted][-1] == mt_lost_at
