"""TensorBoard scalars for every metrics record a job writes, under `<run_dir>/tensorboard/`.

RunDir.append calls `write` for each `metrics*.jsonl` record, so a live `tensorboard --logdir
runs/<run_id>/tensorboard` follows the run. One subfolder (a TensorBoard "run") per curve:
`train` for a plain finetune, the stage of a pipeline, the task of a multitask run
(`metrics-<task>.jsonl`), the variant of a compare run. Without the tensorboard package nothing
is written and training goes on (one warning).
"""

from __future__ import annotations

import warnings
from pathlib import Path

from common.runfolder import curve_of

# The record fields drawn as scalars (x = the record's step); bookkeeping fields are not.
SCALARS = ("loss", "eval_loss", "eval_accuracy", "eval_exact_match", "accuracy", "retain_loss",
           "retain_accuracy", "lr", "tokens_per_s", "ewc_penalty")
# Values measured before training (`before`), drawn at step 0 of their curve.
BEFORE = {"eval_exact_match_before": "eval_exact_match"}

_writers: dict = {}  # logdir -> SummaryWriter, one per process and curve
_purge: dict = {}  # logdir -> the first step a resume rewrites (its earlier events are hidden)
_missing = False


def logdir(run_path: Path, name: str, record: dict) -> Path:
    """Where a record of `run_path/name` goes: `<run>/tensorboard/<curve>` (`train` for a run's
    one curve)."""
    top, rel = run_path, name
    if run_path.parent.name == "variants":  # compare: each variant is a finetune in variants/<name>
        top, rel = run_path.parent.parent, f"variants/{run_path.name}/{name}"
    return top / "tensorboard" / (curve_of(rel, record) or "train")


def write(run_path: Path, name: str, record: dict) -> None:
    """Add the record's scalars at its step and flush, so a live TensorBoard sees them."""
    if "step" not in record:
        return
    writer = _writer(logdir(run_path, name, record))
    if writer is None:
        return
    for key in SCALARS:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            writer.add_scalar(key, value, global_step=int(record["step"]), walltime=record.get("time"))
    writer.flush()


def before(run_path: Path, values: dict, name: str = "metrics.jsonl") -> None:
    """The values measured before any update, at step 0: written first, as a viewer drops the
    events past a step that goes back (its restart rule)."""
    import time

    shown = {tag: values[key] for key, tag in BEFORE.items() if isinstance(values.get(key), (int, float))}
    if shown:
        write(run_path, name, {"step": 0, "time": time.time(), **shown})


def truncated(run_path: Path, name: str, removed: list[dict]) -> None:
    """A resume dropped these records (they will be written again): hide their old events.

    The next writer of each curve starts with a purge step (TensorBoard's restart marker), so
    its viewer shows the rewritten steps once; the old event file itself is left as it is.
    """
    for record in removed:
        if "step" not in record:
            continue
        d = logdir(run_path, name, record)
        _purge[d] = min(_purge.get(d, record["step"]), record["step"])
        old = _writers.pop(d, None)
        if old is not None:
            old.close()


def _writer(path: Path):
    global _missing
    if path in _writers:
        return _writers[path]
    if _missing:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # training does not need TensorBoard
        _missing = True
        warnings.warn(f"no TensorBoard event files: {exc}; install tensorboard to get them", stacklevel=3)
        return None
    _writers[path] = SummaryWriter(str(path), purge_step=_purge.pop(path, None))
    return _writers[path]
