"""The README's raw Ray recipe, run exactly as the README prints it (read from README.md): the real
`ray job submit` CLI against the session head, from a copy of the repository whose data/ is
git-ignored as in a fresh clone; the run folder appears where the README says, SUCCEEDED."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, ftlaunch_cli
from tests.readme import command_lines, shell_blocks

pytestmark = pytest.mark.integration


def recipe() -> tuple[list[str], str]:
    """The README block that holds the `ray job submit` line: its ftlaunch lines, then that line."""
    [submit] = command_lines("ray")
    block = next(b for b in shell_blocks() if submit in b)
    return command_lines("ftlaunch", [block]), submit


@pytest.fixture
def clone(tmp_path) -> Path:
    """The repository's tracked files, as a fresh clone holds them (.gitignore included)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    root = tmp_path / "clone"
    for name in filter(None, files.decode().split("\0")):
        if (ROOT / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, root / name)
    return root


def shell(line: str, cwd: Path, head) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": head.address,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=400)


def test_the_readme_raw_ray_recipe_runs_as_written(ray_head, clone):
    makes, submit = recipe()
    for line in makes:
        out = subprocess.run([*ftlaunch_cli(), *shlex.split(line, comments=True)[1:]], cwd=clone,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
    out = shell(submit, clone, ray_head)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    [run_dir] = (clone / "runs").iterdir()  # runs/<submission id>, as the README says
    assert run_dir.name.startswith("raysubmit_")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "SUCCEEDED" and manifest["summary"]["steps"] == 30
    assert manifest["spec"]["data"]["train"] == str(clone / "data" / "demo" / "train.parquet")

    # Without the absolute storage the run would vanish with Ray's copy: refused, one line, the fix.
    out = shell(submit.replace(" storage=$PWD/runs", ""), clone, ray_head)
    assert out.returncode != 0
    # (Ray's CLI prints the job's log twice: as it tails it, then in the failure message.)
    [error] = {line for line in (out.stdout + out.stderr).splitlines() if "ftlaunch: error:" in line}
    assert "storage ./runs is relative" in error and "storage=$PWD/runs" in error, error
    assert len(list((clone / "runs").iterdir())) == 1
