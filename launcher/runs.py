"""Run-centric state: a run's row (status, step/total, loss, eval, ETA, start, duration) read from
its folder, and the rules that reconcile a manifest still saying RUNNING with what the cluster
says of its latest attempt's job. The run folder is the source of truth; the cluster corrects it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

from common.runfolder import (
    DRIVER_STOPPED,
    MANIFEST,
    METRICS,
    NoSpaceError,
    ended,
    latest_attempt,
    read_json,
    read_jsonl,
    update_manifest,
)
from common.runstore import is_remote, local_run, shown_run

LIVE = ("PENDING", "RUNNING")
UNKNOWN = None  # what a reachable cluster says of a job it has no record of
GONE = "GONE"  # nothing listens at the attempt's loopback address any more: its head is gone
LOST = "LOST"  # the run's status when its head went away under it (UNKNOWN or GONE)


def reconcile(folder: Path, manifest: dict, job_status: Optional[str], message: str = "") -> dict:
    """The manifest after the cluster's word on its latest attempt's job (`UNKNOWN`: the cluster
    answered but has no such job; `GONE`: nothing answers at its loopback address). Only a RUNNING
    manifest is corrected (a driver that ended without recording why: killed, its head gone), and
    the correction is written with its reason and time (`finished`: when a client saw it)."""
    if manifest.get("status") != "RUNNING" or job_status in LIVE:
        return manifest
    attempt = latest_attempt(manifest)
    job, where = attempt.get("submission_id"), attempt.get("address") or "its address"
    resume = f"continue it with: ftlaunch resume {shown_run(folder)}"
    now = time.time()
    seen = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
    if job_status is UNKNOWN:
        status, why = LOST, (f"Lost: job {job} is unknown to the cluster at {where} (its head was "
                             f"stopped or restarted), seen {seen}; {resume}")
    elif job_status == GONE:
        status, why = LOST, (f"Lost: the Ray head at {where} that ran job {job} is gone (nothing "
                             f"listens there), seen {seen}; {resume}")
    elif job_status == "STOPPED":
        status, why = "STOPPED", f"Stopped: the cluster reports job {job} STOPPED"
    else:
        said = f": {message.strip().splitlines()[-1]}" if message and message.strip() else ""
        status, why = "FAILED", (f"Killed: job {job} ended {job_status} without the driver recording "
                                 f"why{said}; {resume}")
    fields = ended(manifest, status, why, when=now)
    if not (folder / MANIFEST).exists():
        return {**manifest, **fields}
    try:
        return update_manifest(folder, **fields)
    except NoSpaceError as exc:  # a full disk: what the cluster says is still the answer
        print(f"ftlaunch: warning: {exc}", file=sys.stderr)
        return {**manifest, **fields}


def mark_lost(folder: Path, job: str, why: str) -> Optional[dict]:
    """Record LOST for the run in `folder` whose latest attempt `job` was running on a head that
    was just stopped under it (`ftlaunch cluster down`): its driver, signalled with the rest of the
    head, may have taken that for a stop request and recorded STOPPED. None: not that run's job."""
    manifest = read_json(Path(folder) / MANIFEST)
    if not manifest or latest_attempt(manifest).get("submission_id") != job:
        return None
    driver_took_it_for_a_stop = (manifest.get("status") == "STOPPED"
                                 and (manifest.get("error") or "").startswith(DRIVER_STOPPED))
    if manifest.get("status") != "RUNNING" and not driver_took_it_for_a_stop:
        return None  # ended before, or stopped by someone who asked (ftlaunch stop records that)
    now = time.time()
    seen = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
    line = f"Lost: {why} at {seen} while job {job} ran; continue it with: ftlaunch resume {shown_run(folder)}"
    return update_manifest(folder, **ended(manifest, LOST, line, when=now))


def record_stop(folder: Optional[str], job: str) -> None:
    """The client's record of a stop it asked for (the driver records its own, when it gets to)."""
    if folder and is_remote(folder):
        folder = str(local_run(folder, only=(MANIFEST,)))
    if not folder or not (Path(folder) / MANIFEST).exists():
        return  # the run folder is on the cluster's storage, not visible here
    manifest = read_json(Path(folder) / MANIFEST)
    if manifest.get("status") == "RUNNING" and latest_attempt(manifest).get("submission_id") == job:
        update_manifest(folder, **ended(manifest, "STOPPED", f"Stopped: ftlaunch stop {job}"))


