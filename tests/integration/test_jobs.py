"""Real jobs on the session's one local Ray head: CLI, raw `ray job submit`, Python API."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import launcher
from launcher.client import attach
from launcher.errors import SubmissionError
from tests.conftest import ROOT, ftlaunch_cli

pytestmark = pytest.mark.integration


def write_spec(spec: dict, tmp_path: Path, name="spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text("# ftlaunch submit " + name + "\n" + yaml.safe_dump(spec))
    return path


def cli(*args, env=None, timeout=400):
    return subprocess.run([*ftlaunch_cli(), *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def test_cli_lora_job_learns_keeps_base_and_reloads(ray_head, tiny_spec, tmp_path):
    path = write_spec(tiny_spec, tmp_path)
    out = cli("submit", str(path), "--submission-id", "it-lora", "--address", ray_head.address)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "submitted it-lora" in out.stdout and "SUCCEEDED" in out.stdout
    assert "[ftlaunch] step 30/30" in out.stdout  # progress reached the tail

    run_dir = Path(tiny_spec["storage"]) / "it-lora"
    # Quiet by default: ftlaunch's lines and the readable summary; Ray's and the libraries' lines
    # stay in the job's log (driver.log, the Jobs API log), which --verbose shows.
    driver_log = (run_dir / "logs" / "driver.log").read_text()
    for noise in ("INFO worker.py", "(RayTrainWorker pid=", "[ftlaunch] summary {"):
        assert noise in driver_log and noise not in out.stdout, noise
    assert re.search(r"^loss\s+\d+\.\d{4} -> \d+\.\d{4} over 30 steps$", out.stdout, re.M), out.stdout
    verbose = cli("submit", str(path), "--submission-id", "it-lora", "--verbose", "--address", ray_head.address)
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    assert "INFO worker.py" in verbose.stdout and "(RayTrainWorker pid=" in verbose.stdout
    # Progress lines are whole lines, never glued to a Ray line written at the same time.
    progress = [line for line in verbose.stdout.splitlines() if "[ftlaunch] step " in line]
    assert len(progress) == 3 and all(line.startswith("[ftlaunch] step ") for line in progress), progress
    manifest = json.loads((run_dir / "manifest.json").read_text())
    s = manifest["summary"]
    assert manifest["status"] == "SUCCEEDED" and s["steps"] == 30
    assert s["loss_last"] < s["loss_first"] - 0.2, s
    assert s["eval_loss_after"] < s["eval_loss_before"]
    # Base weights bit-identical; the adapter moved.
    assert s["digests_after"]["frozen"] == s["digests_before"]["frozen"]
    assert s["digests_after"]["trainable"] != s["digests_before"]["trainable"]
    assert 0 < s["trainable_params"] < s["total_params"]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [10, 20, 30]
    assert manifest["artifacts"]["adapter/adapter_model.safetensors"] > 0
    assert {"ray", "torch", "peft"} <= set(manifest["versions"])
    # Success removes the training checkpoints (keep_checkpoints: false): the export is the result.
    assert s["checkpoints_removed_bytes"] > 0 and not [p for p in run_dir.rglob("checkpoint_*") if p.is_dir()]

    # The saved adapter, reloaded onto the saved base, reproduces the trained model's logits.
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    probe = torch.load(run_dir / "probe.pt")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run_dir / "base"),
                                      run_dir / "adapter").eval()
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    torch.testing.assert_close(logits, probe["logits"], rtol=0, atol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(run_dir / "base").eval()
    with torch.no_grad():
        assert not torch.allclose(base(input_ids=probe["input_ids"]).logits, probe["logits"], atol=1e-3)

    # The workers wrote every record as TensorBoard scalars too; `ftlaunch report` reads the folder.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard" / "train"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [10, 20, 30]
    assert [e.value for e in events.Scalars("eval_loss")] == pytest.approx([m["eval_loss"] for m in metrics])
    out = cli("report", str(run_dir))
    assert out.returncode == 0, out.stderr[-2000:]
    report = run_dir / "report" / "report.md"
    assert out.stdout.split()[:2] == [str(report), str(run_dir / "report" / "report.html")]
    text = report.read_text()
    assert f"train loss {metrics[0]['loss']:.4f} -> {metrics[-1]['loss']:.4f} (steps 10 -> 30" in text
    assert f"eval loss {s['eval_loss_before']:.4f} -> {s['eval_loss_after']:.4f}" in text
    assert f"measured peak RSS {s['peak_rss_mb']:,.0f} MiB" in text and "- train: planned " in text
    for png in ("loss-train.png", "eval-train.png", "throughput-train.png", "memory.png"):
        assert (run_dir / "report" / png).stat().st_size > 5000, png


def test_raw_ray_job_submit_runs_the_same_job(ray_head, tiny_spec, tmp_path):
    tiny_spec["train"]["max_steps"] = 10
    path = write_spec(tiny_spec, tmp_path)
    ray_bin = str(Path(sys.executable).parent / "ray")
    out = subprocess.run(
        [ray_bin, "job", "submit", "--address", ray_head.address, "--submission-id", "it-raw",
         "--working-dir", ".", "--", "python", "-m", "jobs.run", "--spec", str(path)],
        capture_output=True, text=True, cwd=ROOT, timeout=400,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    manifest = json.loads((Path(tiny_spec["storage"]) / "it-raw" / "manifest.json").read_text())
    assert manifest["status"] == "SUCCEEDED" and manifest["summary"]["steps"] == 10
    # ftlaunch tracks the raw submission like its own.
    assert cli("status", "it-raw", "--address", ray_head.address).stdout.startswith("it-raw  SUCCEEDED")


def test_python_api_submit_wait_and_idempotent_resubmit(ray_head, tiny_spec):
    tiny_spec["train"]["max_steps"] = 10
    handle = launcher.submit(tiny_spec, "ray", address=ray_head.address, submission_id="it-api")
    assert not handle.existing
    again = launcher.submit(tiny_spec, "ray", address=ray_head.address, submission_id="it-api")
    assert again.existing and again.submission_id == "it-api"
    # The same id with another spec is not that job: refused, naming both spec hashes.
    with pytest.raises(SubmissionError, match=r"submission id it-api is already job it-api with another spec"):
        launcher.submit(tiny_spec, "ray", address=ray_head.address, submission_id="it-api",
                        overrides=("train.lr=0.02",))
    assert handle.wait(timeout=400) == "SUCCEEDED"
    assert handle.manifest()["summary"]["steps"] == 10
    assert "[ftlaunch] step 10/10" in handle.logs()
    listed = {j["submission_id"]: j for j in launcher.list_jobs("ray", ray_head.address)}
    assert listed["it-api"]["status"] == "SUCCEEDED" and listed["it-api"]["kind"] == "finetune"


def test_two_jobs_whose_workers_take_every_cpu_both_train_at_once(ray_head, tiny_spec):
    """Two 2 x 0.5-CPU finetunes take the 2-CPU head's every CPU with their workers. Their Ray Data
    tasks ask none (jobs/data/read.py task_args): when each asked one, neither job read a row and
    both stood RUNNING at step 0 for as long as they were let."""
    from ray.util.state import list_placement_groups

    assert ray_head.cpus == 2 * tiny_spec["resources"]["workers"] * tiny_spec["resources"]["cpus_per_worker"]
    steps = 150  # past the first epoch (1200 rows, 32 a step): later epochs are read again
    tiny_spec["train"].update(max_steps=steps, report_every=50)
    handles = [launcher.submit(tiny_spec, "ray", address=ray_head.address, submission_id=f"it-full-cpu-{i}")
               for i in range(2)]
    both_placed, deadline = False, time.monotonic() + 400
    while not all(h.status() in ("SUCCEEDED", "FAILED", "STOPPED") for h in handles):
        assert time.monotonic() < deadline, [h.status() for h in handles]
        placed = [g for g in list_placement_groups(address=ray_head.address) if g.state == "CREATED"]
        both_placed = both_placed or len(placed) >= 2  # every CPU held by the two jobs' workers
        time.sleep(0.3)
    assert [h.status() for h in handles] == ["SUCCEEDED", "SUCCEEDED"], handles[0].logs()[-3000:]
    assert both_placed  # what stalled them: both worker groups placed at once
    for h in handles:
        records = [json.loads(x) for x in (Path(h.run_dir) / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [50, 100, 150]


def test_address_beats_ray_address_and_hints_are_one_command_per_line(ray_head, tiny_spec, tmp_path):
    """Ray's JobSubmissionClient prefers RAY_ADDRESS to the address it is given: ftlaunch must not."""
    dead = "http://127.0.0.1:9"
    # A driver that called ray.init itself is listed by Ray with no submission id: not an ftlaunch job.
    driver = "import ray; ray.init(address=%r); ray.shutdown()" % ray_head.gcs_address
    subprocess.run([sys.executable, "-c", driver], check=True, timeout=120, capture_output=True)
    out = cli("list", "--target", "ray", "--address", ray_head.address, env={"RAY_ADDRESS": dead})
    assert out.returncode == 0, out.stderr
    assert all(line.split()[0] != "-" for line in out.stdout.splitlines()), out.stdout
    assert f"RAY_ADDRESS={dead} is ignored: using {ray_head.address} (--address)" in out.stderr
    # The default target is the embedded head (this session's), whatever RAY_ADDRESS says.
    out = cli("list", env={"RAY_ADDRESS": dead})
    assert out.returncode == 0 and "(the embedded head (target local))" in out.stderr, out.stderr
    # Without --address, target ray takes RAY_ADDRESS, and a dead one is named.
    out = cli("list", "--target", "ray", "--storage", str(tmp_path / "no-runs"), env={"RAY_ADDRESS": dead})
    assert out.returncode == 1 and f"cannot reach a Ray cluster at {dead}" in out.stderr  # nothing to show

    tiny_spec["train"]["max_steps"] = 4
    out = cli("submit", str(write_spec(tiny_spec, tmp_path)), "--no-wait", "--submission-id", "it-hints",
              "--address", ray_head.address)
    assert out.returncode == 0, out.stderr
    nxt = out.stdout.splitlines()
    hints = nxt[nxt.index("ftlaunch: next:") + 1:][:3]  # unprefixed: each line pastes as a command
    assert hints == [f"  ftlaunch {v} it-hints --address {ray_head.address}" for v in ("status", "logs -f", "stop")]
    assert not any("|" in line for line in nxt)  # pasted, a pipeline would run `stop`
    assert attach("it-hints", "ray", address=ray_head.address).wait(timeout=300) == "SUCCEEDED"


