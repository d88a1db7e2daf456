"""kind: compare end to end: DeepSpeed full fine-tuning against LoRA on the same data and eval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.runfolder import median_throughput
from tests.integration.test_jobs import cli, write_spec

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # two jobs in one: ~3 min on 2 cores


def test_compare_deepspeed_full_against_lora(ray_head, tmp_path):
    """On chat SFT of a model-make folder, so both engines answer the eval prompts (exact match)."""
    from launcher.modelmake import make_model
    from launcher.synthetic import make_splits

    folder = make_model("qwen2", tmp_path / "q")
    data = {k: str(v) for k, v in make_splits("chat", 1000, tmp_path / "chat", fmt="jsonl").items()}
    spec = {
        "kind": "compare",
        "name": "t-cmp",
        "model": {"source": f"hf:{folder}", "seq_len": 96},
        "strategy": {"type": "lora", "r": 8, "alpha": 16},
        "data": {"task": "chat", "train": data["train"], "eval": data["eval"]},
        "train": {"max_steps": 10, "micro_batch": 16, "lr": 3e-3, "report_every": 5, "eval_batches": 2,
                  "eval_generate": 16},
        "resources": {"workers": 2, "cpus_per_worker": 0.5},
        "storage": str(tmp_path / "runs"),
        "variants": {
            "ds_full": {"engine": "deepspeed", "deepspeed": {"zero_stage": 2}, "strategy": {"type": "full"},
                        "train": {"lr": 1e-3}},
            "lora8": {"strategy": {"type": "lora", "r": 8, "alpha": 16}, "train": {"lr": 1e-2}},
        },
    }
    out = cli("submit", str(write_spec(spec, tmp_path)), "--submission-id", "it-cmp",
              "--address", ray_head.address, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run_dir = Path(spec["storage"]) / "it-cmp"
    s = json.loads((run_dir / "manifest.json").read_text())["summary"]
    full, lora = s["variants"]["ds_full"], s["variants"]["lora8"]
    assert full["engine"] == "deepspeed ZeRO-2" and lora["engine"] == "torch"
    assert lora["trainable_params"] < full["trainable_params"]
    for v in (full, lora):
        assert v["loss_last"] < v["loss_first"] and v["eval_loss_after"] < v["eval_loss_before"]
        # Both engines answer the eval prompts: DeepSpeed's driver with the base, then the export.
        assert 0 <= v["eval_exact_match_before"] <= 1 and 0 <= v["eval_exact_match_after"] <= 1, v
    # The run's report is written when it ends: the comparison table, its figure, each variant's curves.
    report = (run_dir / "report" / "report.md").read_text()
    assert "| ds_full | full | deepspeed ZeRO-2 |" in report and "| lora8 | lora r=8 | torch |" in report
    assert "## variant ds_full" in report and "## variant lora8" in report
    for png in ("comparison.png", "loss-ds_full.png", "loss-lora8.png"):
        assert (run_dir / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<table>" in (run_dir / "report" / "report.html").read_text()
    assert (run_dir / "variants" / "ds_full" / "model" / "config.json").exists()
    assert (run_dir / "variants" / "lora8" / "adapter" / "adapter_config.json").exists()
    # The table's tokens/s is the report's: the median of the variant's report windows.
    for name, v in s["variants"].items():
        metrics = [json.loads(line) for line in (run_dir / "variants" / name / "metrics.jsonl").open()]
        assert v["tokens_per_s"] == median_throughput(metrics)
        assert f"throughput median {v['tokens_per_s']:,.0f} tokens/s" in report
