"""Fit suggestions are spec overrides a user can paste: each printed one, applied to the spec and
re-planned, fits with the memory it promised; checkpointing is read from train.grad_checkpointing
and suggested as it, on either engine (not for a pipeline stage, whose settings no override reaches)."""

import re
import shlex

import pytest
import yaml

from launcher import planner
from launcher.cli.main import main
from launcher.jobplan import plan
from launcher.spec import load_spec
from tests.unit.planner_cases import ROOT

BASE = {
    "kind": "finetune",
    "name": "fit-check",
    "model": {"source": "llama-2-7b", "seq_len": 512},
    "strategy": {"type": "full"},
    # Not visible here: on target ray it is a warning, and the planner needs no rows.
    "data": {"task": "causal_lm", "train": "data/not-here/train.parquet"},
    "train": {"max_steps": 10, "micro_batch": 4, "lr": 1e-5},
    "resources": {"workers": 1, "cpus_per_worker": 4, "gpus_per_worker": 1},
}
PRINTED = re.compile(r"^\s+would fit: (.+?) -> [\d.]+ \w+ per \w+  # (.+)$", re.M)

# (spec file or None for BASE, overrides that make the case, profile, overrides some suggestion must print)
CASES = {
    "torch-full-7b": (None, [], "a100-40g-1", ["strategy.type=lora", "strategy.type=qlora"]),
    "torch-full-7b-on-8-gpus": (None, ["resources.workers=8", "train.micro_batch=1"], "a100-80g-x8",
                                ["engine=deepspeed", "deepspeed.zero_stage=3"]),
    "deepspeed-full-7b-on-cpu": ("configs/deepspeed-full.yaml", ["model.source=llama-2-7b"], "a100-40g-1",
                                 ["strategy.type=lora", "strategy.r=16"]),
    "zero0-over-8-workers": (None, ["engine=deepspeed", "deepspeed.zero_stage=0", "resources.workers=8",
                                    "train.micro_batch=1"], "a100-80g-x8", ["deepspeed.zero_stage=3"]),
    "deepspeed-lora-long-sequences": (None, ["engine=deepspeed", "deepspeed.zero_stage=0",
                                             "strategy={type: lora, r: 32}", "model.seq_len=4096",
                                             "train.micro_batch=8"], "a100-40g-1",
                                      ["train.grad_checkpointing=true", "train.micro_batch=1"]),
    # A 16B Llama: LoRA's 16-bit base is too large, QLoRA's 4-bit one fits, on the torch engine.
    "deepspeed-lora-16b": (None, ["engine=deepspeed", "deepspeed.zero_stage=0",
                                  "strategy={type: lora, r: 16}", "model.config.num_hidden_layers=80",
                                  "train.micro_batch=1"],
                           "a100-40g-1", ["strategy.type=qlora", "engine=torch", "deepspeed=null"]),
    "freeze-7b": (None, [r"strategy={type: freeze, train: ['^lm_head\.']}", "train.micro_batch=16"],
                  "a100-40g-1", ["strategy={type: lora, r: 16}"]),
    "two-gpus-per-worker": (None, ["model.source=tiny-llama", "resources.gpus_per_worker=2",
                                   "resources.workers=2"],
                            "a100-40g-1", ["resources.gpus_per_worker=1", "resources.workers=1"]),
}


def _spec_file(tmp_path, source):
    if source:
        return ROOT / source
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(BASE))
    return path


def _printed(text: str) -> list[tuple[list[str], str, str]]:
    """(overrides, --profile or None, label) of each `would fit:` line."""
    out = []
    for args, label in PRINTED.findall(text):
        words = shlex.split(args)
        profile = None
        if "--profile" in words:
            at = words.index("--profile")
            profile = words[at + 1]
            del words[at:at + 2]
        out.append((words, profile, label))
    return out


