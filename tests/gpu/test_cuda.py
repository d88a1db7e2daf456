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
