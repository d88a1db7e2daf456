"""The embedded head authenticates (issue 20 item 9): the session's head runs with Ray's token auth
on, as every user's does; its Jobs API refuses a client without the token (a raw HTTP request and
the real `ray job submit` CLI), and ftlaunch's own clients pass it, also from a shell that has
nothing of it in its environment."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cluster import local
from tests.integration.test_jobs import cli

pytestmark = pytest.mark.integration


def without_token() -> dict:
    """This environment as a shell of another user of the machine would have it: no Ray token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["RAY_AUTH_MODE"] = "disabled"  # Ray's client default
    return env


def status_of(url: str, headers: dict | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_the_heads_token_is_its_owners_alone(ray_head):
    path = local.token_path()
    assert path.is_file() and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(path.read_text().strip()) == 64
    assert os.environ["RAY_AUTH_MODE"] == "token" and os.environ["RAY_AUTH_TOKEN_PATH"] == str(path)


def test_the_jobs_api_refuses_a_client_without_the_token(ray_head, tmp_path):
    jobs = f"{ray_head.address}/api/jobs/"
    assert status_of(jobs) == 401
    assert status_of(jobs, {"Authorization": "Bearer not-the-token"}) in (401, 403)
    assert status_of(jobs, local.auth_headers()) == 200

    # The real Ray CLI from a shell without the token: refused, and nothing runs.
    marker = tmp_path / "ran"
    out = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", ray_head.address, "--no-wait",
         "--", sys.executable, "-c", f"open({str(marker)!r}, 'w').write('x')"],
        capture_output=True, text=True, env=without_token(), timeout=120)
    assert out.returncode != 0, out.stdout + out.stderr
    assert "token" in (out.stdout + out.stderr).lower()
    assert not marker.exists()


def test_ftlaunch_passes_the_token_from_a_shell_that_has_none(ray_head):
    out = cli("list", "--address", ray_head.address, env=without_token())
    assert out.returncode == 0, out.stdout + out.stderr
    assert "401" not in out.stderr and "token" not in out.stderr.lower()


def test_a_rendered_kuberay_cluster_authenticates_by_token():
    # No Kubernetes API server here: the rendered RayJob is checked offline against the v1.7.0 schema.
    import yaml

    from launcher.k8s.validate import validate_manifest
    from tests.conftest import ROOT

    doc = yaml.safe_load((ROOT / "k8s" / "rayjob-finetune.yaml").read_text())
    assert doc["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    assert validate_manifest(doc) == []


def test_auth_modes(monkeypatch):
    monkeypatch.delenv("FTLAUNCH_RAY_AUTH_MODE", raising=False)
    assert local.auth_env() == {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(local.token_path())}
    assert local.auth_warning() is None
    monkeypatch.setenv("FTLAUNCH_RAY_AUTH_MODE", "disabled")
    assert local.auth_env() == {"RAY_AUTH_MODE": "disabled"}
    # The opt-out is named in the warning `cluster up` prints, with what it lets others do.
    assert "FTLAUNCH_RAY_AUTH_MODE=disabled" in local.auth_warning()
    assert "any user of this machine can submit code" in local.auth_warning()
    monkeypatch.setenv("FTLAUNCH_RAY_AUTH_MODE", "tokn")
    with pytest.raises(local.ClusterError, match="FTLAUNCH_RAY_AUTH_MODE='tokn' is not token or disabled"):
        local.auth_mode()
