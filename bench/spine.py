"""B1 submit overhead and B3 training-loop throughput, against baselines measured in the same run.

B1 = (ftlaunch submit -> first training step) / (bare `ray job submit` of the same training ->
     first step). B3 = tokens/s of the job's Ray Train loop (steady state) / tokens/s of a plain
     PyTorch + peft loop on the same model and data in one process.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _first_step(path: Path, timeout: float = 300) -> float:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists():
            for line in path.read_text().splitlines():
                record = json.loads(line)
                if record.get("event") == "first_step":
                    return record["time"]
        time.sleep(0.05)
    raise TimeoutError(f"no first step recorded in {path}")


def _wait(address: str, sid: str) -> str:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    while True:
        status = str(client.get_job_status(sid).value)
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(0.5)


def b1(address: str, work: Path, data: dict, repeats: int = 3) -> dict:
    """Seconds from `ftlaunch submit` to the job's first optimizer step, and from a bare `ray job
    submit` of the same training (bench/bare_train.py) to its first step, alternating, `repeats`
    times each: the ratio of the medians (of three, so that one start slowed by the shared
    machine does not decide it)."""
    ftl, bare = [], []
    for i in range(repeats):
        spec = work / f"b1-{i}.yaml"
        spec.write_text(json.dumps({
            "kind": "finetune", "name": "b1", "model": {"source": "tiny-llama", "seq_len": 48},
            "strategy": {"type": "lora", "r": 8, "alpha": 16},
            "data": {"train": data["train"]},
            "train": {"max_steps": 10, "micro_batch": 16, "lr": 3e-3, "report_every": 10, "eval_batches": 0},
            "resources": {"workers": 2, "cpus_per_worker": 0.5}, "storage": str(work / "runs"),
        }))
        sid = f"b1-ftl-{os.getpid()}-{i}"
        t0 = time.time()
        subprocess.run([str(BIN / "ftlaunch"), "submit", str(spec), "--no-wait", "--address", address,
                        "--submission-id", sid], check=True, capture_output=True, cwd=ROOT)
        ftl.append(_first_step(work / "runs" / sid / "events.jsonl") - t0)
        assert _wait(address, sid) == "SUCCEEDED"

        mark = work / f"bare-{i}.jsonl"
        mark.unlink(missing_ok=True)  # the script appends: an earlier run's mark is not this one's
        sid = f"b1-bare-{os.getpid()}-{i}"
        t0 = time.time()
        subprocess.run([str(BIN / "ray"), "job", "submit", "--no-wait", "--address", address,
                        "--submission-id", sid, "--", "python", str(ROOT / "bench" / "bare_train.py"),
                        "--data", data["train"], "--mark", str(mark), "--storage", str(work / "bare")],
                       check=True, capture_output=True, cwd=ROOT)
        bare.append(_first_step(mark) - t0)
        assert _wait(address, sid) == "SUCCEEDED"
    f, b = statistics.median(ftl), statistics.median(bare)
    return {"ftlaunch_to_first_step_s": [round(x, 2) for x in ftl],
            "bare_to_first_step_s": [round(x, 2) for x in bare],
            "ratio": round(f / b, 3), "goal": "<= 1.05"}


def b3(address: str, work: Path, data: dict, steps: int = 240) -> dict:
    """Both sides: one worker, one thread, micro-batch 16, seq 48, same model, LoRA and data."""
    import launcher

    spec = {
        "kind": "finetune", "name": "b3", "model": {"source": "tiny-llama", "seq_len": 48},
        "strategy": {"type": "lora", "r": 8, "alpha": 16},
        "data": {"train": data["train"]},
        "train": {"max_steps": steps, "micro_batch": 16, "lr": 3e-3, "report_every": 20, "eval_batches": 0},
        "resources": {"workers": 1, "cpus_per_worker": 1}, "storage": str(work / "runs"),
    }
    handle = launcher.submit(spec, "ray", address=address)
    assert handle.wait() == "SUCCEEDED", handle.logs()[-2000:]
    records = [json.loads(x) for x in (Path(handle.run_dir) / "metrics.jsonl").read_text().splitlines()]
    steady = records[1:]  # the first window carries worker start, imports and the first batches
    ray_tps = statistics.median(r["tokens_per_s"] for r in steady)
    plain = plain_loop(data["train"], steps)
    return {"ray_train_tokens_per_s": round(ray_tps), "plain_tokens_per_s": round(plain),
            "ratio": round(ray_tps / plain, 3), "goal": ">= 0.95",
            # reported apart from the loop: worker start, imports, data pipeline start
            "first_window_s": round(records[0]["elapsed_s"], 2),
            "steady_window_s": round(records[1]["elapsed_s"] - records[0]["elapsed_s"], 2)}


def plain_loop(train: str, steps: int) -> float:
    """The same training in one process, no Ray: steady-state tokens/s over windows of 20 steps."""
    import pyarrow.parquet as pq
    import torch

    from jobs import components as C

    torch.set_num_threads(1)
    model = C.apply_strategy(C.build_model({"source": "tiny-llama"}), {
        "type": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    enc = C.tokenize_causal({"text": pq.read_table(train).column("text").to_pylist()}, "text", 48)
    data = {k: torch.from_numpy(v) for k, v in enc.items()}
    rates, tokens, start = [], 0, time.perf_counter()
    for step in range(1, steps + 1):
        i = (step - 1) * 16 % (len(data["input_ids"]) - 16)
        batch = {k: v[i:i + 16] for k, v in data.items()}
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        tokens += int(batch["attention_mask"].sum())
        if step % 20 == 0:
            now = time.perf_counter()
            rates.append(tokens / (now - start))
            tokens, start = 0, now
    return statistics.median(rates[1:])
