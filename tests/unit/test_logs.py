"""jobs/logs.py: the log tee (both copies, secrets redacted even split across writes) and the
env: references resolved from the environment the job runs in."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from jobs.logs import resolve_env_refs, secret_values

SECRET = "s3cr3t-" + "x" * 20


def test_tee_copies_everything_written_to_fds_1_and_2_with_secrets_redacted(tmp_path):
    script = f"""
import os, subprocess, sys
sys.path.insert(0, {str(os.getcwd())!r})
from jobs.logs import Tee
with Tee({str(tmp_path / 'logs' / 'x.log')!r}, [{SECRET!r}], header="attempt 1"):
    print("python print {SECRET}")
    sys.stdout.flush()
    os.write(2, b"stderr {SECRET[:9]}")
    os.write(2, b"{SECRET[9:]} split over two writes\\n")
    subprocess.run(["echo", "child process {SECRET}"])
print("after the tee")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    log = (tmp_path / "logs" / "x.log").read_text()
    assert log.startswith("=== attempt 1 ")
    for line in ("python print ***", "stderr *** split over two writes", "child process ***"):
        assert line in log and line in out.stdout  # the file and the process's own output
    assert SECRET not in log + out.stdout + out.stderr
    assert "after the tee" in out.stdout and "after the tee" not in log


def test_env_references_resolve_from_the_environment_and_name_what_is_missing(monkeypatch):
    monkeypatch.setenv("CLUSTER_TOKEN", SECRET)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    env = {"HF_TOKEN": "env:CLUSTER_TOKEN", "PLAIN": "value", "K8S_TOKEN": "secret:hf/token"}
    assert resolve_env_refs(env) == ["HF_TOKEN"]
    assert os.environ["HF_TOKEN"] == SECRET
    assert secret_values(env) == [SECRET]
    with pytest.raises(RuntimeError, match="env.X_TOKEN: NOT_SET_ANYWHERE is not set in the cluster's environment"):
        resolve_env_refs({"X_TOKEN": "env:NOT_SET_ANYWHERE"})


def test_the_tee_never_leaves_half_a_character_in_the_file():
    from jobs.logs import _char_boundary

    data = "a✔️b".encode()  # 1 + 3 + 3 + 1 bytes
    assert [_char_boundary(data, i) for i in range(len(data) + 1)] == [0, 1, 1, 1, 4, 4, 4, 7, 8]
    assert _char_boundary(data[:3], 3) == 1  # an unfinished character at the end waits
    assert _char_boundary(data[:4], 4) == 4
