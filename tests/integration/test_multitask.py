"""kind: multitask on the session's real Ray head: fan-out, failure isolation, resume, packed."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

import launcher
from common.runfolder import read_jsonl
from launcher.inference import AdapterSet
from launcher.registry import load_registry
from tests.conftest import ROOT, ftlaunch_cli

pytestmark = pytest.mark.integration


def cli(*args, timeout=400):
    return subprocess.run([*ftlaunch_cli(), *args], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ), timeout=timeout)


def spec_for(mt_data, tmp_path, **extra):
    spec = {
        "kind": "multitask", "name": "it-mt", "storage": str(tmp_path / "runs"),
        "model": {"source": "tiny-llama", "seq_len": 80},  # the plain instruction template: ~55 tokens
        "strategy": {"type": "lora", "r": 8, "alpha": 16},
        "train": {"max_steps": 16, "micro_batch": 16, "lr": 0.01, "report_every": 4, "eval_batches": 1},
        "tasks": [
            {"name": "counting", "data": mt_data["counting"]},
            {"name": "alphabet", "data": mt_data["alphabet"], "lora": {"r": 4}},
            {"name": "instruction", "data": {"task": "instruction", **mt_data["instruction"]}},
        ],
    }
    spec.update(extra)
    return spec


def _records(run_dir: Path, task: str) -> list[dict]:
    return [json.loads(x) for x in (run_dir / f"metrics-{task}.jsonl").read_text().splitlines()]


def test_fanout_isolates_a_failing_task_and_resume_retrains_only_it(ray_head, mt_data, tmp_path):
    job = launcher.plan(launcher.load_spec(spec_for(mt_data, tmp_path)), "ray", submission_id="it-mt")
    assert job.resources["workers"] == 3
    # Break one task's data after the plan checked it: only reading it, in its worker, finds out.
    broken = Path(mt_data["instruction"]["train"])
    good = broken.read_bytes()
    broken.write_bytes(b"PAR1 not really parquet")
    try:
        handle = launcher.submit(job, address=ray_head.address)
        assert handle.wait(timeout=400) == "FAILED"
    finally:
        broken.write_bytes(good)
    run_dir = Path(handle.run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    tasks = manifest["tasks"]
    assert tasks["counting"]["status"] == tasks["alphabet"]["status"] == "SUCCEEDED", tasks
    assert tasks["instruction"]["status"] == "FAILED" and tasks["instruction"]["error"], tasks
    assert "1 of 3 tasks failed (instruction:" in manifest["error"] and "ftlaunch resume it-mt" in manifest["error"]
    first = load_registry(run_dir)["adapters"]
    assert sorted(first) == ["alphabet", "counting"]
    # The workers ran side by side, in processes of their own.
    a, b = first["counting"], first["alphabet"]
    assert a["worker_pid"] != b["worker_pid"]
    assert a["worker_started"] < b["worker_finished"] and b["worker_started"] < a["worker_finished"]
    assert [r["step"] for r in _records(run_dir, "counting")] == [4, 8, 12, 16]

    out = cli("resume", str(run_dir), "--address", ray_head.address)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "kept from an earlier attempt: counting, alphabet; training: instruction" in out.stdout
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "SUCCEEDED"
    assert manifest["summary"]["trained"] == ["instruction"]
    assert manifest["summary"]["kept"] == ["alphabet", "counting"]
    registry = load_registry(run_dir)["adapters"]
    assert sorted(registry) == ["alphabet", "counting", "instruction"]
    for name in ("alphabet", "counting"):  # untouched: same bytes, same creation time
        assert registry[name]["sha256"] == first[name]["sha256"]
        assert registry[name]["created"] == first[name]["created"]
    for name, entry in registry.items():
        assert entry["steps"] == 16 and not entry["packed"]
        assert entry["eval"]["eval_loss"] < entry["eval"]["eval_loss_before"], (name, entry["eval"])
    assert len({e["base_sha256"] for e in registry.values()}) == 1

    listed = cli("adapters", "list", str(run_dir), "--json")
    assert sorted(r["task"] for r in json.loads(listed.stdout)) == ["alphabet", "counting", "instruction"]
    infer = cli("infer", str(run_dir), "--task", "counting", "--input", "count from 41: 41",
                "--task", "alphabet", "--input", "letters from c: c", "--max-new-tokens", "3")
    assert infer.returncode == 0, infer.stderr[-2000:]
    answers = AdapterSet(run_dir).generate(["count from 41: 41", "letters from c: c"],
                                           tasks=["counting", "alphabet"], max_new_tokens=3)
    assert infer.stdout == "".join(f"{a}\n" for a in answers)  # the answers only, as the Python API gives them


def test_packed_job_trains_every_adapter_on_one_base_in_one_worker(ray_head, mt_data, mlflow_server, tmp_path):
    spec = spec_for(mt_data, tmp_path, packing=True)
    spec["tasks"] = spec["tasks"][:2]
    spec["tasks"][1]["train"] = {"max_steps": 8}  # alphabet drops out of the pack half-way
    spec["tracking"] = {"mlflow": {"uri": mlflow_server.uri, "experiment": "mt-packed"}}
    handle = launcher.submit(spec, "ray", address=ray_head.address, submission_id="it-mt-packed")
    assert handle.wait(timeout=400) == "SUCCEEDED", handle.logs()[-3000:]
    manifest = handle.manifest()
    assert manifest["plan"]["resources"]["workers"] == 1 and manifest["summary"]["packing"] is True
    registry = load_registry(handle.run_dir)["adapters"]
    assert {n: (e["steps"], e["packed"]) for n, e in registry.items()} == {
        "counting": (16, True), "alphabet": (8, True)}
    for entry in registry.values():
        assert entry["eval"]["eval_loss"] < entry["eval"]["eval_loss_before"]

    # Tracked: each task is a child run of the job's MLflow run, its loss at its steps.
    client, parent = mlflow_server.client(), manifest["tracking"]["mlflow"]["run_id"]
    runs = client.search_runs([manifest["tracking"]["mlflow"]["experiment_id"]], "tags.`ftlaunch.run_id` = 'it-mt-packed'")
    children = {r.data.tags["ftlaunch.curve"]: r.info.run_id for r in runs if r.info.run_id != parent}
    assert sorted(children) == ["alphabet", "counting"] and len(runs) == 3
    for task, child in children.items():
        kept = [(r["step"], r["loss"]) for r in read_jsonl(Path(handle.run_dir) / f"metrics-{task}.jsonl")]
        assert sorted((m.step, m.value) for m in client.get_metric_history(child, "loss")) == kept
    assert "adapters" in {f.path for f in client.list_artifacts(parent)}


def test_a_killed_adapter_worker_is_retried_and_continues_from_its_progress(ray_head, mt_data, tmp_path):
    """train.max_failures (default 1) is honoured: Ray starts the dead worker's task again, and it
    continues from its progress file; every report is in the metrics once."""
    import re
    import signal
    import time

    spec = spec_for(mt_data, tmp_path)
    spec["tasks"] = spec["tasks"][:1]
    spec["train"].update(max_steps=300, report_every=10)
    handle = launcher.submit(spec, "ray", address=ray_head.address, submission_id="it-mt-kill")
    run_dir, deadline = Path(handle.run_dir), time.monotonic() + 240
    progress, log = run_dir / ".progress" / "task-counting.pt", run_dir / "logs" / "task-counting.log"
    while not progress.exists():  # the first report's progress is written
        assert time.monotonic() < deadline, "no progress from the adapter worker"
        time.sleep(0.05)
    killed = int(re.findall(r"=== task-counting pid (\d+)", log.read_text())[-1])
    os.kill(killed, signal.SIGKILL)  # the worker of the job this test submitted
    killed_time = time.time()

    assert handle.wait(timeout=400) == "SUCCEEDED", handle.logs()[-3000:]
    records = _records(run_dir, "counting")
    assert [r["step"] for r in records] == list(range(10, 310, 10))  # every report once
    # The retried worker continued from its progress: what was reported before the kill is kept.
    before_kill = [r["step"] for r in records if r["time"] < killed_time]
    assert before_kill and before_kill[-1] < 300, before_kill
    pids = [int(p) for p in re.findall(r"=== task-counting pid (\d+)", log.read_text())]
    assert len(pids) == 2 and pids[0] == killed and pids[1] != killed, pids
    entry = load_registry(run_dir)["adapters"]["counting"]
    assert entry["steps"] == 300 and entry["eval"]["eval_loss"] < entry["eval"]["eval_loss_before"]


def test_joint_mode_trains_one_backbone_with_two_heads_in_one_ray_train_run(ray_head, tmp_path):
    """The shipped joint config, shortened, on the real head through the real CLI: one Ray Train
    worker streams both tasks' rows through Ray Data; each task reports on its own; the export
    reloads to the logits the run saved. (Learning is shown at length in tests/unit/test_multitask_joint.py.)"""
    import torch
    import yaml

    from launcher import synthetic
    from launcher.inference import JointModel

    spec = yaml.safe_load((ROOT / "configs" / "multitask" / "joint-minilm.yaml").read_text())
    for task, gen in zip(spec["tasks"], ("classification", "sentiment")):
        task["data"].update(train=str(synthetic.make(gen, 120, tmp_path / task["name"], 0, "train")),
                            eval=str(synthetic.make(gen, 16, tmp_path / task["name"], 7, "eval")))
    spec.update(storage=str(tmp_path / "runs"))
    spec["train"].update(max_steps=10, report_every=5, eval_batches=1)
    path = tmp_path / "joint.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = cli("submit", str(path), "--address", ray_head.address, "--submission-id", "it-joint", timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run_dir = Path(spec["storage"]) / "it-joint"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "SUCCEEDED" and manifest["plan"]["resources"]["workers"] == 1
    tasks = manifest["summary"]["tasks"]
    assert {n: t["batches"] for n, t in tasks.items()} == {"topic": 6, "sentiment": 4}  # 60/40 of 10 steps
    assert [r["step"] for r in _records(run_dir, "topic")] == [5, 10]
    assert all(r["task"] == "sentiment" and "eval_accuracy" in r for r in _records(run_dir, "sentiment"))
    assert "task topic" in out.stdout and "eval accuracy" in out.stdout  # the summary, per task
    probe = torch.load(run_dir / "probe.pt", weights_only=False)
    joint = JointModel(run_dir)
    for name in ("topic", "sentiment"):
        torch.testing.assert_close(joint.logits(probe[name]["texts"], task=name), probe[name]["logits"],
                                   atol=1e-4, rtol=1e-4)
