"""A resume never fails on a checkpoint that is gone or cut short: jobs/checkpoints.py tells a
whole checkpoint folder by its ranks' listings and takes the others out of Ray Train's run
snapshot (the snapshot is written here with Ray Train's own model of it, and read back by it)."""

import json
import os

from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import (
    _CheckpointManagerState,
    _TrainingResultState,
)

from jobs import checkpoints


def _checkpoint(run, name: str, ranks: int = 1, step: int = 0) -> str:
    folder = run / name
    for rank in range(ranks):
        (folder / "export").mkdir(parents=True, exist_ok=True)
        (folder / f"state-{rank}.pt").write_bytes(b"s" * (100 + rank))
        (folder / "export" / "adapter.safetensors").write_bytes(b"w" * 50)
        checkpoints.write_listing(str(folder), rank, ranks)
    return name


def _snapshot(run, names: list[str]) -> None:
    results = [_TrainingResultState(checkpoint_dir_name=n, metrics={"step": 10 * (i + 1)})
               for i, n in enumerate(names)]
    state = _CheckpointManagerState(
        checkpoint_results=results, checkpoint_report_indices=list(range(len(names))),
        latest_checkpoint_result=results[-1], pending_training_results=[], pending_validation_specs=[],
        current_report_index=len(names), validated_checkpoint_dir_names=[names[-1]],
        timed_out_validation_checkpoint_dir_names=[], failed_validation_checkpoint_dir_names=[])
    (run / checkpoints.SNAPSHOT).write_text(state.model_dump_json())


def _read(run) -> _CheckpointManagerState:
    return _CheckpointManagerState.model_validate_json((run / checkpoints.SNAPSHOT).read_text())


def test_a_checkpoint_is_whole_only_with_every_listed_file_at_its_size_from_every_rank(tmp_path):
    import pyarrow.fs as pafs

    fs = pafs.LocalFileSystem()
    _checkpoint(tmp_path, "checkpoint_a", ranks=2)
    assert checkpoints.whole(fs, str(tmp_path / "checkpoint_a"))
    (tmp_path / "checkpoint_a" / "state-1.pt").write_bytes(b"cut")  # an upload killed mid-file
    assert not checkpoints.whole(fs, str(tmp_path / "checkpoint_a"))

    _checkpoint(tmp_path, "checkpoint_b", ranks=2)
    os.remove(tmp_path / "checkpoint_b" / ".ftl-checkpoint-rank1.json")  # one rank's part never came
    assert not checkpoints.whole(fs, str(tmp_path / "checkpoint_b"))
    _checkpoint(tmp_path, "checkpoint_c")
    os.remove(tmp_path / "checkpoint_c" / "export" / "adapter.safetensors")  # a prune killed mid-way
    assert not checkpoints.whole(fs, str(tmp_path / "checkpoint_c"))
    assert not checkpoints.whole(fs, str(tmp_path / "checkpoint_gone"))


def test_repair_drops_the_missing_latest_checkpoint_and_the_one_before_becomes_the_latest(tmp_path):
    run = tmp_path / "ft-run"
    names = [_checkpoint(run, "checkpoint_1"), _checkpoint(run, "checkpoint_2")]
    _snapshot(run, names)
    untouched = (run / checkpoints.SNAPSHOT).read_text()
    storage = {"storage_path": str(tmp_path)}
    assert checkpoints.repair(storage, "ft-run") == []  # both whole: the file is not rewritten
    assert (run / checkpoints.SNAPSHOT).read_text() == untouched

    (run / "checkpoint_2" / "state-0.pt").unlink()
    assert checkpoints.repair(storage, "ft-run") == ["checkpoint_2"]
    state = _read(run)  # Ray Train's own model of the snapshot still reads it
    assert [r.checkpoint_dir_name for r in state.checkpoint_results] == ["checkpoint_1"]
    assert state.checkpoint_report_indices == [0]
    assert state.latest_checkpoint_result.checkpoint_dir_name == "checkpoint_1"
    assert state.latest_checkpoint_result.metrics == {"step": 10}
    assert state.validated_checkpoint_dir_names == [] and state.current_report_index == 2
    assert not [p for p in os.listdir(run) if p.endswith(".tmp")]


def test_repair_with_every_checkpoint_gone_leaves_a_snapshot_that_starts_over(tmp_path):
    run = tmp_path / "ft-run"
    run.mkdir()
    _snapshot(run, ["checkpoint_1", "checkpoint_2"])  # both pruned before a stop landed
    assert checkpoints.repair({"storage_path": str(tmp_path)}, "ft-run") == ["checkpoint_1", "checkpoint_2"]
    state = _read(run)
    assert state.checkpoint_results == [] and state.latest_checkpoint_result is None


def test_repair_leaves_a_first_attempt_and_an_unknown_layout_alone(tmp_path):
    assert checkpoints.repair({"storage_path": str(tmp_path)}, "never-ran") == []
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / checkpoints.SNAPSHOT).write_text(json.dumps({"checkpoints": ["x"]}))
    assert checkpoints.repair({"storage_path": str(tmp_path)}, "odd") == []
    assert json.loads((tmp_path / "odd" / checkpoints.SNAPSHOT).read_text()) == {"checkpoints": ["x"]}
