"""Strategies through the launcher on the session's local Ray head: MiniLM LoRA classification
(real weights), and one run that combines gradual unfreezing, learning-rate groups, replay and EWC."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.test_jobs import cli, write_spec

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cls_data(tmp_path_factory):
    from launcher.synthetic import make

    out = tmp_path_factory.mktemp("cls")
    return {
        "train": str(make("classification", 800, out, 0, "train")),
        "eval": str(make("classification", 128, out, 1, "eval")),
        "retain": str(make("classification", 64, out, 2, "retain")),
    }


def test_minilm_lora_classification_accuracy_rises_and_adapter_reloads(ray_head, cls_data, tmp_path):
    spec = {
        "kind": "finetune", "name": "it-minilm",
        "model": {"source": "minilm", "num_labels": 4, "seq_len": 24},
        "strategy": {"type": "lora", "r": 8, "alpha": 16, "target_modules": ["query", "value"]},
        "data": {"task": "classification", **cls_data},
        "train": {"max_steps": 30, "micro_batch": 8, "lr": 1e-3, "report_every": 15, "eval_batches": 8},
        "resources": {"workers": 2, "cpus_per_worker": 0.5},
        "storage": str(tmp_path / "runs"),
    }
    out = cli("submit", str(write_spec(spec, tmp_path)), "--submission-id", "it-minilm",
              "--address", ray_head.address)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "eval accuracy" in out.stdout and "retain acc." in out.stdout  # the printed summary
    run_dir = Path(spec["storage"]) / "it-minilm"
    s = json.loads((run_dir / "manifest.json").read_text())["summary"]
    assert s["eval_accuracy_after"] > s["eval_accuracy_before"] + 0.3, s
    assert s["eval_accuracy_after"] >= 0.8, s
    assert s["retain_accuracy_delta"] == pytest.approx(s["retain_accuracy_after"] - s["retain_accuracy_before"])
    assert s["retain_loss_delta"] == pytest.approx(s["retain_loss_after"] - s["retain_loss_before"])
    assert s["digests_after"]["frozen"] == s["digests_before"]["frozen"]  # MiniLM's weights untouched
    assert s["peak_rss_mb"] > s["rss_start_mb"] > 0

    import torch

    from jobs import components as C
    from jobs import strategies as S

    probe = torch.load(run_dir / "probe.pt")
    model = S.reload(str(run_dir / "adapter"), C.build_model(spec["model"] | {"config": {}}, seed=0),
                     spec["strategy"])
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    torch.testing.assert_close(logits, probe["logits"], rtol=0, atol=1e-5)
    assert "[CLS]" in (run_dir / "tokenizer" / "tokenizer.json").read_text()  # MiniLM's own tokenizer


def test_gradual_unfreeze_lr_groups_replay_and_ewc_in_one_run(ray_head, demo_data, tmp_path):
    from launcher.synthetic import make

    old = make("alphabet", 600, tmp_path / "old", seed=7)
    spec = {
        "kind": "finetune", "name": "it-mitigate",
        "model": {"source": "tiny-llama", "seq_len": 40},
        "strategy": {"type": "gradual_unfreeze", "train": ["lm_head"],
                     "schedule": [{"step": 10, "unfreeze": [r"layers\.1\."]}]},
        "lr_groups": [{"name": "head", "params": ["lm_head"], "lr": 5e-3}],
        "mitigation": {"ewc": {"lambda": 50.0, "samples": 16}, "lr_cap": 4e-3},
        "data": {"train": demo_data["train"], "eval": demo_data["eval"], "retain": demo_data["retain"],
                 "replay": {"path": str(old), "fraction": 0.2}},
        "train": {"max_steps": 20, "micro_batch": 16, "lr": 3e-3, "report_every": 10, "eval_batches": 2},
        "resources": {"workers": 2, "cpus_per_worker": 0.5},
        "storage": str(tmp_path / "runs"),
    }
    out = cli("submit", str(write_spec(spec, tmp_path)), "--submission-id", "it-mitigate",
              "--address", ray_head.address)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run_dir = Path(spec["storage"]) / "it-mitigate"
    s = json.loads((run_dir / "manifest.json").read_text())["summary"]
    # The schedule opened block 1 (9 tensors, 4*64*64 + 3*64*128 + 2*64 weights) at step 10.
    assert s["unfrozen_at"] == {"10": 9}, s["unfrozen_at"]
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "unfreeze"] == [10]
    # Never-scheduled weights (embeddings, block 0) bit-identical; the scheduled ones moved.
    assert s["digests_after"]["frozen"] == s["digests_before"]["frozen"]
    assert s["digests_after"]["trainable"] != s["digests_before"]["trainable"]
    # The groups reached the optimizer, capped at mitigation.lr_cap.
    assert {g["name"]: g["lr"] for g in s["lr_groups"]} == {"head": 4e-3, "rest": 3e-3}
    assert {g["name"]: g["params"] for g in s["lr_groups"]}["head"] == 259 * 64
    assert s["ewc_penalty_last"] > 0
    assert 0.12 < s["replay_share"] < 0.28, s["replay_share"]  # 20% of the rows seen were old ones
    assert s["retain_loss_delta"] == pytest.approx(s["retain_loss_after"] - s["retain_loss_before"])
    assert "forgetting" in out.stdout and "unfrozen" in out.stdout
