"""Load on one embedded head: 50 submissions from 10 threads, then 60 s of status / list / logs
calls from 10 threads (loopback only, the real Jobs API). Checks that no call failed and that
every job is there exactly once, records each call's p50/p99 latency and how many drivers ran
at once (the head's driver slots; the other jobs wait PENDING with no process), then stops
every job it made, by its submission id.

    python -m bench.run load          (or as part of make bench) -> bench/results/load.json
"""

from __future__ import annotations

import statistics
import threading
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SUBMISSIONS, SUBMIT_THREADS = 50, 10
CALL_THREADS, CALL_SECONDS = 10, 60.0


def _spec(data: dict, storage: Path) -> dict:
    """A tiny LoRA run long enough to still be running (or queued) when the load ends."""
    return {"kind": "finetune", "name": "load", "model": {"source": "tiny-llama", "seq_len": 32},
            "strategy": {"type": "lora", "r": 4, "alpha": 8},
            "data": {"train": data["train"], "eval": data["eval"]},
            "train": {"max_steps": 100000, "micro_batch": 8, "report_every": 50, "eval_batches": 1},
            "resources": {"workers": 1, "cpus_per_worker": 0.25}, "storage": str(storage)}


def _quantiles(seconds: list[float]) -> dict:
    ordered = sorted(seconds)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else None
    return {"calls": len(ordered), "p50_s": round(statistics.median(ordered), 4) if ordered else None,
            "p99_s": round(p99, 4) if p99 is not None else None,
            "max_s": round(ordered[-1], 4) if ordered else None}


class Calls:
    """Client calls made from many threads at once, each timed; a failure is counted and named."""

    def __init__(self):
        self.errors: list[str] = []
        self.latencies: dict[str, list[float]] = {"submit": [], "status": [], "list": [], "logs": []}
        self.most_running = 0
        self._lock = threading.Lock()

    def timed(self, name: str, call):
        started = time.perf_counter()
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 -- every failure is a finding, counted and named
            where = traceback.extract_tb(exc.__traceback__)[-1]
            with self._lock:
                self.errors.append(f"{name}: {type(exc).__name__}: {exc} (at {where.filename}:{where.lineno})"[-400:])
        finally:
            with self._lock:
                self.latencies[name].append(time.perf_counter() - started)

    def hammer(self, address: str, ids: list[str], storage: Path, seconds: float, threads: int) -> None:
        """`threads` threads calling status, list and logs in turn on the jobs `ids` for `seconds`;
        notes the most of those jobs Ray listed RUNNING at once."""
        from launcher.client import attach, list_jobs, run_status

        stop_at = time.monotonic() + seconds

        def caller(i: int) -> None:
            n = 0
            while time.monotonic() < stop_at:
                sid = ids[(i * 7 + n) % len(ids)]
                kind = ("status", "list", "logs")[n % 3]
                if kind == "status":
                    self.timed("status", lambda: run_status(sid, "ray", address, storage=str(storage)))
                elif kind == "list":
                    jobs = self.timed("list", lambda: list_jobs("ray", address))
                    running = sum(1 for j in jobs or [] if j["submission_id"] in ids and j["status"] == "RUNNING")
                    with self._lock:
                        self.most_running = max(self.most_running, running)
                else:
                    self.timed("logs", lambda: attach(sid, "ray", address).logs())
                n += 1

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(caller, range(threads)))


def run(address: str, work: Path, data: dict) -> dict:
    import launcher
    from launcher import capacity
    from launcher.client import attach, list_jobs, list_runs

    storage = work / "load-runs"
    spec = _spec(data, storage)
    ids = [f"load-{uuid.uuid4().hex[:6]}-{i:02d}" for i in range(SUBMISSIONS)]
    calls = Calls()
    slots = capacity.read_cluster(address).driver_slots
    handles, counts, runs = [], {}, []
    try:
        with ThreadPoolExecutor(SUBMIT_THREADS) as pool:
            handles = [h for h in pool.map(lambda sid: calls.timed("submit", lambda: launcher.submit(
                dict(spec), "ray", address=address, submission_id=sid)), ids) if h is not None]
        calls.hammer(address, ids, storage, CALL_SECONDS, CALL_THREADS)
        jobs = [j for j in list_jobs("ray", address) if j["submission_id"] in ids]
        counts = {sid: sum(1 for j in jobs if j["submission_id"] == sid) for sid in ids}
        runs, _ = list_runs("ray", address, storage=str(storage))
    finally:
        for sid in ids:  # every job this bench made, by its id
            try:
                attach(sid, "ray", address).stop()
            except Exception:  # noqa: BLE001 -- never submitted, or already ended
                pass
        for h in handles:
            try:
                h.wait(timeout=120)
            except Exception:  # noqa: BLE001
                pass

    lost = [sid for sid in ids if counts.get(sid, 0) == 0]
    duplicated = [sid for sid in ids if counts.get(sid, 0) > 1]
    return {
        "submissions": SUBMISSIONS, "submit_threads": SUBMIT_THREADS,
        "call_threads": CALL_THREADS, "call_seconds": CALL_SECONDS,
        "failed_calls": len(calls.errors), "errors": calls.errors[:10],
        "jobs_lost": lost, "jobs_duplicated": duplicated,
        "run_folders": len({r["run_id"] for r in runs if r["run_id"] in ids}),
        "driver_slots": slots, "most_drivers_running_at_once": calls.most_running,
        "latency": {name: _quantiles(values) for name, values in calls.latencies.items()},
        "ok": not calls.errors and not lost and not duplicated,
    }
