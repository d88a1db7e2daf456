"""Sequential forgetting, measured (the design document's section 7): task A (chat: each creature's
colour), then task B (instructions) on a `ftlaunch model make qwen2` folder, with full fine-tuning
(configs/pipeline/sequential-full.yaml) and with one adapter per task
(configs/pipeline/sequential-adapters.yaml), both run at once on the session's head with fewer
steps. Full fine-tuning forgets task A; the adapters do not: after B, A's split is answered by A's
own adapter on the frozen base, bit for bit what it was after A."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import ROOT
from tests.integration.test_pipeline import sha

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_full_fine_tuning_forgets_task_a_and_one_adapter_per_task_does_not(ray_head, tmp_path):
    from launcher.modelmake import make_model
    from launcher.synthetic import make_splits
    from tests.integration.test_jobs import cli

    folder = make_model("qwen2", tmp_path / "q")
    weights = sha(folder / "model.safetensors")
    chat = make_splits("chat", 1000, tmp_path / "chat", fmt="jsonl")
    lists = make_splits("instruction", 1000, tmp_path / "instruction")
    overrides = [f"model.source=hf:{folder}", f"storage={tmp_path / 'runs'}",
                 f"stages.0.data.train={chat['train']}", f"stages.0.data.eval={chat['eval']}",
                 f"stages.1.data.train={lists['train']}", f"stages.1.data.eval={lists['eval']}",
                 "stages.0.train.max_steps=200", "stages.1.train.max_steps=60",
                 "stages.0.train.eval_generate=32", "stages.1.train.eval_generate=16",
                 # Two jobs at once on the session's 2-CPU head, with a CPU left for their data streams.
                 "stages.0.resources.cpus_per_worker=0.5", "stages.1.resources.cpus_per_worker=0.5",
                 "pending_timeout=300"]

    def submit(name):
        return cli("submit", str(ROOT / f"configs/pipeline/{name}.yaml"), *overrides, "--submission-id",
                   f"it-{name}", "--address", ray_head.address, timeout=1200)

    with ThreadPoolExecutor(2) as pool:
        outs = dict(zip(("full", "adapters"), pool.map(submit, ("sequential-full", "sequential-adapters"))))
    for out in outs.values():
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    pipes = {kind: json.loads((tmp_path / "runs" / f"it-sequential-{kind}" / "pipeline.json").read_text())
             for kind in outs}
    evals = {kind: {(e["after"], e["split"]): e for e in pipe["evals"]} for kind, pipe in pipes.items()}

    for kind, ev in evals.items():
        # Both learn task A (its answers: at 150 steps full fine-tuning had its loss down to 0.84
        # but no answer right yet), and task B moves its own split.
        assert ev[("colours", "colours")]["exact_match"] >= 0.3, (kind, ev)
        assert ev[("colours", "colours")]["loss"] < ev[("start", "colours")]["loss"] - 0.5, (kind, ev)
        assert ev[("lists", "lists")]["loss"] < ev[("colours", "lists")]["loss"] - 0.3, (kind, ev)

    full, adapters = evals["full"], evals["adapters"]
    # Full fine-tuning on B forgets A: its answers go and its eval loss on A more than doubles
    # (measured here: 84.4% -> 0.0%, loss 0.45 -> 1.60; the shipped 200 + 200 steps: 70.3% -> 0.0%,
    # 0.54 -> 3.77).
    assert full[("lists", "colours")]["exact_match"] <= full[("colours", "colours")]["exact_match"] - 0.25, full
    assert full[("lists", "colours")]["loss"] > 2 * full[("colours", "colours")]["loss"], full
    # One adapter per task: A's adapter, kept, answers A's split after B exactly as after A ...
    after_b, after_a = adapters[("lists", "colours")], adapters[("colours", "colours")]
    assert after_b["kept_adapter"] and (after_b["loss"], after_b["exact_match"]) == (after_a["loss"],
                                                                                  after_a["exact_match"])
    # ... on a base that neither stage changed; B trained an adapter of its own from the base.
    assert sha(folder / "model.safetensors") == weights
    stage_b = pipes["adapters"]["stages"][1]
    assert stage_b["source"] == f"hf:{folder}" and stage_b["init_adapter"] is None
    summary = outs["adapters"].stdout
    assert "adapters colours: " in summary and "lists: " in summary, summary[-2000:]

    # What a user sees: `ftlaunch infer RUN --stage colours` asks A's adapter; the full run's
    # final model has lost the colours.
    from launcher.synthetic import CREATURES, creature_colour

    names = CREATURES[:8]
    questions = [a for n in names for a in ("--input", f"what colour is the {n}?")]
    right = {}
    for kind, stage in (("adapters", "colours"), ("full", "lists")):
        out = cli("infer", str(tmp_path / "runs" / f"it-sequential-{kind}"), "--stage", stage, *questions,
                  "--system", "You answer in one short sentence.")
        assert out.returncode == 0, out.stderr[-2000:]
        answers = out.stdout.strip().splitlines()[-len(names):]
        right[kind] = sum(a.strip() == f"The {n} is {creature_colour(n)}." for n, a in zip(names, answers))
    assert right["adapters"] >= 5 and right["full"] <= 1, right
