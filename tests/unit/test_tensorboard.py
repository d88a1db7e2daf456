"""Every metrics record a job appends through RunDir is also a TensorBoard scalar at its step."""

import sys
import warnings

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from jobs import tensorboard as tb
from jobs.artifacts import RunDir


@pytest.fixture(autouse=True)
def fresh_writers(monkeypatch):
    """Writers are per process: each test starts with none open and TensorBoard present."""
    monkeypatch.setattr(tb, "_writers", {})
    monkeypatch.setattr(tb, "_purge", {})
    monkeypatch.setattr(tb, "_missing", False)
    yield
    for w in tb._writers.values():
        w.close()


def scalars(logdir, tag) -> list[tuple[int, float]]:
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return [(e.step, round(e.value, 5)) for e in acc.Scalars(tag)]


def record(step, loss, **extra):  # the shape jobs/finetune.py appends
    return {"step": step, "loss": loss, "lr": 0.003, "tokens": 1000 * step, "tokens_per_s": 100.0 * step,
            "elapsed_s": 0.1 * step, "time": 1000.0 + step, **extra}


def test_finetune_records_become_scalars_at_their_steps(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    run.append("metrics.jsonl", record(10, 5.25, eval_loss=5.5))
    run.append("metrics.jsonl", record(20, 4.75, eval_loss=5.0))
    run.append("metrics.jsonl", record(30, 4.5, eval_loss=4.875, retain_loss=5.125))
    run.append("events.jsonl", {"event": "first_step", "step": 1, "loss": 9.0})  # not a metric

    logdir = tmp_path / "run" / "tensorboard" / "train"
    assert scalars(logdir, "loss") == [(10, 5.25), (20, 4.75), (30, 4.5)]
    assert scalars(logdir, "eval_loss") == [(10, 5.5), (20, 5.0), (30, 4.875)]
    assert scalars(logdir, "tokens_per_s") == [(10, 1000.0), (20, 2000.0), (30, 3000.0)]
    assert scalars(logdir, "retain_loss") == [(30, 5.125)]
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"loss", "eval_loss", "lr", "tokens_per_s", "retain_loss"}
    assert acc.Scalars("loss")[0].wall_time == pytest.approx(1010.0)  # the record's own time


def test_exact_match_before_training_is_drawn_at_step_0(tmp_path):
    from jobs import tensorboard

    run = RunDir(str(tmp_path / "run"))
    tensorboard.before(run.path, {"eval_loss_before": 5.75, "eval_exact_match_before": 0.0625})
    run.append("metrics.jsonl", record(10, 5.25, eval_loss=5.5))
    run.append("metrics.jsonl", record(20, 4.75, eval_exact_match=0.875))
    assert scalars(tmp_path / "run" / "tensorboard" / "train", "eval_exact_match") == [(0, 0.0625), (20, 0.875)]


def test_stages_tasks_and_variants_are_separate_tensorboard_runs(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    run.append("metrics.jsonl", {"stage": "texture", "step": 5, "loss": 2.5, "tokens_per_s": 40.0, "time": 1.0})
    run.append("metrics.jsonl", {"stage": "lora", "step": 5, "loss": 1.5, "accuracy": 0.75, "time": 2.0})
    run.append("metrics-counting.jsonl", {"task": "counting", "step": 20, "loss": 5.125, "elapsed_s": 1.0, "time": 3.0})
    variant = RunDir(str(tmp_path / "run" / "variants" / "lora_r8"))
    variant.append("metrics.jsonl", record(10, 3.5))

    board = tmp_path / "run" / "tensorboard"
    assert sorted(p.name for p in board.iterdir()) == ["counting", "lora", "lora_r8", "texture"]
    assert scalars(board / "texture", "loss") == [(5, 2.5)]
    assert scalars(board / "lora", "accuracy") == [(5, 0.75)]
    assert scalars(board / "counting", "loss") == [(20, 5.125)]
    assert scalars(board / "lora_r8", "loss") == [(10, 3.5)]


def test_a_resumed_run_shows_each_rewritten_step_once(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    for step, loss in ((10, 3.0), (20, 2.0), (30, 1.5)):
        run.append("metrics.jsonl", record(step, loss))
    # Resume from the step-10 checkpoint: steps 20 and 30 are trained, and written, again.
    run.truncate_jsonl("metrics.jsonl", lambda r: r["step"] <= 10)
    for step, loss in ((20, 2.5), (30, 1.75)):
        run.append("metrics.jsonl", record(step, loss))
    assert scalars(tmp_path / "run" / "tensorboard" / "train", "loss") == [(10, 3.0), (20, 2.5), (30, 1.75)]


def test_without_tensorboard_training_goes_on_with_one_warning(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    run = RunDir(str(tmp_path / "run"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.append("metrics.jsonl", record(10, 3.0))
        run.append("metrics.jsonl", record(20, 2.0))
    assert len([w for w in caught if "no TensorBoard event files" in str(w.message)]) == 1
    assert len(run.read_jsonl("metrics.jsonl")) == 2
    assert not (tmp_path / "run" / "tensorboard").exists()