def test_failing_job_reports_failed_with_its_message(ray_head, tiny_spec, tmp_path):
    # A user's model folder whose config and tokenizer plan fine but whose weights file is
    # corrupt: only loading the weights, in the workers, can find that out.
    from launcher.modelmake import make_model

    model_dir = make_model("llama", tmp_path / "corrupt-model")
    (model_dir / "model.safetensors").write_bytes(b"not a safetensors file")
    tiny_spec["model"]["source"] = f"hf:{model_dir}"
    path = write_spec(tiny_spec, tmp_path)
    out = cli("submit", str(path), "--submission-id", "it-fail", "--address", ray_head.address)
    assert out.returncode == 1
    assert "it-fail FAILED" in out.stdout
    manifest = json.loads((Path(tiny_spec["storage"]) / "it-fail" / "manifest.json").read_text())
    assert manifest["status"] == "FAILED"
    assert "safetensors" in manifest["error"].lower() or "header" in manifest["error"], manifest["error"]
    assert attach("it-fail", "ray", ray_head.address).status() == "FAILED"


def test_stop_a_running_job(ray_head, tiny_spec, tmp_path):
    tiny_spec["train"]["max_steps"] = 100000
    path = write_spec(tiny_spec, tmp_path)
    out = cli("submit", str(path), "--submission-id", "it-stop", "--no-wait", "--address", ray_head.address)
    assert out.returncode == 0, out.stderr
    handle = attach("it-stop", "ray", ray_head.address)
    deadline = time.monotonic() + 120
    while handle.status() != "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert handle.status() == "RUNNING"
    # By its run folder (its latest attempt's job is the one stopped), as by its submission id.
    stop = cli("stop", handle.run_dir, "--wait", "--address", ray_head.address)
    assert stop.returncode == 0 and "it-stop: STOPPED" in stop.stdout, stop.stdout + stop.stderr
    assert handle.status() == "STOPPED"
    # Recorded: by this client as it asked, and by the driver at SIGTERM (within Ray's grace).
    manifest = handle.manifest()
    assert manifest["status"] == "STOPPED" and manifest["attempts"][-1]["status"] == "STOPPED", manifest
    assert manifest["error"].startswith("Stopped: "), manifest["error"]
    status = cli("status", "it-stop", "--address", ray_head.address)
    assert status.stdout.startswith("it-stop  STOPPED  step "), status.stdout + status.stderr
    report = cli("report", handle.run_dir)
    assert report.returncode == 0, report.stderr
    text = (Path(handle.run_dir) / "report" / "report.md").read_text()
    assert "status: STOPPED" in text and "so far" not in text


