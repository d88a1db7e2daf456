"""A pipeline of finetune stages (any model the finetune kind runs): what each stage's finetune spec
and model source become, the refusals of a chain that cannot hold, plan per stage, the adapter a
stage carries on, and resume skipping finished stages."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from launcher import stages as chain
from launcher.errors import ConfigError
from launcher.spec import load_spec
from tests.conftest import ROOT

LORA = {"type": "lora", "r": 4, "alpha": 8}


def four_stages(**changes) -> dict:
    spec = {
        "kind": "pipeline", "name": "p", "storage": "/runs",
        "model": {"source": "tiny-llama", "seq_len": 32},
        "data": {"task": "causal_lm", "train": "/d/train.parquet", "eval": "/d/eval.parquet"},
        "stages": [
            {"name": "a", "strategy": LORA, "train": {"max_steps": 5}},
            {"name": "b", "strategy": LORA, "merge": True, "train": {"max_steps": 5},
             "data": {"task": "chat", "train": "/c/train.jsonl", "chat_template": "chatml"}},
            {"name": "c", "strategy": {"type": "full"}, "train": {"max_steps": 5}},
            {"name": "d", "strategy": {"type": "freeze", "train": ["lm_head"]}, "train": {"max_steps": 5}},
        ],
    }
    for key, value in changes.items():
        node, *path = key.split("__")
        target = spec
        for part in [node, *path][:-1]:
            target = target[int(part)] if isinstance(target, list) else target[part]
        last = [node, *path][-1]
        target[int(last) if isinstance(target, list) else last] = value
    return spec


def test_each_stage_starts_from_what_the_stage_before_left():
    spec = load_spec(four_stages()).model_dump(mode="json")
    specs = chain.chain(spec, "/runs/p-1")
    starts = [(ft["model"]["source"], ft.get("init_adapter")) for ft in specs]
    assert starts == [
        ("tiny-llama", None),                             # the pipeline's model
        ("tiny-llama", "/runs/p-1/stages/a/adapter"),      # a's adapter, trained on over the same base
        ("hf:/runs/p-1/stages/b/merged", None),            # b merged its (carried) adapter into the base
        ("hf:/runs/p-1/stages/c/model", None),             # c's whole model (full fine-tuning)
    ]
    assert chain.handoffs(spec, "/runs/p-1")[-1] == ("hf:/runs/p-1/stages/d/model", None)  # the result
    # Each is a finetune spec: its own data (or the pipeline's), strategy and settings, the job's folder.
    assert [ft["data"]["task"] for ft in specs] == ["causal_lm", "chat", "causal_lm", "causal_lm"]
    assert [ft["name"] for ft in specs] == ["p-a", "p-b", "p-c", "p-d"]
    assert all(ft["kind"] == "finetune" and ft["storage"] == "/runs" for ft in specs)
    assert specs[3]["strategy"] == {"type": "freeze", "train": ["lm_head"], "freeze": None,
                                    "freeze_first_layers": None}
    from launcher.spec import validate

    assert [validate(ft).init_adapter for ft in specs] == [None, "/runs/p-1/stages/a/adapter", None, None]


@pytest.mark.parametrize("changes, message", [
    ({"stages__1__merge": False}, r"stages.2 \(c\).strategy: full differs from stage b's lora adapter .*"
                                  "set merge: true on stage b"),
    ({"stages__1__strategy": {"type": "lora", "r": 8}}, r"stages.1 \(b\).strategy: lora differs from stage a's"),
    ({"stages__2__merge": True}, r"stages.2 \(c\).merge: true merges an adapter, but strategy full"),
    ({"stages__1__train": {"max_steps": 5, "seed": 3}}, r"stages.1 \(b\).train.seed: 3 builds another random-init"),
    ({"stages__0__data": {"task": "vqa", "train": "/v.parquet"}}, r"stages.0 \(a\): data.task: vqa is not run by "
                                                                  "kind finetune"),
    ({"stages__3__train": {"max_steps": 5, "max_stps": 3}}, r"stages.3.train.max_stps: unknown key; did you mean "
                                                            r"'stages.3.train.max_steps'\?"),
    ({"stages__0__train": ["texture"]}, r"stages.0 \(a\): train: \['texture'\] names ARR-COC groups, but "
                                        "model.source tiny-llama is no ARR-COC model"),
    ({"train": {"seed": 2}}, r"train: a finetune pipeline's settings are its stages'"),
    ({"data": None}, r"stages.0 \(a\): no data; set data: at the pipeline or in the stage"),
])
def test_a_chain_that_cannot_hold_is_refused_with_the_stage(changes, message):
    with pytest.raises(ConfigError, match=message):
        load_spec(four_stages(**changes))


def test_an_arrcoc_pipeline_refuses_a_finetune_stage():
    spec = four_stages(model={"source": "arrcoc-mini", "seq_len": 32})
    with pytest.raises(ConfigError, match=r"stages.0 \(a\): an ARR-COC stage names its groups and steps"):
        load_spec(spec)


def test_overrides_reach_a_stage_by_its_index():
    spec = load_spec(four_stages(), ("stages.1.train.max_steps=9", "stages.0.merge=true"))
    assert spec.stages[1].train.max_steps == 9 and spec.stages[0].merge
    with pytest.raises(ConfigError, match="'7' is no index of a list of 4 \\(use 0 to 3\\)"):
        load_spec(four_stages(), ("stages.7.train.max_steps=9",))


def test_plan_checks_and_estimates_each_stage_as_its_finetune(tmp_path, capsys):
    from launcher.cli.main import main
    from launcher.jobplan import plan
    from launcher.synthetic import make_splits

    domain = make_splits("domain", 200, tmp_path / "domain")
    data = {"task": "causal_lm", "train": str(domain["train"]), "eval": str(domain["eval"])}
    spec = four_stages(data=data, storage=str(tmp_path / "runs"))
    spec["stages"][1].pop("data")  # b reads the pipeline's
    with pytest.raises(ConfigError, match="stages.c: data.train: 200 rows is under a tenth"):  # full FT needs more
        plan(load_spec(spec), "local")
    spec["data"]["force"] = True
    spec["stages"][0]["train"] = {"epochs": 1, "micro_batch": 8}  # max_steps from the rows
    job = plan(load_spec(spec), "local")
    from launcher.datacheck import steps_for

    assert job.spec["stages"][0]["train"]["max_steps"] == steps_for(200, 1, 8, 2)  # 2 workers by default
    assert job.data["a.train"]["rows"] == 200 and job.data["d.eval"]["rows"] == 64
    assert [e["stage"] for e in job.estimate["stages"]] == ["a", "b", "c", "d"]
    assert [e["strategy"] for e in job.estimate["stages"]] == ["lora", "lora", "full", "freeze"]
    assert job.estimate["fit"]["verdict"] == "fits"

    path = tmp_path / "p.json"
    path.write_text(json.dumps(spec))
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "kind          pipeline (lora -> lora -> lora -> full -> freeze)" not in out
    assert "kind          pipeline (lora -> lora -> full -> freeze)" in out
    assert "stage         b: lora on causal_lm, 5 steps, from a's adapter on the base, merged after" in out
    assert "stage         c: full on causal_lm, 5 steps, from b's merged model" in out
    assert out.count("  verdict     fits") == 4 and "\nstage d\n" in out


def test_a_carried_adapter_starts_where_the_stage_before_left_it(tmp_path):
    """jobs/finetune.py builds the next stage's model: the exported adapter's weights, not fresh ones."""
    from jobs import components as C
    from jobs import finetune
    from launcher.spec import validate

    before = C.apply_strategy(C.build_model({"source": "tiny-llama", "seq_len": 32}), LORA)
    with torch.no_grad():
        for name, p in before.named_parameters():
            if "lora_B" in name:
                p.normal_()  # a fresh adapter's B is zero: this one is not
    before.save_pretrained(tmp_path / "adapter")
    ft = chain.chain(load_spec(four_stages()).model_dump(mode="json"), tmp_path)[1]
    ft["init_adapter"] = str(tmp_path / "adapter")
    model, *_ = finetune._build(validate(ft), steps_per_epoch=1, keep_base=None)
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(model(input_ids=ids).logits, before(input_ids=ids).logits)
    fresh, *_ = finetune._build(validate({**ft, "init_adapter": None}), steps_per_epoch=1, keep_base=None)
    assert not torch.equal(fresh(input_ids=ids).logits, before(input_ids=ids).logits)

    with pytest.raises(ConfigError, match="init_adapter: .* strategy full trains none"):
        validate({**ft, "strategy": {"type": "full"}})


def test_resume_skips_finished_stages_and_trains_the_rest_on_the_chain(tmp_path, monkeypatch):
    """jobs/stages.py's order of work, with the finetune runs and the scoring (both run for real in
    tests/integration/test_pipeline.py) replaced by recorders: a SUCCEEDED stage is skipped, a stage
    stopped after training is scored again but not retrained, a pending one trains on its chain."""
    from jobs import stages as J
    from jobs.artifacts import RunDir

    spec = load_spec(four_stages())
    run_dir = RunDir(str(tmp_path / "p-1"))
    summary = {"steps": 5, "loss_first": 2.0, "loss_last": 1.0, "strategy": "lora"}
    (run_dir.path / "pipeline.json").write_text(json.dumps({
        "run_id": "p-1", "evals": [{"after": "start", "split": "a", "loss": 3.0}],
        "stages": [{"name": "a", "status": "SUCCEEDED", "attempts": 1, "summary": summary},
                   {"name": "b", "status": "STOPPED", "attempts": 1, "summary": summary},
                   {"name": "c", "status": "PENDING"}, {"name": "d", "status": "PENDING"}]}))
    trained, scored = [], []
    monkeypatch.setattr(J, "_train", lambda ft, plan, rd, name: trained.append((name, copy.deepcopy(ft))) or summary)
    monkeypatch.setattr(J, "_scored", lambda ft, merge, handoff, routes, splits, after: scored.append((after, merge, handoff))
                        or [{"after": after, "split": "a", "loss": 1.0}])
    out = J.run(spec, {"run_id": "p-1", "data": {}}, run_dir)

    assert [name for name, _ in trained] == ["c", "d"]
    assert trained[0][1]["model"]["source"] == f"hf:{run_dir.path}/stages/b/merged"
    assert [after for after, *_ in scored] == ["b", "c", "d"]  # the start was scored before the stop
    assert scored[0][1] == str(run_dir.path / "stages" / "b")  # b merges (merge: true) as it is scored
    assert scored[-1][2] == (f"hf:{run_dir.path}/stages/d/model", None)
    pipe = json.loads((run_dir.path / "pipeline.json").read_text())
    assert [s["status"] for s in pipe["stages"]] == ["SUCCEEDED"] * 4
    assert [s["attempts"] for s in pipe["stages"]] == [1, 2, 1, 1]
    assert [e["after"] for e in pipe["evals"]] == ["start", "b", "c", "d"]
    assert out["steps"] == 20 and out["result"] == f"hf:{run_dir.path}/stages/d/model"


def test_the_shipped_domain_then_task_pipeline_validates_as_two_finetunes():
    spec = load_spec(ROOT / "configs/pipeline/domain-then-task.yaml").model_dump(mode="json")
    first, second = chain.chain(spec, "/r")
    assert first["data"]["task"] == "causal_lm" and second["data"]["task"] == "chat"
    assert second["model"]["source"] == "hf:/r/stages/domain/merged" and "init_adapter" not in second


def test_the_domain_corpus_states_the_colours_the_chat_set_asks_about():
    from launcher.synthetic import CREATURES, creature_colour, domain

    texts = domain(200, 0).column("text").to_pylist()
    for name in CREATURES:
        said = [t for t in texts if f"The {name} is " in t]
        assert said and all(f"The {name} is {creature_colour(name)}" in t for t in said), name


def test_stages_that_share_an_eval_split_are_scored_on_it_once():
    from jobs import stages as J

    spec = load_spec(four_stages())
    splits = J._splits(spec.stages, chain.chain(spec.model_dump(mode="json"), "/r"))
    assert [(s["split"], s["data"]["eval"], s["rows"]) for s in splits] == [("a", "/d/eval.parquet", 64)]


def sequential_adapters(**stage_b) -> dict:
    """Task a, then task b with an adapter of its own (`new_adapter`), then c trained on b's."""
    return {
        "kind": "pipeline", "name": "seq", "storage": "/runs", "model": {"source": "tiny-llama", "seq_len": 32},
        "data": {"task": "causal_lm", "train": "/d/train.parquet", "eval": "/d/eval.parquet"},
        "stages": [
            {"name": "a", "strategy": LORA, "train": {"max_steps": 5}},
            {"name": "b", "strategy": LORA, "new_adapter": True, "train": {"max_steps": 5},
             "data": {"task": "causal_lm", "train": "/e/train.parquet", "eval": "/e/eval.parquet"}, **stage_b},
            {"name": "c", "strategy": LORA, "train": {"max_steps": 5}},
        ],
    }


