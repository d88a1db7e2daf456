"""Every shipped spec renders to a RayJob that passes the KubeRay schema, the operator's rules
and the security audit (no Kubernetes needed)."""

from pathlib import Path

import pytest

from launcher.jobplan import plan
from launcher.k8s.render import render_rayjob
from launcher.k8s.validate import security_problems, validate_manifest
from launcher.spec import load_spec
from launcher.targets.k8s import load_profile

ROOT = Path(__file__).resolve().parents[2]
SPECS = sorted((ROOT / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", SPECS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_shipped_spec_renders_a_valid_rayjob(path):
    # On Kubernetes the data lives on the cluster's shared volume: not checked from here.
    job = plan(load_spec(path), "k8s", preflight=False, submission_id="golden-run")
    manifest = render_rayjob(job, load_profile("a100-80g-1"))
    assert validate_manifest(manifest) == []
    assert security_problems(manifest) == []
    assert manifest["spec"]["entrypoint"] == "python -m jobs.run --plan-env FTLAUNCH_PLAN"
