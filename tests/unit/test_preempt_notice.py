"""A worker's SIGTERM when its run was stopped: it ends at once, saying so once however often Ray
signals it (a worker signalled twice said it twice on CI)."""

import json

import pytest

from jobs import preempt


def test_a_stopped_runs_worker_ends_at_each_sigterm_and_says_so_once(tmp_path, capsys, monkeypatch):
    (tmp_path / "manifest.json").write_text(json.dumps({"status": "STOPPED"}))
    ended = []
    monkeypatch.setattr(preempt, "_PREVIOUS", [lambda signum, frame: ended.append(signum)])
    notice = preempt.Notice(30.0, str(tmp_path))
    notice.on_sigterm(15, None)
    notice.on_sigterm(15, None)
    assert ended == [15, 15]  # Ray's own handler ran each time: the process ends
    assert capsys.readouterr().err.count("the run was stopped; ending now") == 1
    assert not notice.flag.is_set()  # no checkpoint is asked of a stopped run


@pytest.mark.parametrize("status", ["RUNNING", None])
def test_a_running_runs_sigterm_is_a_preemption_notice_said_once(tmp_path, capsys, status, monkeypatch):
    if status:
        (tmp_path / "manifest.json").write_text(json.dumps({"status": status}))
    timers = []

    class Timer:  # the grace period's exit, recorded instead of armed in the test process
        def __init__(self, seconds, fn, args):
            timers.append((seconds, fn, args))

        def start(self):
            pass

    monkeypatch.setattr(preempt.threading, "Timer", Timer)
    notice = preempt.Notice(30.0, str(tmp_path))
    notice.on_sigterm(15, None)
    notice.on_sigterm(15, None)
    assert notice.flag.is_set() and timers == [(30.0, preempt.os._exit, (preempt.GRACE_EXIT,))]
    assert capsys.readouterr().err.count("checkpointing at the next step") == 1