def test_a_new_adapter_stage_trains_its_own_adapter_and_keeps_the_one_before_for_its_task():
    spec = load_spec(sequential_adapters()).model_dump(mode="json")
    starts = [(ft["model"]["source"], ft.get("init_adapter")) for ft in chain.chain(spec, "/runs/s")]
    assert starts == [("tiny-llama", None),
                      ("tiny-llama", None),                         # b: the base alone, a new adapter
                      ("tiny-llama", "/runs/s/stages/b/adapter")]   # c trains b's adapter on
    a_route = {"source": "tiny-llama", "adapter": "/runs/s/stages/a/adapter", "strategy": spec["stages"][0]["strategy"]}
    # After b and after c, a's split is answered by a's adapter; b's by the adapter trained on.
    assert chain.routes(spec, "/runs/s") == [{}, {"a": a_route}, {"a": a_route}]
    assert "new adapter (a's is kept)" in chain.starts_from(spec, 1)


def test_a_stage_that_replaces_the_base_drops_the_adapters_kept_on_it():
    spec = load_spec(sequential_adapters(merge=True)).model_dump(mode="json")  # b merges its new adapter
    assert chain.routes(spec, "/r") == [{}, {}, {}]
    assert chain.chain(spec, "/r")[2]["model"]["source"] == "hf:/r/stages/b/merged"


@pytest.mark.parametrize("change, why", [
    ({"strategy": {"type": "full"}}, "strategy full trains no adapter"),
])
def test_new_adapter_where_there_is_no_adapter_to_keep_is_refused(change, why):
    with pytest.raises(ConfigError, match=f"stages.1 \\(b\\).new_adapter: .*{why}; remove new_adapter"):
        load_spec(sequential_adapters(**change))


def test_new_adapter_after_a_merged_stage_is_refused_with_the_reason():
    spec = sequential_adapters()
    spec["stages"][0]["merge"] = True
    with pytest.raises(ConfigError, match="stage a merges its adapter .* remove new_adapter"):
        load_spec(spec)


def test_a_new_adapter_may_use_another_adapter_strategy():
    spec = sequential_adapters(strategy={"type": "ia3"})
    spec["stages"].pop()  # c would train b's ia3 adapter with lora: refused, as before
    assert load_spec(spec).stages[1].strategy.type == "ia3"