def test_ctrl_c_while_attached_leaves_the_job_running_and_stop_on_interrupt_stops_it(ray_head, tiny_spec, tmp_path):
    tiny_spec["train"].update(max_steps=100000, report_every=2)
    path = write_spec(tiny_spec, tmp_path)
    args = ["submit", str(path), "--submission-id", "it-ctrl-c", "--address", ray_head.address]

    def interrupt(*extra):
        """Follow the job, Ctrl-C once it reports a step; return (exit code, stdout, seconds to exit)."""
        # SIGINT as a terminal delivers it: a test run started in the background by a shell
        # (`cmd &`) inherits SIGINT ignored, and the client would then follow on past the Ctrl-C.
        proc = subprocess.Popen([*ftlaunch_cli(), *args, *extra], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if "[ftlaunch] step" in line:
                break
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        out, _ = proc.communicate(timeout=60)
        return proc.returncode, "".join(seen) + out, time.monotonic() - sent

    code, out, took = interrupt()
    assert code == 130 and took < 2.0, (code, took, out[-2000:])
    tail = out.splitlines()[-3:]
    addr = f" --address {ray_head.address}"
    assert tail == ["ftlaunch: it-ctrl-c is still running; follow it or stop it with:",
                    f"  ftlaunch logs -f it-ctrl-c{addr}", f"  ftlaunch stop it-ctrl-c{addr}"], out[-2000:]
    handle = attach("it-ctrl-c", "ray", ray_head.address)
    assert handle.status() == "RUNNING"

    # The same id attaches to the same job; now Ctrl-C stops it, and the stop is recorded.
    code, out, took = interrupt("--stop-on-interrupt")
    assert code == 130 and "stopped it-ctrl-c (--stop-on-interrupt)" in out, out[-2000:]
    assert handle.wait(timeout=60) == "STOPPED" and handle.manifest()["status"] == "STOPPED"

    # Following a job that someone stopped is not a crash: exit 3, saying so (see submit --help).
    again = cli(*args)
    assert again.returncode == 3, again.stdout[-2000:] + again.stderr[-2000:]
    assert f"it-ctrl-c was stopped before it finished; continue it with: ftlaunch resume {handle.run_dir}" \
        in again.stderr
    assert "3    the job was stopped" in cli("submit", "--help").stdout


def test_stop_then_resume_continues_from_the_last_checkpoint(ray_head, tiny_spec, tmp_path):
    # The first attempt cannot finish before the stop lands (a 60-step run once did, on a busy CI).
    tiny_spec["train"].update(max_steps=100000, report_every=5)
    handle = launcher.submit(tiny_spec, "ray", address=ray_head.address, submission_id="it-resume")
    run_dir = Path(handle.run_dir)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()] \
            if (run_dir / "metrics.jsonl").exists() else []
        if steps and steps[-1] >= 10:
            break
        time.sleep(0.5)
    handle.stop()
    assert handle.wait(timeout=60) == "STOPPED"
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "STOPPED"
    # The driver's SIGTERM handler ended it (its stop once sat in Ray Train's blocking get until
    # Ray's SIGKILL 15 s later, the workers training on), and each worker ended at its SIGTERM
    # instead of taking it for a preemption notice.
    logs = run_dir / "logs"
    assert "[ftlaunch] STOPPED: Stopped: stopped by request (SIGTERM)" in (logs / "driver.log").read_text()
    deadline = time.monotonic() + 30  # Ray ends the workers once it has seen the driver go
    while time.monotonic() < deadline:
        workers = "".join(p.read_text() for p in logs.glob("worker-*.log"))
        if workers.count("the run was stopped; ending now") == 2:
            break
        time.sleep(0.5)
    assert workers.count("the run was stopped; ending now") == 2, workers[-3000:]
    assert "checkpointing at the next step" not in workers
    reached = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    target = reached + 10

    # A resume may run longer (train.max_steps), not change what the checkpoint is of.
    refused = cli("resume", str(run_dir), "model.seq_len=64", "--address", ray_head.address)
    assert refused.returncode == 1 and "resume cannot change model.seq_len" in refused.stderr
    out = cli("resume", str(run_dir), f"train.max_steps={target}", "--address", ray_head.address)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "resumed as it-resume-resume1" in out.stdout
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "SUCCEEDED" and manifest["summary"]["steps"] == target and manifest["error"] is None
    assert [a["submission_id"] for a in manifest["attempts"]] == ["it-resume", "it-resume-resume1"]
    assert [a["status"] for a in manifest["attempts"]] == ["STOPPED", "SUCCEEDED"]
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(5, target + 5, 5)), steps  # every report once: none lost, none repeated
    # The run's status is its latest attempt's, asked by the first attempt's id, the run id or folder.
    for ref in ("it-resume", str(run_dir)):
        status = cli("status", ref, "--address", ray_head.address)
        assert status.stdout.startswith(f"{manifest['run_id']}  SUCCEEDED  step {target}/{target}"), status.stdout + status.stderr
