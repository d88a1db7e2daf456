"""GPU tier: what only a CUDA device can show. Skipped, with the reason, where there is none (CI).

Run on a machine with a GPU: `python -m pytest -q tests/gpu`.
"""

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none is visible here")]


def test_lora_trains_in_bf16_on_the_gpu_and_the_frozen_base_stays_bit_identical(tmp_path):
    from jobs import components as C
    from jobs import strategies as S
    from launcher.modelmake import make_model

    folder = make_model("llama", tmp_path / "llama")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).cuda()
    model = S.apply(base, {"type": "lora", "r": 8, "alpha": 16})
    frozen = C.frozen_and_trainable_digests(model)["frozen"]
    enc = tok(["count from 41: 41 42 43 44 45"] * 8, return_tensors="pt").to("cuda")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(20):
        loss = model(**enc, labels=enc["input_ids"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0] * 0.7
    assert C.frozen_and_trainable_digests(model)["frozen"] == frozen


def test_packed_adapters_train_in_bf16_on_a_16_bit_base_whose_identity_is_the_saved_one(tmp_path):
    """Kind multitask on a GPU (train.precision default bf16): the frozen base loads in bf16, its
    digest is the saved weights' (what the registry and `infer` compare), the adapters stay fp32,
    and two packed adapters each learn their own rows."""
    from peft import get_peft_model

    from jobs import adapter_train as A
    from jobs import precision as P
    from jobs.packed_lora import PackedLora
    from launcher.modelmake import make_model
    from launcher.strategies.lora import LoraStrategy

    folder = str(make_model("llama", tmp_path / "llama"))
    base, sha = A.load_base(folder, "cuda", "bf16")
    assert sha == A.load_base(folder, "cpu")[1]
    assert {p.dtype for p in base.parameters()} == {torch.bfloat16}
    config = A.lora_config(LoraStrategy(type="lora", r=8, alpha=16, dropout=0.0))
    model = get_peft_model(base, config, adapter_name="a")
    model.add_adapter("b", config)
    P.trainable_in_fp32(model)
    params = {n: A.adapter_params(model, n) for n in "ab"}
    for group in params.values():
        for p in group:
            p.requires_grad_(True)
    assert {p.dtype for group in params.values() for p in group} == {torch.float32}
    opt = torch.optim.AdamW([{"params": params[n], "lr": 1e-2} for n in "ab"])
    # each adapter's own run of consecutive token ids, which it learns to continue
    rows = {n: torch.arange(3 + 40 * i, 35 + 40 * i, device="cuda").repeat(4, 1) for i, n in enumerate("ab")}
    batches = {n: {"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r} for n, r in rows.items()}
    model.train()
    with PackedLora(model) as pack:
        losses = [A.packed_step(pack, opt, batches, params, {"a": 1.0, "b": 1.0}, "cuda", "bf16") for _ in range(20)]
    for n in "ab":
        assert losses[-1][n] < losses[0][n] * 0.9, (n, losses[0][n], losses[-1][n])  # the same on a CPU: 6.92 -> 5.74
