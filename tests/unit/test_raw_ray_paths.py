"""A raw `ray job submit --working-dir . -- python -m jobs.run --spec ...` runs in Ray's temporary
copy of the working dir, without its git-ignored files: jobs.run refuses what would be lost there."""

from __future__ import annotations

import json

import pytest

from jobs.run import _uploaded_working_dir, refuse_paths_lost_in_upload
from launcher.errors import PlanError
from launcher.spec import load_spec
from tests.conftest import ROOT

SPEC = ROOT / "configs" / "tiny" / "lora.yaml"


def spec(*overrides: str) -> dict:
    return load_spec(str(SPEC), overrides).model_dump(mode="json")


def test_a_relative_storage_under_an_uploaded_working_dir_is_refused_with_the_absolute_one(tmp_path):
    with pytest.raises(PlanError, match=r"^storage \./runs is relative: it would be written inside Ray's "
                                        r"temporary copy .* e\.g\. storage=\$PWD/runs after the spec$"):
        refuse_paths_lost_in_upload(spec(), tmp_path)


def test_a_dataset_missing_from_the_upload_is_refused_naming_its_key_and_the_fix(tmp_path):
    with pytest.raises(PlanError, match=r"^data\.train: data/demo/train\.parquet is not in the working dir Ray "
                                        r"uploaded .*e\.g\. data\.train=\$PWD/data/demo/train\.parquet after"):
        refuse_paths_lost_in_upload(spec(f"storage={tmp_path}/runs"), tmp_path)


def test_absolute_paths_and_files_that_were_uploaded_pass(tmp_path):
    (tmp_path / "data" / "demo").mkdir(parents=True)
    (tmp_path / "data" / "demo" / "eval.parquet").touch()  # uploaded (not git-ignored there)
    refuse_paths_lost_in_upload(spec(f"storage={tmp_path}/runs", f"data.train={tmp_path}/t.parquet"), tmp_path)


def test_only_a_working_dir_upload_counts(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert _uploaded_working_dir() is None  # not a Ray job: paths resolve against the cwd as given
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"env_vars": {}}}))
    assert _uploaded_working_dir() is None
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR",
                       json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"}}))
    assert _uploaded_working_dir() == tmp_path
