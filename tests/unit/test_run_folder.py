"""The run folder after a success: the training checkpoints go, the export and records stay."""

from jobs.artifacts import RunDir
from launcher.spec import validate
from tests.unit.test_spec import GOOD


def test_a_succeeded_run_keeps_its_export_and_loses_its_checkpoints(tmp_path):
    files = {"checkpoint_000001/state.pt": 300, "checkpoint_000002/ds/shard.pt": 500,
             "run-texture/checkpoint_000000/state.pt": 70,  # a pipeline stage's
             ".progress/task-a.pt": 40, "adapter/adapter_model.safetensors": 11, "metrics.jsonl": 5}
    for name, n in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x" * n)
    run = RunDir(str(tmp_path))
    found = run.checkpoints()
    # What SUCCEEDED records (before the checkpoints go) lists none of them.
    assert sorted(run.artifacts(leaving=tuple(found[0]))) == ["adapter/adapter_model.safetensors", "metrics.jsonl"]
    assert run.prune_checkpoints(found) == 300 + 500 + 70 + 40
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert left == ["adapter/adapter_model.safetensors", "metrics.jsonl"]


def test_keep_checkpoints_is_off_unless_asked():
    assert validate(GOOD).keep_checkpoints is False
    assert validate({**GOOD, "keep_checkpoints": True}).keep_checkpoints is True


def test_two_writers_of_one_file_at_once_leave_one_whole_file_never_a_mix(tmp_path):
    # The client and the job both record a stop in one manifest: with a shared temporary their
    # bytes interleaved into a file that was no JSON (seen in test_stop_a_running_job).
    import threading

    from common.runfolder import read_json, write_json

    path = tmp_path / "manifest.json"
    bodies = [{"writer": w, "pad": str(w) * 20000} for w in range(2)]
    errors = []

    def write(body):
        for _ in range(200):
            try:
                write_json(path, body)
            except Exception as exc:  # noqa: BLE001 -- collected, asserted below
                errors.append(exc)

    def read():
        for _ in range(400):
            try:
                assert read_json(path) in ({}, *bodies)
            except Exception as exc:  # noqa: BLE001 -- collected, asserted below
                errors.append(exc)

    threads = [threading.Thread(target=write, args=(b,)) for b in bodies] + [threading.Thread(target=read)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert read_json(path) in bodies and [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
