"""B7 packing: trained (non-pad) tokens/s with data.packing ÷ without, on a length-skewed chat set.

In-process torch loop (the workers' step: text.model_inputs -> forward -> backward -> AdamW) on a
tiny Qwen2 folder made by `ftlaunch model make`; the same examples, one pass each way.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

SEQ, MICRO, ROWS = 256, 8, 768


def skewed_chats(rows: int, seed: int = 0) -> list[list[dict]]:
    """Most chats ask one question, a few ask up to twelve: lengths skewed as real SFT sets are."""
    from launcher.synthetic import CREATURES, creature_colour

    rng = np.random.default_rng(seed)
    chats = []
    for _ in range(rows):
        turns = min(12, int(rng.geometric(0.45)))
        chat = [{"role": "system", "content": "You answer in one short sentence."}]
        for _ in range(turns):
            name = str(rng.choice(CREATURES))
            chat += [{"role": "user", "content": f"what colour is the {name}?"},
                     {"role": "assistant", "content": f"The {name} is {creature_colour(name)}."}]
        chats.append(chat)
    return chats


def _pass(folder: str, chats, packing: bool) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from jobs import text as T

    model, data = {"source": f"hf:{folder}"}, {"task": "chat", "train": "bench", "packing": packing}
    batch = np.empty(len(chats), dtype=object)
    batch[:] = chats
    enc = T.encode({"messages": batch}, model, data, SEQ)
    if packing:
        enc = T.pack(enc, SEQ, T.tokenizer_for(model, data).pad_token_id)
    rows = {k: torch.from_numpy(v) for k, v in enc.items()}
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    attention = T.attention_of(lm)
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-3)
    lm.train()
    n = len(rows["input_ids"])
    real = slots = 0
    started, cpu = time.perf_counter(), time.process_time()
    for i in range(0, n, MICRO):
        b = {k: v[i:i + MICRO] for k, v in rows.items()}
        loss = lm(**T.model_inputs(b, attention)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        r, s = T.token_counts(b)
        real, slots = real + r, slots + s
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {"rows": n, "steps": -(-n // MICRO), "trained_tokens": real, "padding_fraction": round(1 - real / slots, 4),
            "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "tokens_per_s": round(real / wall, 1),
            "tokens_per_cpu_s": round(real / cpu, 1)}


def run(work: Path) -> dict:
    import torch

    from launcher.modelmake import make_model

    torch.set_num_threads(2)
    folder = str(make_model("qwen2", Path(work) / "b7-qwen2"))
    chats = skewed_chats(ROWS)
    unpacked = _pass(folder, chats, packing=False)
    packed = _pass(folder, chats, packing=True)
    return {"ratio": round(packed["tokens_per_s"] / unpacked["tokens_per_s"], 2), "goal": ">= 1.5",
            "ratio_cpu_time": round(packed["tokens_per_cpu_s"] / unpacked["tokens_per_cpu_s"], 2),
            "seq_len": SEQ, "micro_batch": MICRO, "examples": ROWS, "model": "qwen2 tiny (modelmake)",
            "packed": packed, "unpacked": unpacked}
