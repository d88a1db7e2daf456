"""Preemption: a training process told to stop (SIGTERM: a spot node's reclaim notice, a node
drain, the kubelet stopping a pod) writes a checkpoint at its next step and ends, instead of
training on until it is killed and losing every step since its last report.

`listen(grace_s)` replaces the process's SIGTERM handler (Ray's own raises SystemExit at once) with
one that raises a flag; `Loop.due` asks `agreed()` at every step, so every rank of a Ray Train
run checkpoints at the same step (the flag is all-reduced: one rank's notice is every rank's), and
`Loop.report` then raises `Preempted`. Ray Train's retry (train.max_failures) or `ftlaunch resume`
continues from that checkpoint: no step is redone. A process that has not checkpointed within
`grace_s` of the signal exits (143), as it would have without this.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Optional

GRACE_EXIT = 128 + signal.SIGTERM


class Preempted(RuntimeError):
    """Raised by every rank after the checkpoint its notice asked for."""


class Notice:
    def __init__(self, grace_s: float, run_path: Optional[str] = None):
        self.grace_s, self.run_path = grace_s, run_path
        self.flag = threading.Event()
        self.signalled_at: Optional[float] = None
        self.armed = True  # worker_scope disarms it once the training function is done
        self.stopping = False  # a stop's line is said once: Ray may signal the process again

    def on_sigterm(self, signum, frame) -> None:
        if not self.armed:  # the training is over (Ray Train ends its workers so): exit as before
            _previous(signum, frame)
            return
        if stopped_by_request(self.run_path):
            # `ftlaunch stop` (or `ray job stop`): the driver is gone, no checkpoint can be taken
            # any more, and each step trained on now is lost: end at once, as Ray's handler does.
            if not self.stopping:
                self.stopping = True
                sys.stderr.write(f"[ftlaunch] SIGTERM (pid {os.getpid()}): the run was stopped; ending now\n")
            _previous(signum, frame)
            return
        if self.flag.is_set():
            return
        self.signalled_at = time.time()
        self.flag.set()
        sys.stderr.write(f"[ftlaunch] SIGTERM (pid {os.getpid()}): checkpointing at the next step, "
                         f"then ending (grace {self.grace_s:g} s)\n")
        timer = threading.Timer(self.grace_s, os._exit, (GRACE_EXIT,))
        timer.daemon = True
        timer.start()

    def agreed(self, world: int) -> bool:
        """Whether any rank has had its notice: all-reduced over the run's process group (every
        rank calls this at every step, so all of them agree on the step)."""
        return _max_over_ranks(1.0 if self.flag.is_set() else 0.0, world) > 0


def barrier(world: int) -> None:
    """Every rank of the run's process group waits here until all have come."""
    _max_over_ranks(0.0, world)


def _max_over_ranks(value: float, world: int) -> float:
    if world <= 1:
        return value
    import torch
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return value
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([value], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return float(flag.item())


_CURRENT: list = []


def current() -> Optional[Notice]:
    return _CURRENT[0] if _CURRENT else None


def stopped_by_request(run_path: Optional[str]) -> bool:
    """Whether the run whose folder (or stage folder) is `run_path` was recorded STOPPED: by the
    client that asked, or by its driver at the SIGTERM Ray's job stop sends it. This node's view:
    a run in object storage is seen so on the driver's node only (elsewhere: a preemption)."""
    from pathlib import Path

    from common.runfolder import MANIFEST, read_json

    if not run_path:
        return False
    folder = Path(run_path)
    for candidate in (folder, *list(folder.parents)[:2]):
        try:
            manifest = read_json(candidate / MANIFEST)
        except (OSError, ValueError):
            continue
        if manifest and manifest.get("status"):
            return manifest["status"] == "STOPPED"
    return False


def listen(grace_s: float, run_path: Optional[str] = None) -> Notice:
    """This process's notice, its SIGTERM handler installed on the main thread (Python runs
    handlers there only). A Ray Train worker runs its training function in a thread of its actor:
    the handler goes in through the actor, whose methods run on the main thread."""
    notice = Notice(grace_s, run_path)
    _CURRENT[:] = [notice]
    if threading.current_thread() is threading.main_thread():
        _install(None)
        return notice
    import ray

    # Both functions travel by reference (module and name), so the main thread's handler finds
    # this same notice in this module.
    ray.get(ray.get_runtime_context().current_actor.__ray_call__.remote(_install))
    return notice


_PREVIOUS: list = []  # the handler listen() replaced (Ray's: SystemExit)


def _previous(signum, frame) -> None:
    handler = _PREVIOUS[0] if _PREVIOUS else signal.SIG_DFL
    if callable(handler):
        handler(signum, frame)
    elif handler != signal.SIG_IGN:
        raise SystemExit(GRACE_EXIT)


def _on_sigterm(signum, frame) -> None:
    notice = current()
    if notice is None:
        _previous(signum, frame)
    else:
        notice.on_sigterm(signum, frame)


def _install(_actor) -> None:
    previous = signal.getsignal(signal.SIGTERM)
    if previous is not _on_sigterm:
        _PREVIOUS[:] = [previous]
    signal.signal(signal.SIGTERM, _on_sigterm)
