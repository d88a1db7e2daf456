"""Each kind and engine declares what it runs; `validate` and `plan` refuse the rest, one line each
naming the field, the value and what would run. Every shipped spec still validates and plans."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.cli.main import main
from launcher.errors import ConfigError
from launcher.jobplan import plan
from launcher.kinds import KINDS, get_kind, register_kind
from launcher.kinds.finetune import Finetune
from launcher.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "configs").rglob("*.yaml"))
DEMO, DS = "configs/tiny/lora.yaml", "configs/deepspeed-full.yaml"
MT, MINI, CMP = "configs/multitask/three-tasks.yaml", "configs/arrcoc/mini.yaml", "configs/compare.yaml"

REFUSED = [  # (spec, overrides, the one error line after "ftlaunch: error: <spec>: ")
    (DEMO, ["data.task=ner"], "data.task: ner is not run by kind finetune yet; use causal_lm or instruction or "
     "chat or classification"),
    (DEMO, ["data.task=vqa"], "data.task: vqa is not run by kind finetune yet; use causal_lm or instruction or "
     "chat or classification (kind pipeline trains vqa on an ARR-COC model)"),
    (DEMO, ["model.source=llama-2-7b"], "model.source: llama-2-7b has no weights here and is planned for a cluster "
     "only; plan it with --target ray (or k8s), or use tiny-llama, minilm or hf:<folder> to run it here"),
    (DEMO, ["model.source=arrcoc-mini"], "model.source: arrcoc-mini is not run by kind finetune; use tiny-llama, "
     "minilm or hf:<folder> (kind pipeline runs arrcoc-mini)"),
    (DS, ["data.replay.path=old.parquet"], "engine: deepspeed does not run data.replay; use engine: torch"),
    (DS, ["lr_groups=default"], "engine: deepspeed does not run lr_groups; use engine: torch"),
    (DS, ["mitigation.lr_cap=0.001"], "engine: deepspeed does not run mitigation.lr_cap; use engine: torch"),
    (DS, ["mitigation.ewc.samples=8", "data.retain=r.parquet"],
     "engine: deepspeed does not run mitigation.ewc; use engine: torch"),
    (DS, ["strategy={type: gradual_unfreeze, train: [lm_head], schedule: [{step: 5, unfreeze: [layers]}]}"],
     "engine: deepspeed does not run strategy gradual_unfreeze; use strategy full or lora, or engine: torch"),
    (DS, ["data.task=classification", "model.num_labels=4"],
     "data.task: classification is not run by engine deepspeed; use causal_lm or instruction or chat, "
     "or engine: torch"),
    (DS, ["model.source=minilm"], "model.source: minilm is not run by engine deepspeed; use tiny-llama or "
     "hf:<folder>, or engine: torch"),
    (MT, ["model.source=minilm"], "model.source: minilm is not run by engine multitask; use tiny-llama or "
     "hf:<folder>, or mode: joint"),
    (MT, ["model.num_labels=2"], "model.num_labels: 2 is not run by kind multitask (its adapters train a causal "
     "LM; a joint run's heads take tasks.<name>.num_labels); remove it"),
    (MINI, ["data.retain=r.parquet"], "data.retain: r.parquet is not run by kind pipeline (a stage is scored on "
     "its eval split only); remove it"),
    (MINI, ["data.columns.image=img"], "data.columns: {'image': 'img'} is not run by kind pipeline (its stages read "
     "the columns image, question and answer); rename the dataset's columns"),
    ("configs/arrcoc/full.yaml", [], "model.source: arrcoc-7b has no weights here and is planned for a cluster "
     "only; plan it with --target ray (or k8s), or use arrcoc-mini to run it here"),
    (CMP, ["variants.lora_r8.storage=/elsewhere"], "variants.lora_r8.storage: every variant writes under the "
     "compare's run folder; set storage at the top level"),
    (CMP, ["variants.lora_r8.env.A=b"], "variants.lora_r8.env: every variant runs in the compare job's "
     "environment; set env at the top level"),
    (CMP, ["variants.lora_r8.data.replay.path=old.parquet", "variants.lora_r8.engine=deepspeed"],
     "variants.lora_r8: engine: deepspeed does not run data.replay; use engine: torch"),
    (CMP, ["variants.lora_r8.model.source=llama-2-7b"], "variants.lora_r8.model.source: llama-2-7b has no weights "
     "here and is planned for a cluster only; plan it with --target ray (or k8s), or use tiny-llama, minilm or "
     "hf:<folder> to run it here"),
]


def header_args(spec: Path) -> list[str]:
    """The --target/--profile of the command a shipped spec's first line holds."""
    header = spec.read_text().splitlines()[0]
    return [x for m in re.finditer(r"(--(?:target|profile)) (\S+)", header) for x in m.groups()]


