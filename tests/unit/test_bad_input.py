"""Bad input gets one `ftlaunch: error:` line that names the bad value and the fix, before anything
is submitted, and nothing already written is touched. (Corrupt files inside a dataset, column by
column: tests/unit/test_data_check.py; hostile specs at random: tests/unit/test_spec_fuzz.py.)"""

import os
import re
import socket
import time

import pytest

import launcher.targets.ray as client_mod
from launcher.cli.main import main
from tests.unit.test_cli import Recorder


def spec_file(tmp_path, **fields):
    from launcher.synthetic import make

    make("counting", 600, tmp_path, split="t")
    spec = {"kind": "finetune", "name": "bad", "strategy": "{type: lora, r: 4}",
            "data": f"{{train: {tmp_path}/t.parquet}}", "train": "{max_steps: 5}",
            "storage": f"{tmp_path}/runs", **fields}
    path = tmp_path / "s.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in spec.items()))
    return path


def error_line(capsys, argv) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("ftlaunch: error: ")]
    assert len(errors) == 1 and err.endswith(errors[0] + "\n"), err
    return errors[0].removeprefix("ftlaunch: error: ")


@pytest.fixture
def recorder(monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(client_mod, "client", lambda address: rec)
    # the local target must not start an embedded head here, whatever happens
    monkeypatch.setattr(client_mod, "resolve_address", lambda *a, **k: "http://recorded:8265")
    return rec


def test_corrupt_parquet_is_named_at_plan(tmp_path, capsys):
    (tmp_path / "junk.parquet").write_bytes(os.urandom(64) + b"PAR1")
    spec = spec_file(tmp_path, data=f"{{train: {tmp_path}/junk.parquet}}")
    line = error_line(capsys, ["plan", str(spec)])
    assert re.fullmatch(rf"data\.train: {tmp_path}/junk\.parquet is not a readable Parquet file \(.+\); "
                        "rewrite the file or remove it from the dataset", line), line


@pytest.mark.parametrize("argv", [["status", "x", "--storage", "RUNS"], ["list", "--storage", "RUNS"],
                                  ["submit", "SPEC", "--no-wait"]])
def test_unreachable_address_is_one_line_and_quick(tmp_path, capsys, argv):
    runs = tmp_path / "runs"
    argv = [str(spec_file(tmp_path)) if a == "SPEC" else str(runs) if a == "RUNS" else a for a in argv]
    started = time.monotonic()
    line = error_line(capsys, [*argv, "--target", "ray", "--address", "http://127.0.0.1:9"])
    assert time.monotonic() - started < 30  # planning a submit imports torch; no retry loop
    # status x: no run folder x under --storage either (list with run folders shows them instead)
    first = f"no run x under {runs} (a run id, run folder or submission id), and " if argv[0] == "status" else ""
    assert line == (f"{first}cannot reach a Ray cluster at http://127.0.0.1:9: [Errno 111] Connection refused; "
                    "check the address and that the head's dashboard (Jobs API) is up")
    assert not (tmp_path / "runs").exists()


NO_RUN_X = "no run x under ./runs (a run id, run folder or submission id), and "  # status looks there first


@pytest.mark.parametrize("address", ["not a url:::", "ftp://x", "http://", "host:port", "http://a b:1"])
def test_an_address_that_is_no_url_is_refused_before_any_connection(capsys, monkeypatch, address):
    monkeypatch.setattr(socket, "create_connection", pytest.fail)
    line = error_line(capsys, ["status", "x", "--address", address])
    assert line == (f"{NO_RUN_X}address {address!r} is not a Ray dashboard URL; use http://HOST:8265 "
                    "(--address or RAY_ADDRESS)")


def test_a_host_that_never_answers_times_out(capsys, monkeypatch):
    asked = []

    def silent(addr, timeout):
        asked.append((addr, timeout))
        raise socket.timeout("timed out")

    monkeypatch.setattr(socket, "create_connection", silent)
    line = error_line(capsys, ["status", "x", "--address", "10.255.255.1:8265"])
    assert asked == [(("10.255.255.1", 8265), client_mod.CONNECT_TIMEOUT_S)]
    assert line == (f"{NO_RUN_X}cannot reach a Ray cluster at http://10.255.255.1:8265: no answer within 5 s; "
                    "check the address and that the head's dashboard (Jobs API) is up")


def test_storage_that_cannot_hold_a_run_folder_is_refused_before_submit(tmp_path, capsys, recorder):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    fix = "point storage at a folder (e.g. ./runs)"
    cases = {
        str(a_file): f"storage {a_file} is a file, not a folder; {fix}",
        f"{a_file}/runs": f"storage {a_file}/runs is under {a_file}, a file, not a folder; {fix}",
        "/proc/ftl": "storage /proc/ftl: cannot create a run folder in /proc (a virtual filesystem, like "
                     "/proc); point storage at a writable folder (e.g. ./runs)",
        "ftp://x": "storage ftp://x: cannot open it (Unrecognized filesystem type in URI: ftp://x); fix the URI "
                   "(s3://bucket/prefix?endpoint_override=HOST:PORT&scheme=http for MinIO)",
        # An option pyarrow does not take (a bucket that is not there: tests/integration/test_s3.py).
        "s3://bucket/runs?endpoint=x": "storage s3://bucket/runs: cannot open it (Unexpected query parameter in "
                                       "S3 URI: 'endpoint'); fix the URI (s3://bucket/prefix?endpoint_override="
                                       "HOST:PORT&scheme=http for MinIO)",
    }
    for storage, expected in cases.items():
        spec = spec_file(tmp_path, storage=storage)
        assert error_line(capsys, ["plan", str(spec)]) == expected
        assert error_line(capsys, ["submit", str(spec), "--no-wait"]) == expected  # the local target
    assert recorder.calls == [] and a_file.read_text() == "keep me"


def test_read_only_storage_is_refused(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: a 0500 folder is still writable, so there is nothing to refuse")
        spec = spec_file(tmp_path, storage=f"{locked}/runs")
        assert error_line(capsys, ["plan", str(spec)]) == (
            f"storage {locked}/runs: cannot create a run folder in {locked} (no write permission); "
            "point storage at a writable folder (e.g. ./runs)")
    finally:
        locked.chmod(0o700)


def test_unknown_model_sources_name_the_value_and_what_is_accepted(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    known = "tiny-llama, minilm, arrcoc-mini, arrcoc-7b, llama-2-7b, or hf:<local model folder>"
    spec = spec_file(tmp_path, model="{source: llama-99b}")
    assert error_line(capsys, ["validate", str(spec)]) == (
        f"{spec}: model.source: unknown model source; did you mean 'llama-2-7b'? Known: {known} "
        "(got 'llama-99b')")
    offline = ("jobs do not download from the Hugging Face hub (HF_HUB_OFFLINE=1): download the model "
               "first and point hf: at its folder, or at <org>/<name> in the local Hugging Face cache")
    spec = spec_file(tmp_path, model="{source: 'hf:/nonexistent/path'}")
    assert error_line(capsys, ["plan", str(spec)]) == (
        f"model.source: hf:/nonexistent/path is not a local model folder (no config.json in /nonexistent/path); "
        f"{offline}")
    # org/name that is no folder is a hub id, looked up in the local cache
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    spec = spec_file(tmp_path, model="{source: 'hf:org/name'}")
    assert error_line(capsys, ["plan", str(spec)]).startswith(
        f"model.source: hf:org/name is no folder and org/name is not in the Hugging Face cache {tmp_path / 'hub'} "
        "(from HF_HUB_CACHE); on a connected machine run `hf download org/name`")


def test_lora_targets_that_match_no_layer_are_refused_at_plan(tmp_path, capsys):
    spec = spec_file(tmp_path, strategy="{type: lora, target_modules: [query, value]}")
    assert error_line(capsys, ["plan", str(spec)]) == (
        "strategy.target_modules: ['query', 'value'] match no linear layer of model tiny-llama; use "
        "all-linear or some of: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj")


def snapshot(folder):
    return {str(p): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def test_a_refused_submit_leaves_what_is_written_untouched(tmp_path, capsys, recorder):
    run = tmp_path / "runs" / "bad-earlier-run"
    (run / "checkpoint").mkdir(parents=True)
    (run / "manifest.json").write_text('{"status": "SUCCEEDED"}')
    (run / "checkpoint" / "model.safetensors").write_bytes(b"\x00weights")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    spec = spec_file(tmp_path, data=f"{{train: {tmp_path}/junk.parquet}}")
    before, spec_text = snapshot(tmp_path), spec.read_bytes()
    for argv in (["plan", str(spec)], ["submit", str(spec), "--no-wait", "--address", "h:8265"],
                 ["submit", str(spec), "--no-wait", "--address", "h:8265", "--submission-id", run.name]):
        assert "junk.parquet is not a readable Parquet file" in error_line(capsys, argv)
    assert snapshot(tmp_path) == before and spec.read_bytes() == spec_text
    assert recorder.calls == []