@pytest.mark.parametrize("case", CASES)
def test_each_printed_suggestion_replans_and_fits(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source, base, profile, expected = CASES[case]
    path = _spec_file(tmp_path, source)
    spec = plan(load_spec(path, tuple(base)), "ray", preflight=False).spec  # engine defaults filled
    est = planner.estimate(spec, profile)
    assert est["fit"]["verdict"] != "fits", case
    printed = _printed(planner.format_estimate(est))
    suggestions = est["fit"]["suggestions"]
    assert len(printed) == len(suggestions) > 0, case
    for (overrides, other, label), sug in zip(printed, suggestions):
        assert label == sug["change"] and overrides == sug["overrides"]
        job = plan(load_spec(path, tuple(base + overrides)), "ray", profile=other or profile)
        assert job.estimate["fit"]["verdict"] == "fits", (case, label)
        assert job.estimate["memory"]["total"] == sug["per_gpu_bytes"], (case, label)  # what it promised
    every = [o for overrides, _, _ in printed for o in overrides]
    assert set(expected) <= set(every), (case, every)


def test_plan_prints_overrides_and_each_pasted_back_fits(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = _spec_file(tmp_path, None)
    assert main(["plan", str(path), "--target", "ray", "train.micro_batch=1"]) == 0  # default a100-80g-1
    printed = _printed(capsys.readouterr().out)
    assert any(o[:2] == ["engine=deepspeed", "deepspeed.zero_stage=2"] for o, _, _ in printed), printed
    assert any(p == "h200-141g-1" for _, p, _ in printed), printed
    for overrides, other, label in printed:
        profile = ["--profile", other or "a100-80g-1"]
        argv = ["plan", str(path), "--target", "ray", "train.micro_batch=1", *overrides, *profile]
        assert main(argv) == 0, label
        assert re.search(r"^  verdict\s+fits$", capsys.readouterr().out, re.M), label


def test_a_refused_plan_names_the_overrides_that_would_fit(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc = main(["plan", str(ROOT / "configs/deepspeed-full.yaml"), "model.source=llama-2-7b",
               "--target", "ray", "--profile", "a100-40g-1"])
    err = capsys.readouterr().err
    assert rc == 1 and "does-not-fit on profile a100-40g-1" in err
    assert "would fit: LoRA r=16 on all linear layers: strategy.type=lora strategy.r=16" in err


def test_checkpointing_is_read_from_train_grad_checkpointing_on_either_engine(tmp_path):
    path = _spec_file(tmp_path, None)

    def settings(*overrides):
        spec = plan(load_spec(path, overrides), "ray", preflight=False).spec
        return planner.estimate(spec, "a100-80g-1")

    for engine in ("engine=torch", "engine=deepspeed"):
        on = settings(engine, "train.grad_checkpointing=true")
        off = settings(engine)
        assert on["memory_settings"]["grad_checkpointing"] and not off["memory_settings"]["grad_checkpointing"]
        # under the torch engine's autocast the cached bf16 copies of the trainable weights stay
        shrink = 4 if engine == "engine=deepspeed" else 1.5
        assert on["memory"]["activations"] < off["memory"]["activations"] / shrink, engine
        assert on["memory"]["activation_terms"]["layer_inputs"] < off["memory"]["activation_terms"]["layers"] / 10
        assert on["memory"]["weights"] == off["memory"]["weights"]
        # recomputation: one more forward per step
        assert on["time"]["seconds"] > off["time"]["seconds"] * 1.2


def test_torch_engine_suggests_checkpointing_as_the_train_field_and_pipeline_stages_do_not(tmp_path):
    path = _spec_file(tmp_path, None)
    spec = plan(load_spec(path, ("resources.workers=8", "train.micro_batch=64")), "ray", preflight=False).spec
    suggestions = planner.estimate(spec, "a100-80g-x8")["fit"]["suggestions"]
    checkpointed = [s for s in suggestions if "checkpointing" in s["change"]]
    assert checkpointed
    for sug in checkpointed:
        assert "train.grad_checkpointing=true" in sug["overrides"], sug
        assert not any(o.startswith("deepspeed.activation") for o in sug["overrides"]), sug

    pipeline = yaml.safe_load((ROOT / "configs/arrcoc/full.yaml").read_text())
    pipeline["stages"][1]["micro_batch"] = 12
    est = planner.estimate_pipeline(plan(load_spec(pipeline), "ray", preflight=False).spec, "a100-40g-1")
    assert est["fit"]["verdict"] == "does-not-fit"
    # A stage's settings live in a list no dotted override reaches: only another profile is offered.
    assert est["fit"]["suggestions"], est["fit"]
    for sug in est["fit"]["suggestions"]:
        assert sug["overrides"] == [] and sug["args"] == f"--profile {sug['profile']}", sug
