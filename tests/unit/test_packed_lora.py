"""The packed multi-LoRA engine (jobs/packed_lora.py): K adapters trained packed on one base are
the same adapters as K separate runs, and they save as plain peft adapters."""

from __future__ import annotations

import pytest
import torch

from launcher.strategies.lora import LoraStrategy

STEPS, MICRO, SEQ = 5, 4, 16
# Three adapters unlike each other: ranks (one padded in the stack), alpha (per-adapter scaling),
# lr, clipping (tight enough to bite, so a global clip would differ) and seeds.
ADAPTERS = {
    "t1": {"lora": {"r": 4, "alpha": 8}, "lr": 0.01, "clip": 0.05, "seed": 1},
    "t2": {"lora": {"r": 8, "alpha": 8}, "lr": 0.003, "clip": 1.0, "seed": 2},
    "t3": {"lora": {"r": 4, "alpha": 16}, "lr": 0.02, "clip": None, "seed": 3},
}


def _base():
    from jobs import components as C

    model = C.build_model({"source": "tiny-llama"}, seed=0)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _config(name):
    from jobs import adapter_train as A

    return A.lora_config(LoraStrategy(type="lora", dropout=0.0, **ADAPTERS[name]["lora"]))


def _batches(name):
    """STEPS micro-batches of adapter `name`'s rows: the same random tokens each step (so the
    loss falls as the adapter memorises them), one row half padding."""
    g = torch.Generator().manual_seed(100 + sum(map(ord, name)))
    ids = torch.randint(3, 200, (MICRO, SEQ), generator=g)
    mask = torch.ones(MICRO, SEQ, dtype=torch.long)
    mask[0, SEQ // 2:] = 0
    return [{"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}] * STEPS


def _alone(name, checkpointing=False, precision="fp32"):
    """One adapter on its own base copy, the plain peft forward: its per-step losses and model."""
    from peft import get_peft_model

    from jobs import adapter_train as A
    from jobs import precision as P

    spec = ADAPTERS[name]
    base = _base()  # before the seed: a random-init base draws from the generator
    torch.manual_seed(spec["seed"])
    model = get_peft_model(base, _config(name), adapter_name=name)
    if checkpointing:
        P.enable_checkpointing(model)
    model.train()
    params = A.adapter_params(model, name)
    opt = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=0.01)
    losses = []
    for batch in _batches(name):
        with P.autocast(precision, "cpu"):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss_tok, mask = A.token_losses(logits, batch["labels"])
        loss = (loss_tok * mask).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if spec["clip"]:
            torch.nn.utils.clip_grad_norm_(params, spec["clip"])
        opt.step()
        losses.append(float(loss.detach()))
    return losses, model


def _packed(checkpointing=False, precision="fp32"):
    """All adapters on one base through the packed engine: per-step losses per adapter, the
    model (peft's layers back in place) and the engine."""
    from peft import get_peft_model

    from jobs import adapter_train as A
    from jobs import precision as P
    from jobs.packed_lora import PackedLora

    names = list(ADAPTERS)
    base = _base()
    torch.manual_seed(ADAPTERS[names[0]]["seed"])
    model = get_peft_model(base, _config(names[0]), adapter_name=names[0])
    for n in names[1:]:
        torch.manual_seed(ADAPTERS[n]["seed"])
        model.add_adapter(n, _config(n))
    if checkpointing:
        P.enable_checkpointing(model)
    model.train()
    params = {n: A.adapter_params(model, n) for n in names}
    for group in params.values():
        for p in group:
            p.requires_grad_(True)
    opt = torch.optim.AdamW([{"params": params[n], "lr": ADAPTERS[n]["lr"], "weight_decay": 0.01} for n in names])
    batches = {n: _batches(n) for n in names}
    losses = {n: [] for n in names}
    with PackedLora(model) as pack:
        for step in range(STEPS):
            got = A.packed_step(pack, opt, {n: batches[n][step] for n in names}, params,
                                {n: ADAPTERS[n]["clip"] for n in names}, precision=precision)
            for n, v in got.items():
                losses[n].append(v)
    return losses, model, pack


def _lora_weights(model, name):
    return {k.replace(f".{name}.", "."): v.detach().clone() for k, v in model.named_parameters()
            if ".lora_" in k and f".{name}." in k}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_adapters_train_exactly_as_each_alone_and_save_as_plain_peft_adapters(tmp_path, checkpointing):
    from peft import PeftModel

    packed_losses, packed, pack = _packed(checkpointing)
    frozen = _base().state_dict()
    probe = _batches("probe")[0]
    for name in ADAPTERS:
        losses, alone = _alone(name, checkpointing)
        # Per-step losses and the final weights of the adapter: the same within fp32 tolerance.
        torch.testing.assert_close(torch.tensor(packed_losses[name]), torch.tensor(losses), rtol=1e-5, atol=1e-6)
        assert losses[-1] < losses[0]  # it trained
        a, p = _lora_weights(alone, name), _lora_weights(packed, name)
        assert a.keys() == p.keys() and a
        for key in a:
            torch.testing.assert_close(p[key], a[key], rtol=1e-4, atol=1e-5)
        assert any(not torch.all(v == 0) for k, v in p.items() if "lora_B" in k)  # B moved off its zero init

        # Saved from the packed model by peft itself: a plain adapter, reloading to the same logits.
        packed.save_pretrained(tmp_path / "saved", selected_adapters=[name])
        folder = tmp_path / "saved" / name
        assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
        reloaded = PeftModel.from_pretrained(_base(), folder).eval()
        inputs = {"input_ids": probe["input_ids"], "attention_mask": probe["attention_mask"]}
        with torch.no_grad(), pack, pack.rows([name]):
            engine = packed(**inputs).logits
        with torch.no_grad():
            got, want = reloaded(**inputs).logits, alone.eval()(**inputs).logits
        torch.testing.assert_close(got, engine, rtol=1e-5, atol=1e-5)  # saved = what the engine trained
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # = the adapter trained alone
    # the shared base never moved
    base_only = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
                 for k, v in packed.named_parameters() if "lora_" not in k}
    assert base_only.keys() <= frozen.keys() and all(torch.equal(v, frozen[k]) for k, v in base_only.items())


def test_in_bf16_packed_adapters_train_as_each_alone_in_bf16():
    """train.precision bf16 (autocast; on CPU the base stays fp32, as in the finetune engine):
    the packed engine and each adapter alone under the same autocast agree within bf16's
    rounding, their adapters' weights stay fp32, and the steps did run in bf16 (they differ from
    the fp32 steps)."""
    packed_losses, packed, _ = _packed(precision="bf16")
    fp32_losses, _, _ = _packed()
    for name in ADAPTERS:
        losses, alone = _alone(name, precision="bf16")
        torch.testing.assert_close(torch.tensor(packed_losses[name]), torch.tensor(losses), rtol=2e-2, atol=2e-2)
        assert losses[-1] < losses[0]
        assert packed_losses[name] != fp32_losses[name]  # autocast ran: bf16 matmuls round differently
        a, p = _lora_weights(alone, name), _lora_weights(packed, name)
        assert all(v.dtype == torch.float32 for v in p.values())
        for key in a:  # Adam's sign step turns a rounding difference on a tiny gradient into lr: by norm
            assert (p[key] - a[key]).norm() <= 0.1 * a[key].norm(), key  # a wrong pairing: ~1.0


def test_the_engine_refuses_what_it_cannot_run_in_one_line():
    from peft import get_peft_model

    from jobs import adapter_train as A
    from jobs.packed_lora import PackedLora

    model = get_peft_model(_base(), A.lora_config(LoraStrategy(type="lora", r=4, dropout=0.1)), adapter_name="t1")
    with pytest.raises(ValueError, match="adapter t1 has lora dropout"):
        PackedLora(model)
