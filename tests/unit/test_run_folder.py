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
    assert RunDir(str(tmp_path)).prune_checkpoints() == 300 + 500 + 70 + 40
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert left == ["adapter/adapter_model.safetensors", "metrics.jsonl"]


def test_keep_checkpoints_is_off_unless_asked():
    assert validate(GOOD).keep_checkpoints is False
    assert validate({**GOOD, "keep_checkpoints": True}).keep_checkpoints is True
