"""Multitask progress checkpoints: an adapter worker that dies (or a stopped run) continues from
its last report. One file per worker: `task-<name>` for one adapter, `pack` for a packed set."""

from __future__ import annotations

from pathlib import Path

import torch

from jobs import components as C
from jobs.loop import progress_file

PACKED = "pack"  # progress keys: task-<name> (one adapter) or pack


def save_progress(path: str, model, optimizer, names: list[str], steps: dict, losses: dict,
                  before: dict) -> None:
    """The adapters' weights, the optimizer, steps and losses so far (jobs/loop.py makes it atomic)."""
    weights = {n: p.detach().cpu().clone() for n, p in model.named_parameters()
               if any(n.endswith(f".{name}.weight") and ".lora_" in n for name in names)}
    torch.save({"names": names, "weights": weights, "optimizer": optimizer.state_dict(),
                "steps": dict(steps), "losses": {n: list(v) for n, v in losses.items()},
                "before": dict(before)}, path)


def load_progress(path: str, model, optimizer, names: list[str]) -> dict | None:
    """Restore what `save_progress` kept for the same adapters, or None (start afresh)."""
    state = torch.load(path, weights_only=False)
    if state["names"] != names:  # another set of tasks shares the key: not this one's progress
        return None
    C.restore_trainable(model, state["weights"], optimizer, state["optimizer"])
    print(f"[ftlaunch] {Path(path).stem}: continuing from step(s) {state['steps']}", flush=True)
    return state


def discard_progress(run_dir, key: str) -> None:
    Path(progress_file(run_dir, key)).unlink(missing_ok=True)
