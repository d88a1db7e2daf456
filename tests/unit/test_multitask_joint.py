"""kind: multitask, mode: joint, in-process (no Ray): spec refusals, the plan (counts, one worker),
the exact mix, and real MiniLM training of two classification tasks of different label sets:
both learn, and the saved folder reloads the backbone with both heads to the same logits."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from launcher.errors import ConfigError
from launcher.jobplan import plan
from launcher.spec import load_spec

STEPS = 36  # at 8 rows a step: by step 24 sentiment sat at 78-86% from run to run; 36 leaves room (LoRA r=8, lr 1e-3, heads 5e-3)


@pytest.fixture(scope="module")
def joint_data(tmp_path_factory):
    from launcher import synthetic

    out = tmp_path_factory.mktemp("joint-data")
    return {name: {"task": "classification", "train": str(synthetic.make(gen, 400, out / name, 0, "train")),
                   "eval": str(synthetic.make(gen, 32, out / name, 7, "eval"))}
            for name, gen in (("topic", "classification"), ("sentiment", "sentiment"))}


def joint_spec(joint_data, tmp_path, **extra):
    data = copy.deepcopy(joint_data)
    spec = {
        "kind": "multitask", "mode": "joint", "name": "joint", "storage": str(tmp_path / "runs"),
        "model": {"source": "minilm", "seq_len": 24},
        "strategy": {"type": "lora", "r": 8, "alpha": 16, "target_modules": ["query", "value"]},
        "head_lr": 5e-3,
        "train": {"max_steps": STEPS, "micro_batch": 8, "lr": 1e-3, "report_every": 12, "eval_batches": 2},
        "tasks": [{"name": "topic", "weight": 0.6, "num_labels": 4, "data": data["topic"]},
                  {"name": "sentiment", "weight": 0.4, "num_labels": 3, "data": data["sentiment"]}],
    }
    spec.update(extra)
    return spec


# ---------------------------------------------------------------------------------------------
# Spec and plan


def test_joint_refuses_what_it_cannot_run_one_line_each(joint_data, tmp_path):
    spec = joint_spec(joint_data, tmp_path, packing=True)
    spec["tasks"][0]["weight"] = None
    spec["tasks"][1]["num_labels"] = None
    spec["tasks"][1]["train"] = {"lr": 0.1}
    spec["tasks"].append({"name": "counting", "weight": 1, "data": {"task": "causal_lm", "train": "x.parquet"}})
    with pytest.raises(ConfigError) as err:
        load_spec(spec)
    text = str(err.value)
    assert "packing packs adapters (mode: adapters); remove it in mode: joint" in text
    assert "tasks.topic.weight is needed in mode: joint: its share of the mixed stream (e.g. 1)" in text
    assert "tasks.sentiment.num_labels is needed in mode: joint: its head's classes (e.g. 4)" in text
    assert "tasks.sentiment.train: per-task overrides train one adapter each" in text
    assert ("tasks.counting: data.task causal_lm is not run in mode: joint, which trains one classification "
            "head per task on a shared backbone; use classification, or mode: adapters") in text

    adapters = joint_spec(joint_data, tmp_path, mode="adapters", strategy={"type": "full"})
    with pytest.raises(ConfigError) as err:
        load_spec(adapters)
    text = str(err.value)
    assert "strategy: full trains a shared backbone in mode: joint only" in text
    assert "tasks.topic.weight is read in mode: joint only; remove it or set mode: joint" in text
    assert "tasks.topic: data.task classification trains a head in mode: joint only" in text
    assert "head_lr is read in mode: joint only" in text

    llama = joint_spec(joint_data, tmp_path, model={"source": "tiny-llama", "seq_len": 24})
    with pytest.raises(ConfigError, match="model.source: tiny-llama is not run by engine joint; use minilm or hf:"):
        load_spec(llama)


def test_plan_counts_backbone_and_every_head_on_one_worker(joint_data, tmp_path):
    job = plan(load_spec(joint_spec(joint_data, tmp_path, train={
        "max_steps": None, "epochs": 1, "micro_batch": 8})), "local", submission_id="j1")
    hidden = 384
    heads = {"topic": hidden * 4 + 4, "sentiment": hidden * 3 + 3}
    params = job.estimate["parameters"]
    assert params["heads"] == heads
    assert params["trainable"] == params["lora_closed_form"] + sum(heads.values())
    assert job.resources["workers"] == 1 and job.resources["at_once"] == 1
    assert job.spec["train"]["max_steps"] == 100  # one pass over both tasks' 800 rows at 8 a step
    assert job.estimate["fit"]["verdict"] == "fits"
    from launcher.kinds import get_kind

    lines = get_kind("multitask").describe(job.spec, job.estimate)
    assert "task          topic: classification, 4 labels, weight 0.6 (60% of the 100 steps)" in lines
    assert any("a shared backbone (lora) and 2 heads" in line for line in lines)
    assert get_kind("multitask").job_module(job.spec) == "jobs.joint"


def test_weighted_schedule_is_exact_at_every_prefix_and_resumes_where_it_stopped():
    from itertools import islice

    from jobs.data.mix import weighted_schedule

    for weights in ([0.6, 0.4], [1, 2, 3], [0.7, 0.2, 0.1]):
        shares = [w / sum(weights) for w in weights]
        taken = [0] * len(weights)
        for n, i in enumerate(islice(weighted_schedule(weights), 3000), start=1):
            taken[i] += 1
            assert all(abs(t - n * s) < 1 for t, s in zip(taken, shares)), (weights, n, taken)
    whole = list(islice(weighted_schedule([3, 1]), 40))
    assert list(islice(weighted_schedule([3, 1], skip=17), 23)) == whole[17:]
    with pytest.raises(ValueError, match="must be positive"):
        next(weighted_schedule([1, 0]))


# ---------------------------------------------------------------------------------------------
# Training MiniLM with two heads


@pytest.fixture(scope="module")
def trained(joint_data, tmp_path_factory):
    from jobs import joint as J

    torch.set_num_threads(2)
    tmp = tmp_path_factory.mktemp("joint-run")
    spec = load_spec(joint_spec(joint_data, tmp))
    run = tmp / "run"
    streams = {t.name: J.arrow_stream(t, spec.model, spec.train.micro_batch) for t in spec.tasks}
    final = J.train_joint(spec, streams, str(run), progress=str(run / ".progress" / "joint.pt"))
    return spec, run, final


def test_both_tasks_learn_through_their_own_heads(trained):
    spec, run, final = trained
    for name in ("topic", "sentiment"):
        t = final["tasks"][name]
        # a margin no chance fluctuation gives on 32 eval rows (constant guesses: 25% and 33%)
        assert t["eval_accuracy_after"] >= t["eval_accuracy_before"] + 0.3, (name, t)
        assert t["eval_accuracy_after"] >= 0.8, (name, t)
        assert t["eval_loss_after"] < t["eval_loss_before"] - 0.25, (name, t)
    records = {name: [json.loads(x) for x in (run / f"metrics-{name}.jsonl").read_text().splitlines()]
               for name in ("topic", "sentiment")}
    assert [(r["task"], r["step"]) for r in records["topic"]] == [("topic", 12), ("topic", 24), ("topic", 36)]
    assert all("eval_accuracy" in r and "eval_loss" in r for rs in records.values() for r in rs)


def test_the_mix_of_steps_is_the_weights(trained):
    spec, run, final = trained
    tasks = final["tasks"]
    assert tasks["topic"]["batches"] + tasks["sentiment"]["batches"] == STEPS
    assert abs(tasks["topic"]["batches"] - 0.6 * STEPS) < 1 and abs(tasks["sentiment"]["batches"] - 0.4 * STEPS) < 1


def test_the_saved_folder_reloads_the_backbone_with_both_heads_to_the_same_logits(trained):
    from launcher.inference import JointModel, open_run

    spec, run, _ = trained
    folder = run / "joint"
    description = json.loads((folder / "heads.json").read_text())
    assert {n: h["num_labels"] for n, h in description["tasks"].items()} == {"topic": 4, "sentiment": 3}
    assert description["tasks"]["topic"]["label_names"] == ["sport", "weather", "food", "tech"]
    assert (folder / "backbone" / "config.json").is_file() and not (folder / "backbone" / "adapter_config.json").exists()
    probe = torch.load(run / "probe.pt", weights_only=False)
    joint = open_run(run)  # a run folder with joint/ opens as a JointModel
    assert isinstance(joint, JointModel) and joint.tasks == ["topic", "sentiment"]
    for name, shapes in (("topic", 4), ("sentiment", 3)):
        logits = joint.logits(probe[name]["texts"], task=name)
        assert logits.shape == (len(probe[name]["texts"]), shapes)
        torch.testing.assert_close(logits, probe[name]["logits"], atol=1e-4, rtol=1e-4)  # LoRA merged in
    assert joint.predict(["the striker scored a goal"], task="topic") == ["sport"]
    assert joint.predict(["a wonderful lovely day"], task="sentiment") == ["positive"]


def test_a_frozen_backbone_does_not_move_and_each_step_updates_one_head(joint_data, tmp_path):
    from jobs import components as C
    from jobs import joint as J
    from launcher.inference import JointModel

    spec = load_spec(joint_spec(joint_data, tmp_path, strategy={"type": "freeze", "freeze": ["."]},
                                train={"max_steps": 1, "micro_batch": 8, "lr": 1e-3, "report_every": 1,
                                       "eval_batches": 1}))
    built = J.build(spec)
    backbone_before = C.digest(p for _, p in sorted(built.backbone.state_dict().items()))
    heads_before = {n: h.weight.detach().clone() for n, h in built.heads.items()}
    streams = {t.name: J.arrow_stream(t, spec.model, spec.train.micro_batch) for t in spec.tasks}
    run = tmp_path / "run"
    final = J.train_joint(spec, streams, str(run), progress=str(run / ".progress" / "joint.pt"))
    assert final["trainable_params"] == 384 * 4 + 4 + 384 * 3 + 3  # the heads alone
    state = torch.load(run / ".progress" / "joint.pt", weights_only=False)["trainable"]
    assert set(state) == {"heads.topic.weight", "heads.topic.bias", "heads.sentiment.weight", "heads.sentiment.bias"}
    exported = JointModel(run).backbone  # the backbone as trained and saved: bit-identical
    assert C.digest(p for _, p in sorted(exported.state_dict().items())) == backbone_before
    # One step, the schedule's first task (topic, the heavier weight): only its head moved.
    assert not torch.equal(state["heads.topic.weight"], heads_before["topic"])
    assert torch.equal(state["heads.sentiment.weight"], heads_before["sentiment"])
