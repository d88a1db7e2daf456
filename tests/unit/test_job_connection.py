"""The cluster side connects to Ray in one place, by its head's address, never "auto"
(tests/integration/test_ray_connection.py runs it with a second head on the machine)."""

from __future__ import annotations

import re

import pytest

from jobs.run import connect
from launcher.errors import LauncherError
from tests.conftest import ROOT


def test_jobs_and_cluster_call_ray_init_only_in_jobs_run_connect():
    calls = {str(p.relative_to(ROOT)): len(re.findall(r"\bray\.init\(", p.read_text()))
             for folder in ("jobs", "cluster") for p in (ROOT / folder).rglob("*.py")}
    assert {k: v for k, v in calls.items() if v} == {"jobs/run.py": 1}
    source = (ROOT / "jobs" / "run.py").read_text()
    assert not re.search(r"""ray\.init\(\s*(address\s*=\s*)?["']auto["']""", source)


@pytest.mark.parametrize("address", [None, "auto", "http://127.0.0.1:8265"])
def test_connect_refuses_an_address_that_is_not_a_heads(address, monkeypatch):
    if address is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", address)
    with pytest.raises(LauncherError, match=r"^RAY_ADDRESS=.* is not a Ray head's GCS address \(HOST:PORT\); run "
                                            r"the job through the Ray Jobs API"):
        connect()
