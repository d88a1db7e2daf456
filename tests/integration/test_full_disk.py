"""A full disk under a running job (issue 20 item 5), on a real small file system: the run's
storage is a tmpfs this test mounts. Mounting needs root (CAP_SYS_ADMIN); where it is refused
the test skips with the reason, and tests/unit/test_full_disk.py covers the same writes with the
fault injected at the write call.
"""

from __future__ import annotations

import errno
import json
import subprocess
from pathlib import Path

import pytest

import launcher
from common.runfolder import RESERVE
from tests.integration.test_faults import steps_of, wait_for_step
from tests.integration.test_jobs import cli

pytestmark = pytest.mark.integration
# The fill must land before the run's last step, whenever the test process gets the CPU back on
# a 2-core machine both workers keep busy: 200 steps (about 5 s here) once ended first on CI.
STEPS, EVERY = 600, 50


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"mounting a 64 MiB tmpfs was refused ({mounted.stderr.strip()}); "
                    "tests/unit/test_full_disk.py injects the fault at the write call instead")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)  # lazily: a Ray process may hold a file


def fill(disk: Path, leave: int) -> Path:
    """A ballast file that takes all of the disk's free space but `leave` bytes (the running job
    writes meanwhile: the ballast grows until the disk is full, then gives `leave` back)."""
    ballast = disk / "ballast"
    with open(ballast, "wb", buffering=0) as f:
        for chunk in (1 << 20, 4096):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
        f.truncate(max(0, f.tell() - leave))
    return ballast


def test_a_disk_that_fills_mid_run_fails_it_with_one_line_and_its_last_checkpoint_resumes(
        ray_head, tiny_spec, small_disk):
    tiny_spec["storage"] = str(small_disk / "runs")
    tiny_spec["train"].update(max_steps=STEPS, report_every=EVERY, max_failures=0)
    handle = launcher.submit(tiny_spec, "ray", address=ray_head.address, submission_id="ft-full-disk")
    run_dir = Path(handle.run_dir)
    wait_for_step(run_dir, 2 * EVERY)
    ballast = fill(small_disk, leave=64 << 10)  # room for the records and the manifest, not a checkpoint

    assert handle.wait(timeout=300) == "FAILED", handle.logs()[-3000:]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    line = manifest["error"]
    assert line.startswith(f"no space left on {run_dir}") and "bytes needed" in line and "\n" not in line, line
    assert "ftlaunch resume" in line
    print(line)
    failed_at = steps_of(run_dir)[-1]
    assert 2 * EVERY <= failed_at < STEPS
    # The driver's last manifest write found no room but the run's reserve, which then went back.
    assert not (run_dir / RESERVE).exists()
    status = cli("status", str(run_dir), "--address", ray_head.address)
    assert "FAILED" in status.stdout and line in status.stdout, status.stdout

    ballast.unlink()  # the user frees the space and resumes: the last whole checkpoint goes on
    out = cli("resume", str(run_dir), "--address", ray_head.address)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "SUCCEEDED" and manifest["summary"]["steps"] == STEPS
    assert steps_of(run_dir) == list(range(EVERY, STEPS + EVERY, EVERY))  # each once: the redone steps replaced
