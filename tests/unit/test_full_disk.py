"""A full disk while the run folder is written (issue 20 item 5): the manifest, JSONL records and
exports are written whole or not at all, the old file or folder stays, and the job's error is one
line naming the path and the bytes the write needed.

The full disk is a fault injected at the write call (an OSError with errno ENOSPC, as the kernel
raises it): making a small file system needs mount privileges this machine and CI may not have.
"""

import errno
import shutil

import pytest

from common import runfolder as rf
from jobs.run import failure_line


def _full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_manifest_write_that_finds_the_disk_full_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "manifest.json"
    rf.write_json(path, {"status": "RUNNING", "step": 10})
    monkeypatch.setattr(rf, "_write", _full)
    with pytest.raises(rf.NoSpaceError) as err:
        rf.write_json(path, {"status": "SUCCEEDED", "step": 20})
    assert rf.read_json(path) == {"status": "RUNNING", "step": 10}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]  # no temporary left
    line = str(err.value)
    assert line.startswith(f"no space left on {path}: ") and "bytes needed" in line and "\n" not in line
    assert "ftlaunch resume" in line
    with pytest.raises(rf.NoSpaceError):
        rf.write_jsonl(tmp_path / "metrics.jsonl", [{"step": 1}])
    assert not (tmp_path / "metrics.jsonl").exists()


def _tree(root, files):
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def _read(root):
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def test_an_export_is_replaced_whole_or_left_as_it_was(tmp_path, monkeypatch):
    src, dst = tmp_path / "ckpt" / "export", tmp_path / "run" / "adapter"
    _tree(src, {"adapter_config.json": "new", "adapter_model.safetensors": "N" * 100})
    _tree(dst, {"adapter_config.json": "old", "stale.bin": "S"})

    copies = []

    def copy_then_full(a, b):  # the second file's write finds the disk full
        copies.append(a)
        if len(copies) == 2:
            _full()
        return shutil.copy2(a, b)

    monkeypatch.setattr(rf, "_copy_file", copy_then_full)
    with pytest.raises(rf.NoSpaceError) as err:
        rf.copy_tree_atomic(src, dst)
    assert _read(dst) == {"adapter_config.json": "old", "stale.bin": "S"}
    assert sorted(p.name for p in dst.parent.iterdir()) == ["adapter"]  # no partial copy left
    assert str(err.value).startswith(f"no space left on {dst}: 103 bytes needed")

    monkeypatch.undo()
    rf.copy_tree_atomic(src, dst)  # with room: the new export, and nothing of the old one
    assert _read(dst) == {"adapter_config.json": "new", "adapter_model.safetensors": "N" * 100}
    assert sorted(p.name for p in dst.parent.iterdir()) == ["adapter"]


def test_the_failed_runs_line_names_a_full_disk_wherever_it_was_met(tmp_path):
    def raised(exc, cause=None):
        try:
            try:
                raise cause if cause else exc
            except BaseException as inner:
                if cause:
                    raise exc from inner
                raise
        except BaseException as outer:
            return outer

    ours = rf.no_space(tmp_path / "manifest.json", 120)
    assert failure_line(raised(RuntimeError("training failed"), ours)) == str(ours)
    plain = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "checkpoint_000003" / "state.pt"))
    assert failure_line(raised(plain)).startswith(f"no space left on {tmp_path / 'checkpoint_000003' / 'state.pt'}")
    # Ray Train's upload error, wrapped in Ray's: only its text carries the OSError
    wrapped = RuntimeError("TrainingFailedError: ... OSError: [Errno 28] No space left on device: "
                           f"'{tmp_path}/checkpoint_000004/model.safetensors'\nTraceback ...")
    line = failure_line(wrapped)
    assert line.startswith(f"no space left on {tmp_path}/checkpoint_000004/model.safetensors") and "\n" not in line
    assert failure_line(ValueError("bad row")) == "ValueError: bad row"
    # a line of ours that quotes a task's bad row stays whole (a multitask run's summary)
    ours = RuntimeError("1 of 3 tasks failed (b: BadRowsError: bad data in ...); retrain with: ftlaunch resume x")
    assert failure_line(ours) == f"RuntimeError: {ours}"


def test_a_manifest_that_finds_the_disk_full_is_written_in_the_runs_reserve(tmp_path, monkeypatch):
    rf.write_json(tmp_path / "manifest.json", {"status": "RUNNING"})
    rf.hold_reserve(tmp_path)
    assert (tmp_path / rf.RESERVE).stat().st_size == rf.RESERVE_BYTES
    real, calls = rf._write, []

    def full_until_the_reserve_goes(f, data):  # the disk is full while the reserve holds its room
        calls.append(len(data))
        if (tmp_path / rf.RESERVE).exists():
            _full()
        real(f, data)

    monkeypatch.setattr(rf, "_write", full_until_the_reserve_goes)
    manifest = rf.update_manifest(tmp_path, status="FAILED", error="no space left on ...")
    assert rf.read_json(tmp_path / "manifest.json")["status"] == "FAILED" == manifest["status"]
    assert not (tmp_path / rf.RESERVE).exists() and len(calls) == 2
    monkeypatch.setattr(rf, "_write", _full)  # no reserve left: the full disk is said, the old file stays
    with pytest.raises(rf.NoSpaceError):
        rf.update_manifest(tmp_path, status="SUCCEEDED")
    assert rf.read_json(tmp_path / "manifest.json")["status"] == "FAILED"
