"""Every fine-tuning strategy does what it says, in-process on tiny models (no Ray).

Counts agree with peft and with the planner; frozen weights stay bit-identical and trained ones
move; the unfreezing schedule opens groups at its step; learning-rate groups reach the optimizer;
QLoRA is really 4-bit and learns; the EWC penalty starts at zero and grows; adapters reload.
"""

from __future__ import annotations

import pytest
import torch

from jobs import components as C
from jobs import strategies as S
from launcher.planner import count_parameters
from launcher.spec import load_spec

TINY = {"source": "tiny-llama", "seq_len": 24}
TEXTS = [f"count from {s}: " + " ".join(str(s + i) for i in range(6)) for s in range(8)]


def spec_of(strategy: dict, model=TINY, **extra) -> dict:
    """A validated spec dict (defaults filled in), as the job receives it."""
    raw = {"kind": "finetune", "name": "t", "model": model, "strategy": strategy,
           "data": {"train": "t.parquet"}, **extra}
    return load_spec(raw).model_dump(mode="json")


def batch(texts=TEXTS, seq_len=24):
    return {k: torch.from_numpy(v) for k, v in C.tokenize_causal({"text": texts}, "text", seq_len).items()}


def train(model, steps=8, lr=1e-2, unfreezer=None, ewc=None, only=None):
    """A plain loop over one batch: what the job's loop does, minus Ray."""
    trained = only or {n for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(S.param_groups(model, None, lr, only=trained))
    b, losses, opened = batch(), [], {}
    model.train()
    for step in range(steps):
        if unfreezer:
            names = unfreezer.at(model, step)
            if names:
                opened[step] = names
        loss = model(**b).loss
        objective = loss + ewc.penalty() if ewc else loss
        opt.zero_grad(set_to_none=True)
        objective.backward()
        opt.step()
        losses.append(float(loss))
    return losses, opened


def snapshot(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def built(strategy: dict, model=TINY):
    spec = spec_of(strategy, model)
    return C.apply_strategy(C.build_model(spec["model"], seed=0), spec["strategy"]), spec


# ---------------------------------------------------------------------------------------------
# Trainable counts: the job's model, peft and the planner agree


COUNTED = [
    {"type": "full"},
    {"type": "freeze", "train": ["lm_head"]},
    {"type": "freeze", "freeze": ["embed", r"layers\.0\."]},
    {"type": "freeze", "freeze_first_layers": 1},
    {"type": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
    {"type": "lora", "r": 8},
    {"type": "prefix", "num_virtual_tokens": 6},
    {"type": "prompt", "num_virtual_tokens": 6},
    {"type": "ia3"},
]


@pytest.mark.parametrize("strategy", COUNTED, ids=lambda s: "-".join(f"{v}" for v in s.values())[:40])
def test_trainable_counts_match_peft_and_the_planner(strategy):
    model, spec = built(strategy)
    trainable, total = C.parameter_counts(model)
    planned = count_parameters(spec["model"], spec["strategy"])
    assert (trainable, total) == (planned["trainable"], planned["total"])
    assert 0 < trainable <= total
    if hasattr(model, "get_nb_trainable_parameters"):
        assert model.get_nb_trainable_parameters() == (trainable, total)
    if strategy["type"] == "lora":
        assert trainable == planned["lora_closed_form"]  # sum r*(d_in + d_out)


def test_freeze_patterns_select_what_they_name():
    head, _ = built({"type": "freeze", "train": ["lm_head"]})
    assert {n for n, p in head.named_parameters() if p.requires_grad} == {"lm_head.weight"}
    late, _ = built({"type": "freeze", "freeze_first_layers": 1})
    names = {n for n, p in late.named_parameters() if p.requires_grad}
    assert not any("embed" in n or ".layers.0." in n for n in names)
    assert any(".layers.1." in n for n in names) and "lm_head.weight" in names
    with pytest.raises(ValueError, match="leaves no parameter trainable"):
        built({"type": "freeze", "train": ["no_such_layer"]})


def test_gradual_unfreeze_count_is_the_final_schedule():
    strategy = {"type": "gradual_unfreeze", "train": ["lm_head"],
                "schedule": [{"step": 2, "unfreeze": [r"layers\.1\."]}, {"step": 4, "unfreeze": ["norm"]}]}
    model, spec = built(strategy)
    u = S.Unfreezer(spec["strategy"], steps_per_epoch=10)
    eventual = sum(p.numel() for n, p in model.named_parameters() if n in u.eventual(spec["strategy"], model))
    assert eventual == count_parameters(spec["model"], spec["strategy"])["trainable"]


# ---------------------------------------------------------------------------------------------
# Frozen weights stay, trained weights move


@pytest.mark.parametrize("strategy", [
    {"type": "freeze", "freeze_first_layers": 1},
    {"type": "lora", "r": 4},
    {"type": "prompt", "num_virtual_tokens": 4},
    {"type": "ia3"},
], ids=lambda s: s["type"])
def test_frozen_bit_identical_trained_moved_loss_falls(strategy):
    model, _ = built(strategy)
    before = snapshot(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    losses, _ = train(model, steps=10, lr=3e-2)
    after = snapshot(model)
    for name in before:
        if name in trainable:
            assert not torch.equal(before[name], after[name]), f"{name} did not move"
        else:
            assert torch.equal(before[name], after[name]), f"frozen {name} changed"
    assert losses[-1] < losses[0]


def test_gradual_unfreezing_opens_the_group_at_its_step():
    strategy = {"type": "gradual_unfreeze", "train": ["lm_head"],
                "schedule": [{"step": 3, "unfreeze": [r"layers\.1\."]},
                             {"epoch": 1, "unfreeze": [r"layers\.0\.", "embed"]}]}
    model, spec = built(strategy)
    u = S.Unfreezer(spec["strategy"], steps_per_epoch=5)
    assert u.events == [(3, (r"layers\.1\.",)), (5, (r"layers\.0\.", "embed"))]
    eventual = u.eventual(spec["strategy"], model)
    layer1 = "model.layers.1.mlp.down_proj.weight"
    layer0 = "model.layers.0.mlp.down_proj.weight"
    history = []

    class Watch:  # the schedule, recording weights as each step begins
        def at(self, m, step):
            opened = u.at(m, step)
            history.append((step, m.get_parameter(layer1).detach().clone(),
                            m.get_parameter(layer0).detach().clone(),
                            {n for n, p in m.named_parameters() if p.requires_grad}))
            return opened

    _, opened = train(model, steps=7, unfreezer=Watch(), only=eventual)
    assert set(opened) == {3, 5}
    sets = {step: names for step, _, _, names in history}
    assert sets[0] == sets[2] == {"lm_head.weight"}
    assert layer1 in sets[3] and layer0 not in sets[4] and layer0 in sets[5]
    w1 = {step: w for step, w, _, _ in history}
    w0 = {step: w for step, _, w, _ in history}
    # layer 1 is untouched by the first 3 updates and moves from the 4th on; layer 0 from the 6th.
    assert torch.equal(w1[0], w1[3]) and not torch.equal(w1[3], w1[4])
    assert torch.equal(w0[0], w0[5]) and not torch.equal(w0[5], w0[6])
    assert torch.equal(model.get_parameter("model.norm.weight"), C.build_model(TINY, 0).get_parameter("model.norm.weight"))


# ---------------------------------------------------------------------------------------------
# Learning-rate groups


def test_explicit_lr_groups_reach_the_optimizer_and_the_cap_applies():
    model, spec = built({"type": "full"})
    groups = [{"name": "head", "params": ["lm_head"], "lr": 1e-3},
              {"name": "early", "params": ["embed", r"layers\.0\."], "lr": 1e-5}]
    opt = torch.optim.AdamW(S.param_groups(model, groups, lr=2e-5))
    by_name = {g["name"]: g for g in opt.param_groups}
    assert {n: g["lr"] for n, g in by_name.items()} == {"head": 1e-3, "early": 1e-5, "rest": 2e-5}
    ids = {n: {id(p) for p in g["params"]} for n, g in by_name.items()}
    assert ids["head"] == {id(model.lm_head.weight)}
    assert id(model.model.embed_tokens.weight) in ids["early"]
    assert id(model.model.layers[1].mlp.up_proj.weight) in ids["rest"]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    capped = S.param_groups(model, groups, lr=2e-5, lr_cap=5e-6)
    assert {g["name"]: g["lr"] for g in capped} == {"head": 5e-6, "early": 5e-6, "rest": 5e-6}


def test_default_lr_groups_follow_the_design_on_minilm():
    spec = spec_of({"type": "full"}, {"source": "minilm", "num_labels": 4, "seq_len": 24},
                   lr_groups="default")
    model = C.apply_strategy(C.build_model(spec["model"], seed=0), spec["strategy"])
    groups = {g["name"]: g for g in S.param_groups(model, spec["lr_groups"], lr=1e-4)}
    assert {n: g["lr"] for n, g in groups.items()} == {"new": 1e-3, "early": 1e-5, "pretrained": 2e-5}
    names = {id(p): n for n, p in model.named_parameters()}
    early = {names[id(p)] for p in groups["early"]["params"]}
    assert {names[id(p)] for p in groups["new"]["params"]} == {"classifier.weight", "classifier.bias"}
    assert any("embeddings" in n for n in early)
    # 6 blocks: the first third (0, 1) is early, blocks 2..5 pretrained
    assert {S.layer_index(n) for n in early} - {None} == {0, 1}
    assert {S.layer_index(names[id(p)]) for p in groups["pretrained"]["params"]} - {None} == {2, 3, 4, 5}


# ---------------------------------------------------------------------------------------------
# QLoRA


def test_qlora_layers_are_4bit_and_the_loss_falls():
    import bitsandbytes as bnb

    strategy = {"type": "qlora", "r": 8, "double_quant": True}
    model, spec = built(strategy)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit)
    assert isinstance(q_proj.base_layer.weight, bnb.nn.Params4bit)
    assert q_proj.base_layer.weight.quant_type == "nf4"
    assert q_proj.base_layer.weight.quant_state.nested  # double quantization
    assert model.training
    trainable, _ = C.parameter_counts(model)
    assert trainable == count_parameters(spec["model"], spec["strategy"])["trainable"]
    frozen = q_proj.base_layer.weight.detach().clone()
    losses, _ = train(model, steps=12, lr=2e-2)
    assert losses[-1] < losses[0] - 0.3, losses
    assert torch.equal(frozen, q_proj.base_layer.weight)


# ---------------------------------------------------------------------------------------------
# EWC


def test_ewc_penalty_is_zero_at_start_and_grows_as_weights_move():
    model, _ = built({"type": "full"})
    retain = C.example_batches({"text": [f"letters from {c}: {c}" for c in "abcdef"]},
                               {"data": {"task": "causal_lm"}, "model": TINY}, 6)
    ewc = S.EWC(model, retain, lam=10.0)
    assert float(ewc.penalty()) == 0.0
    assert all(f.min() >= 0 for f in ewc.fisher.values())
    assert sum(float(f.sum()) for f in ewc.fisher.values()) > 0
    penalties = []
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(4):
        loss = model(**batch()).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        penalties.append(float(ewc.penalty()))
    assert 0 < penalties[0] < penalties[-1]
    # The penalty's gradient pulls each weight back towards its anchor.
    model.zero_grad()
    ewc.penalty().backward()
    name = "model.layers.0.mlp.up_proj.weight"
    moved = model.get_parameter(name).detach() - ewc.anchor[name]
    grad = model.get_parameter(name).grad
    assert torch.allclose(grad, ewc.lam * ewc.fisher[name] * moved, atol=1e-6)


def test_ewc_keeps_weights_closer_to_the_anchor():
    def distance(lam):
        model, _ = built({"type": "full"})
        retain = C.example_batches({"text": ["letters from a: a b c"] * 4},
                                   {"data": {"task": "causal_lm"}, "model": TINY}, 4)
        ewc = S.EWC(model, retain, lam=lam) if lam else None
        anchor = snapshot(model)
        train(model, steps=6, lr=1e-2, ewc=ewc)
        return sum(float((p - anchor[n]).pow(2).sum()) for n, p in model.named_parameters())

    assert distance(1e5) < distance(0)


# ---------------------------------------------------------------------------------------------
# Adapters reload to the same logits


@pytest.mark.parametrize("strategy", [
    {"type": "lora", "r": 4}, {"type": "qlora", "r": 4}, {"type": "prefix", "num_virtual_tokens": 4},
    {"type": "prompt", "num_virtual_tokens": 4}, {"type": "ia3"},
], ids=lambda s: s["type"])
def test_every_adapter_reloads_to_the_same_logits(strategy, tmp_path):
    model, spec = built(strategy)
    train(model, steps=4, lr=3e-2)
    probe = C.probe(model, spec["model"])
    model.save_pretrained(tmp_path / "adapter")
    reloaded = S.reload(str(tmp_path / "adapter"), C.build_model(spec["model"], seed=0), spec["strategy"])
    with torch.no_grad():
        logits = reloaded(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    torch.testing.assert_close(logits, probe["logits"], rtol=0, atol=1e-5)
    base = C.build_model(spec["model"], seed=0).eval()
    with torch.no_grad():  # and the adapter matters: the bare base gives other logits
        bare = base(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    assert not torch.allclose(bare, probe["logits"][:, -bare.shape[1]:], atol=1e-4)  # prompt: +virtual


# ---------------------------------------------------------------------------------------------
# Classification on real MiniLM weights


MINILM = {"source": "minilm", "num_labels": 4, "seq_len": 24}


def test_minilm_classification_tokenizes_with_its_own_vocab_and_scores_accuracy(tmp_path):
    from launcher.synthetic import classification

    spec = spec_of({"type": "lora", "r": 4}, MINILM)
    spec["data"]["task"] = "classification"
    enc = C.tokenize_classification({"text": ["the team scored"], "label": [0]}, seq_len=8, model_spec=MINILM)
    assert enc["input_ids"][0, 0] == 101 and 102 in enc["input_ids"][0]  # [CLS] ... [SEP]
    assert C.tokenizer_for(MINILM).vocab_size == 30522
    model = C.apply_strategy(C.build_model(MINILM, seed=0), spec["strategy"])
    table = classification(48, seed=3)
    rows = {"text": table.column("text").to_pylist(), "label": table.column("label").to_pylist()}
    result = C.evaluate(model, rows, spec)
    # accuracy is the share of argmax == label, recomputed here by hand
    enc = C.tokenize_classification(rows, seq_len=24, model_spec=MINILM)
    with torch.no_grad():
        logits = model.eval()(input_ids=torch.from_numpy(enc["input_ids"]),
                              attention_mask=torch.from_numpy(enc["attention_mask"])).logits
    assert result["accuracy"] == pytest.approx(float((logits.argmax(-1).numpy() == enc["labels"]).mean()))
    assert result["loss"] > 0
    # SEQ_CLS LoRA trains the new head too (peft modules_to_save), and the planner counts it
    trainable, total = C.parameter_counts(model)
    planned = count_parameters(spec["model"], spec["strategy"])
    assert (trainable, total) == (planned["trainable"], planned["total"])
    assert any("classifier" in n and p.requires_grad for n, p in model.named_parameters())


# ---------------------------------------------------------------------------------------------
# Spec: bad strategy input fails at validate time


def test_strategy_spec_errors_name_the_field_and_the_fix():
    from launcher.errors import ConfigError

    def problems(**changes):
        raw = {"kind": "finetune", "name": "t", "strategy": {"type": "lora"}, "data": {"train": "t.parquet"}}
        raw.update(changes)
        with pytest.raises(ConfigError) as exc:
            load_spec(raw)
        return exc.value.problems

    assert problems(mitigation={"ewc": {"lambda": 10}}) == [
        "(top level): mitigation.ewc needs data.retain: the Fisher information comes from it"]
    assert problems(mitigation={"ewc": {"lamda": 10}}) == [
        "mitigation.ewc.lamda: unknown key; did you mean 'mitigation.ewc.lambda'?"]
    assert problems(data={"train": "t", "task": "classification"}) == [
        "(top level): data.task classification needs model.num_labels (e.g. 4)"]
    assert "exactly one of train, freeze, freeze_first_layers" in problems(
        strategy={"type": "freeze", "train": ["a"], "freeze": ["b"]})[0]
    assert "exactly one of step or epoch" in problems(strategy={
        "type": "gradual_unfreeze", "train": ["a"], "schedule": [{"step": 1, "epoch": 1, "unfreeze": ["b"]}]})[0]
    assert problems(strategy={"type": "qlora", "quant_type": "int3"})[0].startswith("strategy.quant_type:")
    spec = load_spec({"kind": "finetune", "name": "t", "strategy": {"type": "lora"},
                      "data": {"train": "t", "retain": "r"}, "mitigation": {"ewc": {"lambda": 5}}})
    assert spec.model_dump(mode="json")["mitigation"]["ewc"] == {"lambda": 5.0, "samples": 64}


def test_plan_warns_when_a_pretrained_model_trains_above_the_lr_cap():
    from launcher.jobplan import plan

    def warnings(**changes):
        raw = {"kind": "finetune", "name": "t", "model": {"source": "minilm", "num_labels": 4},
               "strategy": {"type": "full"}, "data": {"train": "t.parquet", "task": "classification"},
               "train": {"max_steps": 5, "lr": 2e-4}}
        for key, value in changes.items():
            raw[key] = {**raw[key], **value} if isinstance(raw.get(key), dict) else value
        return [w for w in plan(load_spec(raw), "local", preflight=False).warnings if "train.lr" in w]

    assert warnings() == [
        "train.lr 0.0002 is above 1e-05 for full fine-tuning of the pretrained model minilm: catastrophic "
        "forgetting is likely (the design's range is 1e-5 to 5e-6); lower train.lr or set mitigation.lr_cap: 1e-05"]
    assert len(warnings(strategy={"type": "freeze", "freeze_first_layers": 2})) == 1
    assert warnings(train={"lr": 5e-6}) == []
    assert warnings(mitigation={"lr_cap": 1e-5}) == []
    assert warnings(strategy={"type": "lora"}) == []  # the pretrained weights stay frozen
    assert warnings(model={"source": "tiny-llama", "num_labels": 4}) == []  # random init: nothing to forget


def test_qlora_adapter_merges_into_the_full_precision_base(tmp_path):
    from peft import PeftModel

    model, spec = built({"type": "qlora", "r": 4})
    train(model, steps=3, lr=3e-2)
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="not the 4-bit one"):
        S.merge(str(tmp_path / "adapter"), S.load_quantized(C.build_model(TINY, 0), spec["strategy"]))
    merged = S.merge(str(tmp_path / "adapter"), C.build_model(TINY, 0))
    assert not any(type(m).__name__ == "Linear4bit" for m in merged.modules())
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    unmerged = PeftModel.from_pretrained(C.build_model(TINY, 0), tmp_path / "adapter").eval()
    b = batch()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=b["input_ids"]).logits,
                                   unmerged(input_ids=b["input_ids"]).logits, rtol=0, atol=1e-4)
