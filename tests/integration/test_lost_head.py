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
    assert steps_of(run_dir) == list(range(5, STEPS + 5, 5))  # every report once: none lost, none twice
