"""Chat SFT end to end on the session's local Ray head: a Qwen2-layout folder (`ftlaunch model
make qwen2`), chat JSONL (`ftlaunch data make chat`), a LoRA spec submitted through the CLI; the
run learns the creature -> colour lookup (exact match of greedy answers from ~0 to >= 0.8) and
`ftlaunch infer` answers it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.test_jobs import cli, write_spec

pytestmark = pytest.mark.integration


def test_lora_chat_sft_learns_the_lookup_and_infer_answers_it(ray_head, tmp_path):
    from launcher.modelmake import make_model
    from launcher.synthetic import creature_colour, make

    folder = make_model("qwen2", tmp_path / "q")
    data = {"task": "chat",
            "train": str(make("chat", 2000, tmp_path / "chat", 0, "train", fmt="jsonl")),
            "eval": str(make("chat", 64, tmp_path / "chat", 100, "eval", fmt="jsonl"))}
    spec = {
        "kind": "finetune", "name": "it-chat-sft",
        "model": {"source": f"hf:{folder}", "seq_len": 64},
        "strategy": {"type": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear"},
        "data": data,
        "train": {"max_steps": 300, "micro_batch": 16, "lr": 3e-3, "report_every": 150, "eval_batches": 1,
                  "eval_generate": 64},
        "resources": {"workers": 1, "cpus_per_worker": 1},
        "storage": str(tmp_path / "runs"),
    }
    out = cli("submit", str(write_spec(spec, tmp_path)), "--submission-id", "it-chat-sft",
              "--address", ray_head.address)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "exact match" in out.stdout  # the printed summary
    run_dir = Path(spec["storage"]) / "it-chat-sft"
    s = json.loads((run_dir / "manifest.json").read_text())["summary"]
    assert s["eval_exact_match_before"] <= 0.1, s
    assert s["eval_exact_match_after"] >= 0.8, s

    # Asked as it was trained (the data's system line), the run's own tokenizer and template.
    infer = cli("infer", str(run_dir), "--input", "what colour is the zorp?",
                "--system", "You answer in one short sentence.")
    assert infer.returncode == 0, infer.stderr[-3000:]
    assert infer.stdout.strip() == f"The zorp is {creature_colour('zorp')}."