def job_row(job: dict) -> dict:
    """A row for a cluster's job whose run folder this machine cannot read (remote storage)."""
    return {"run_id": job.get("submission_id"), "status": job.get("status"), "kind": job.get("kind"),
            "name": job.get("name"), "submission_id": job.get("submission_id"), "attempts": 1,
            "step": None, "total_steps": None, "loss": None, "eval": None, "eta_s": None,
            "started": _epoch(job.get("start_time")), "duration_s": None,
            "error": job.get("message") if job.get("status") == "FAILED" else None,
            "run_dir": job.get("run_dir")}


def _epoch(value) -> Optional[float]:
    """Ray's job times are epoch milliseconds; a RayJob's are ISO text (left out)."""
    return value / 1000 if isinstance(value, (int, float)) else None


def total_steps(manifest: dict) -> Optional[int]:
    return ((manifest.get("spec") or {}).get("train") or {}).get("max_steps")


def run_row(folder: Path, manifest: dict, now: Optional[float] = None) -> dict:
    """What `ftlaunch status --json` and `list --json` print of a run."""
    now = time.time() if now is None else now
    records = [r for r in read_jsonl(Path(folder) / METRICS) if "step" in r]
    last = records[-1] if records else {}
    total, step = total_steps(manifest), last.get("step")
    started, finished = manifest.get("started"), manifest.get("finished")
    evals = [r for r in records if _eval_of(r) is not None]
    eta = None
    if manifest.get("status") == "RUNNING" and step and total and last.get("elapsed_s") is not None:
        eta = max(total - step, 0) * last["elapsed_s"] / step
    return {
        "run_id": manifest.get("run_id", Path(folder).name),
        "status": manifest.get("status"),
        "kind": manifest.get("kind"),
        "name": manifest.get("name"),
        "submission_id": latest_attempt(manifest).get("submission_id"),
        "attempts": len(manifest.get("attempts") or []),
        "step": step,
        "total_steps": total,
        "loss": last.get("loss"),
        "eval": _eval_of(evals[-1]) if evals else None,
        "eta_s": eta,
        "started": started,
        "duration_s": (finished or now) - started if started else None,
        "error": manifest.get("error"),
        "run_dir": str(folder),
    }


def _eval_of(record: dict) -> Optional[tuple[str, float]]:
    """The record's eval metric: eval_loss, else its first eval_* number."""
    keys = ["eval_loss"] + sorted(k for k in record if k.startswith("eval_") and k != "eval_loss")
    for key in keys:
        if isinstance(record.get(key), (int, float)):
            return key.removeprefix("eval_"), record[key]
    return None


def status_lines(row: dict) -> list[str]:
    """`ftlaunch status RUN`, for a person."""
    head = [row["run_id"], row["status"] or "-", f"step {_steps(row)}", f"loss {_num(row['loss'])}"]
    if row["eval"]:
        head.append(f"eval {row['eval'][0]} {_num(row['eval'][1])}")
    if row["eta_s"] is not None:
        head.append(f"eta {_duration(row['eta_s'])}")
    lines = ["  ".join(head),
             f"started {_when(row['started'])}  duration {_duration(row['duration_s'])}  "
             f"attempts {row['attempts']} (latest job {row['submission_id'] or '-'})"]
    if row["error"]:
        lines.append(f"error: {row['error']}")
    lines.append(f"artifacts: {row['run_dir']}")
    return lines


COLUMNS = (("RUN", 28), ("STATUS", 10), ("STEP", 11), ("LOSS", 8), ("EVAL", 8), ("ETA", 7),
           ("STARTED", 20), ("DURATION", 9), ("KIND", 10), ("NAME", 0))


def list_lines(rows: list[dict]) -> list[str]:
    """`ftlaunch list`: a header and one row per run."""
    def cells(r: dict) -> tuple:
        return (r["run_id"], r["status"] or "-", _steps(r), _num(r["loss"]),
                _num(r["eval"][1]) if r["eval"] else "-", _duration(r["eta_s"]), _when(r["started"]),
                _duration(r["duration_s"]), r["kind"] or "-", r["name"] or "-")

    def line(values) -> str:
        return " ".join(f"{v:<{w}}" for v, (_, w) in zip(values, COLUMNS)).rstrip()

    return [line([name for name, _ in COLUMNS]), *(line(cells(r)) for r in rows)]


def _steps(row: dict) -> str:
    if row["step"] is None:
        return "-"
    return f"{row['step']}/{row['total_steps']}" if row["total_steps"] else str(row["step"])


def _num(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, s = divmod(seconds, 60)
    return f"{minutes}m{s:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def _when(epoch: Optional[float]) -> str:
    return "-" if epoch is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))
