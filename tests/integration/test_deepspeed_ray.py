"""engine: deepspeed end to end: ZeRO-2 and ZeRO-3 full fine-tuning on two CPU Ray Train workers.

Submitted through the CLI to the session's head; each run learns, checkpoints every rank's ZeRO
shard through Ray Train, and exports (zero_to_fp32) a transformers model that reproduces the
trained model's logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.test_jobs import cli, write_spec

pytestmark = pytest.mark.integration


# ~85 s each on 2 loaded cores: ZeRO-3 (sharded parameters too) always, ZeRO-2 in the slow tier.
@pytest.mark.parametrize("stage", [pytest.param(2, marks=pytest.mark.slow), 3])
def test_zero_full_finetune_on_two_workers(ray_head, tiny_spec, tmp_path, stage):
    spec = {
        **tiny_spec,
        "name": f"t-zero{stage}",
        "engine": "deepspeed",
        "deepspeed": {"zero_stage": stage},
        "strategy": {"type": "full"},
        "train": {**tiny_spec["train"], "max_steps": 10, "report_every": 5, "lr": 3e-3},
        "keep_checkpoints": True,  # read below
    }
    sid = f"it-zero{stage}"
    out = cli("submit", str(write_spec(spec, tmp_path)), "--submission-id", sid,
              "--address", ray_head.address)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "SUCCEEDED" in out.stdout

    run_dir = Path(spec["storage"]) / sid
    manifest = json.loads((run_dir / "manifest.json").read_text())
    s = manifest["summary"]
    assert s["engine"] == "deepspeed" and s["deepspeed"]["zero_stage"] == stage
    assert s["steps"] == 10
    assert s["loss_last"] < s["loss_first"] - 0.3, s
    assert s["eval_loss_after"] < s["eval_loss_before"]
    assert s["trainable_params"] == s["total_params"]
    assert s["digests_after"]["trainable"] != s["digests_before"]["trainable"]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [5, 10]

    # Ray Train gathered both ranks' ZeRO shards into each checkpoint.
    ckpts = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert ckpts, list(run_dir.iterdir())
    shards = {p.name for p in (ckpts[-1] / "ds").iterdir()}
    assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= shards, shards

    # The export is a plain transformers model reproducing the trained model's logits.
    import torch
    from transformers import AutoModelForCausalLM

    probe = torch.load(run_dir / "probe.pt")
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model").eval()
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    torch.testing.assert_close(logits, probe["logits"], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_zero3_stop_then_resume_loads_the_deepspeed_checkpoint(ray_head, tiny_spec, tmp_path):
    import time

    import launcher

    spec = {**tiny_spec, "name": "t-zero3-resume", "engine": "deepspeed", "deepspeed": {"zero_stage": 3},
            "strategy": {"type": "full"},
            "train": {**tiny_spec["train"], "max_steps": 120, "report_every": 10, "lr": 3e-3}}
    # Long enough that the stop lands mid-training even on a loaded machine: a stop after the
    # last step keeps the run SUCCEEDED (jobs/run.py), and there would be nothing to resume.
    handle = launcher.submit(spec, "ray", address=ray_head.address, submission_id="it-zero3-resume")
    run_dir = Path(handle.run_dir)
    deadline = time.monotonic() + 240
    steps = []
    while time.monotonic() < deadline and not (steps and steps[-1] >= 10):
        if (run_dir / "metrics.jsonl").exists():
            steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        time.sleep(0.5)
    handle.stop()
    assert handle.wait(timeout=60) == "STOPPED"
    stopped_at = steps[-1]
    assert stopped_at < 120

    out = cli("resume", str(run_dir), "--address", ray_head.address)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "SUCCEEDED" and manifest["summary"]["steps"] == 120
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(10, 130, 10))  # none lost, none repeated
    # The resumed run continued from the weights it stopped with, not from scratch: its first
    # report after the checkpoint has a loss near the one before, far below the untrained 5.5.
    assert manifest["summary"]["eval_loss_after"] < manifest["summary"]["eval_loss_before"] - 0.5
    after = [m for m in metrics if m["step"] > stopped_at]
    assert after and after[0]["loss"] < metrics[0]["loss"], metrics