@pytest.mark.parametrize("spec, overrides, line", REFUSED, ids=lambda x: x if isinstance(x, str) else None)
def test_validate_refuses_what_the_kind_does_not_run_with_one_line(spec, overrides, line, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["validate", spec, *overrides]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err == f"ftlaunch: error: {spec}: {line}\n"


def test_the_module_entry_prints_the_refusal_as_its_only_line():
    out = subprocess.run([sys.executable, "-m", "launcher.cli.main", "validate", DS, "data.replay.path=o.parquet"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.splitlines() == [
        f"ftlaunch: error: {DS}: engine: deepspeed does not run data.replay; use engine: torch"]


def test_plan_refuses_a_plan_only_model_on_local_and_plans_it_for_a_cluster(tmp_path):
    spec = load_spec(ROOT / DEMO, ("model.source=llama-2-7b", "model.seq_len=64"))  # valid: no target given
    with pytest.raises(ConfigError, match="llama-2-7b has no weights here.*--target ray"):
        plan(spec, "local", base_dir=str(tmp_path), preflight=False)
    job = plan(spec, "ray", base_dir=str(tmp_path), preflight=False)
    assert any(w.startswith("model.source: llama-2-7b: planned from its config only") for w in job.warnings)
    assert main(["validate", str(ROOT / DEMO), "model.source=llama-2-7b", "--target", "ray"]) == 0


@pytest.mark.parametrize("spec", SHIPPED, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_shipped_spec_validates_on_the_target_its_header_names(spec, capsys):
    target = dict(zip(*[iter(header_args(spec))] * 2)).get("--target", "local")
    assert main(["validate", str(spec), "--target", target]) == 0, capsys.readouterr().err
    assert "valid" in capsys.readouterr().out


def test_each_kind_names_its_job_module_and_the_engine_picks_finetunes():
    modules = {name: kind.job_module({}) for name, kind in KINDS.items()}
    assert modules == {"finetune": "jobs.finetune", "compare": "jobs.compare", "multitask": "jobs.multitask",
                       "pipeline": "jobs.pipeline"}
    assert get_kind("finetune").job_module({"engine": "deepspeed"}) == "jobs.deepspeed_finetune"
    for module in {*modules.values(), "jobs.deepspeed_finetune"}:  # each names a real module with run()
        source = (ROOT / (module.replace(".", "/") + ".py")).read_text()
        assert "\ndef run(spec, plan: dict, run_dir" in source, module


def test_a_kind_registered_twice_fails():
    with pytest.raises(RuntimeError, match="job kind 'finetune' is registered twice"):
        register_kind(Finetune())


def test_no_client_module_outside_the_kinds_tests_a_spec_for_its_kind():
    sniffing = re.compile(r"""["'](tasks|stages|variants)["'] in |\.get\(["'](tasks|stages|variants)["']\)""")
    for path in (ROOT / "launcher").rglob("*.py"):
        if "kinds" not in path.parts:
            assert not sniffing.search(path.read_text()), path
