"""jobs/text.py in-process: the model's own tokenizer in the stream, response-only labels for
instruction and chat rows (checked token by token), truncation, packing (loss and isolation)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from jobs import components as C
from jobs import text as T

SEQ = 128
CHAT = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "what colour is the zorp?"},
    {"role": "assistant", "content": "The zorp is orange."},
    {"role": "user", "content": "and the blick?"},
    {"role": "assistant", "content": "The blick is white."},
]
SHAREGPT = [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
            for m in CHAT]
# What each family's template writes after an assistant's content, as the turn's end.
END = {"qwen2": "<|im_end|>", "llama": "<|eot_id|>", "mistral": "</s>"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from launcher.modelmake import make_model

    root = tmp_path_factory.mktemp("models")
    return {f: str(make_model(f, root / f)) for f in ("qwen2", "llama", "mistral")}


def model(folder, **extra):
    return {"source": f"hf:{folder}", **extra}


def data(task, **extra):
    return {"task": task, "train": "in-process", **extra}


def labelled_runs(ids, labels) -> list[list[int]]:
    """The maximal runs of tokens that carry a label (and the label is the token itself)."""
    runs, current = [], []
    for t, y in zip(ids, labels):
        if y == T.IGNORE:
            if current:
                runs.append(current)
            current = []
        else:
            assert y == t, "a labelled token's label is the token itself"
            current.append(t)
    return runs + ([current] if current else [])


# ---------------------------------------------------------------------------------------------
# The model's own tokenizer


def test_causal_lm_stream_uses_the_folders_tokenizer_not_the_byte_one(folders):
    from transformers import AutoTokenizer

    text = "count from 41: 41 42"
    own = AutoTokenizer.from_pretrained(folders["qwen2"])
    enc = T.encode({"text": np.array([text], dtype=object)}, model(folders["qwen2"]), data("causal_lm"), 32)
    n = int(enc["attention_mask"][0].sum())
    want = own(text)["input_ids"] + [own.eos_token_id]
    assert enc["input_ids"][0, :n].tolist() == want
    assert enc["labels"][0, :n].tolist() == want and (enc["labels"][0, n:] == T.IGNORE).all()
    assert (enc["input_ids"][0, n:] == own.pad_token_id).all()
    byte = C.tokenize_causal({"text": [text]}, "text", 32)  # the random-init models' vocabulary
    assert byte["input_ids"][0, : int(byte["attention_mask"][0].sum())].tolist() != want
    # components' entry point (eval, probe, EWC) takes the same path with the model spec
    same = C.tokenize_causal({"text": [text]}, "text", 32, model(folders["qwen2"]))
    assert same["input_ids"][0, :n].tolist() == want


def test_the_saved_run_tokenizer_is_the_folders(folders, tmp_path):
    from transformers import AutoTokenizer

    own = AutoTokenizer.from_pretrained(folders["llama"])
    T.tokenizer_for(model(folders["llama"]), data("chat")).save_pretrained(tmp_path / "tokenizer")
    saved = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    assert saved.get_vocab() == own.get_vocab() and saved.chat_template == own.chat_template
    text = T.render(own, CHAT)
    assert saved(text)["input_ids"] == own(text)["input_ids"]


def test_a_shipped_template_for_a_tokenizer_without_one_and_plain_for_instruction(folders, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(folders["qwen2"], bare)
    (bare / "chat_template.jinja").unlink()
    assert not getattr(T.tokenizer_for(model(bare)), "chat_template", None)
    with pytest.raises(ValueError, match="data.chat_template"):
        T.render(T.tokenizer_for(model(bare)), CHAT)
    assert T.render(T.tokenizer_for(model(bare), data("chat", chat_template="llama3")), CHAT).startswith(
        "<|endoftext|><|start_header_id|>system")  # this tokenizer's bos
    assert "### Response:\n" in T.render(T.tokenizer_for(model(bare), data("instruction")), CHAT[:3])
    # the byte-level tokenizer is shared: a template set for one task does not leak into another
    assert not getattr(T.tokenizer_for({"source": "tiny-llama"}), "chat_template", None)


# ---------------------------------------------------------------------------------------------
# Labels: exactly the assistant turns


@pytest.mark.parametrize("family", ["qwen2", "llama", "mistral"])
def test_chat_labels_are_exactly_the_assistant_turns_and_their_end_tokens(folders, family):
    tok = T.tokenizer_for(model(folders[family]), data("chat"))
    batch = {"messages": np.array([CHAT], dtype=object)}
    enc = T.encode(batch, model(folders[family]), data("chat"), SEQ)
    n = int(enc["attention_mask"][0].sum())
    ids, labels = enc["input_ids"][0, :n].tolist(), enc["labels"][0, :n].tolist()
    assert tok.decode(ids) == T.render(tok, CHAT)  # the whole conversation, nothing cut
    runs = labelled_runs(ids, labels)
    assert [tok.decode(r).strip() for r in runs] == [f"{m['content']}{END[family]}" for m in CHAT
                                                      if m["role"] == "assistant"]
    # and no token outside them is labelled: the unlabelled ones are the prompt's
    outside = "".join(tok.decode([t]) for t, y in zip(ids, labels) if y == T.IGNORE)
    assert "zorp?" in outside and "orange" not in outside and "white" not in outside


def test_sharegpt_rows_and_numpy_arrays_of_dicts_give_the_same_labels(folders):
    m, d = model(folders["qwen2"]), data("chat")
    openai = T.encode({"messages": np.array([CHAT], dtype=object)}, m, d, SEQ)
    # Ray Data hands a list<struct> column over as arrays of dicts
    turns = np.empty(1, dtype=object)
    turns[0] = np.array(SHAREGPT, dtype=object)
    sharegpt = T.encode({"conversations": turns}, m, d, SEQ)
    for k in openai:
        assert (openai[k] == sharegpt[k]).all(), k


@pytest.mark.parametrize("templated", [True, False], ids=["chat-template", "plain-template"])
def test_instruction_labels_are_the_response_and_its_end_token(folders, tmp_path, templated):
    folder = folders["qwen2"]
    if not templated:
        folder = tmp_path / "bare"
        shutil.copytree(folders["qwen2"], folder)
        (folder / "chat_template.jinja").unlink()
    tok = T.tokenizer_for(model(folder), data("instruction"))
    rows = {"instruction": ["add one to: 9 40"], "input": ["quickly"], "response": ["10 41"]}
    enc = T.encode(rows, model(folder), data("instruction"), SEQ)
    n = int(enc["attention_mask"][0].sum())
    ids, labels = enc["input_ids"][0, :n].tolist(), enc["labels"][0, :n].tolist()
    text = tok.decode(ids)
    assert ("<|im_start|>user\nadd one to: 9 40\n\nquickly" in text) == templated
    assert ("### Instruction:\nadd one to: 9 40\n\nquickly" in text) != templated
    assert [tok.decode(r) for r in labelled_runs(ids, labels)] == [f"10 41{tok.eos_token}"]


def test_byte_tokenizer_instruction_with_the_plain_template():
    tok = T.tokenizer_for({"source": "tiny-llama"}, data("instruction"))
    enc = T.encode({"instruction": ["reverse: 1 4"], "response": ["4 1"]}, {"source": "tiny-llama"},
                   data("instruction"), SEQ)
    ids, labels = enc["input_ids"][0].tolist(), enc["labels"][0].tolist()
    assert [tok.decode(r) for r in labelled_runs(ids, labels)] == ["4 1</s>"]


def test_truncation_keeps_labels_aligned(folders):
    m, d = model(folders["llama"]), data("chat")
    full = T.encode({"messages": np.array([CHAT], dtype=object)}, m, d, SEQ)
    n = int(full["attention_mask"][0].sum())
    first_answer = next(i for i, y in enumerate(full["labels"][0]) if y != T.IGNORE)
    for cut in (first_answer - 1, first_answer + 2, n - 3):  # before, inside and after an answer
        short = T.encode({"messages": np.array([CHAT], dtype=object)}, m, d, cut)
        assert short["input_ids"].shape == (1, cut)
        assert (short["input_ids"][0] == full["input_ids"][0, :cut]).all()
        assert (short["labels"][0] == full["labels"][0, :cut]).all()


# ---------------------------------------------------------------------------------------------
# Packing


def _examples(folder, lengths_seed=0, rows=12):
    """Chats of skewed lengths (one to four question/answer pairs)."""
    from launcher.synthetic import CREATURES, creature_colour

    rng = np.random.default_rng(lengths_seed)
    chats = []
    for _ in range(rows):
        turns = []
        for _ in range(int(rng.integers(1, 5))):
            name = str(rng.choice(CREATURES))
            turns += [{"role": "user", "content": f"what colour is the {name}?"},
                      {"role": "assistant", "content": f"The {name} is {creature_colour(name)}."}]
        chats.append(turns)
    return T.encode({"messages": np.array(chats + [[]], dtype=object)[:-1]}, model(folder), data("chat", packing=True),
                    SEQ)


def test_pack_fills_rows_with_restarting_positions_and_segments(folders):
    enc = _examples(folders["qwen2"])
    packed = T.pack(enc, SEQ, pad_id=0)
    lengths = [len(x) for x in enc["input_ids"]]
    assert len(packed["input_ids"]) < len(lengths)  # fewer rows than examples
    assert int(packed["attention_mask"].sum()) == sum(lengths)
    seen = []
    for r in range(len(packed["input_ids"])):
        seg, pos = packed["segment_ids"][r], packed["position_ids"][r]
        for s in range(1, int(seg.max()) + 1):
            where = np.flatnonzero(seg == s)
            assert (pos[where] == np.arange(len(where))).all()
            assert packed["labels"][r, where[0]] == T.IGNORE  # never predicted across the boundary
            seen.append(packed["input_ids"][r, where].tolist())
    assert sorted(seen) == sorted(x.tolist() for x in enc["input_ids"])


def _token_losses(logits, labels):
    return torch.nn.functional.cross_entropy(logits[:-1].float(), labels[1:], ignore_index=-100, reduction="none")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_give_each_examples_unpacked_loss_and_no_attention_crosses(folders, attn):
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(folders["qwen2"], attn_implementation=attn,
                                              dtype=torch.float32).eval()
    assert T.attention_of(lm) == attn
    enc = _examples(folders["qwen2"])
    packed = {k: torch.from_numpy(v) for k, v in T.pack(enc, 2 * SEQ, pad_id=0).items()}  # 3+ per row
    own_labels = {tuple(x.tolist()): torch.from_numpy(y) for x, y in zip(enc["input_ids"], enc["labels"])}
    with torch.no_grad():
        logits = lm(**T.model_inputs(packed, attn)).logits
        for r in range(len(packed["input_ids"])):
            seg = packed["segment_ids"][r]
            for s in range(1, int(seg.max()) + 1):
                where = torch.nonzero(seg == s).flatten()
                ids = packed["input_ids"][r, where]
                alone = lm(input_ids=ids[None]).logits[0]
                torch.testing.assert_close(logits[r, where], alone, rtol=0, atol=1e-5)
                unpacked = _token_losses(alone, own_labels[tuple(ids.tolist())])  # the example's own labels
                torch.testing.assert_close(_token_losses(logits[r, where], packed["labels"][r, where]),
                                           unpacked, rtol=0, atol=1e-5)
        # the model's own loss over the packed batch is the token mean of the examples' own losses
        total = sum(_token_losses(lm(input_ids=torch.from_numpy(x)[None]).logits[0], torch.from_numpy(y)).sum()
                    for x, y in zip(enc["input_ids"], enc["labels"]))
        tokens = sum(int((y[1:] != T.IGNORE).sum()) for y in enc["labels"])
        torch.testing.assert_close(lm(**T.model_inputs(packed, attn)).loss, total / tokens, rtol=0, atol=1e-5)
        # changing one example's tokens leaves the other examples of its row as they were
        row = next(r for r in range(len(packed["input_ids"])) if packed["segment_ids"][r].max() >= 3)
        seg = packed["segment_ids"][row]
        changed = {k: v.clone() for k, v in packed.items()}
        changed["input_ids"][row, seg == 2] = (changed["input_ids"][row, seg == 2] + 7) % 200
        after = lm(**T.model_inputs(changed, attn)).logits
    assert not torch.allclose(after[row, seg == 2], logits[row, seg == 2])
    torch.testing.assert_close(after[row, seg != 2], logits[row, seg != 2], rtol=0, atol=1e-6)


def test_padding_fraction_falls_with_packing(folders):
    from launcher.synthetic import GENERATORS

    chats = np.array(GENERATORS["chat"](40, 0).column("messages").to_pylist() + [[]], dtype=object)[:-1]
    enc = T.encode({"messages": chats}, model(folders["qwen2"]), data("chat", packing=True), 2 * SEQ)
    lengths = [len(x) for x in enc["input_ids"]]
    padded = T.padded(list(zip(enc["input_ids"], enc["labels"])), 2 * SEQ, 0)
    packed = T.pack(enc, 2 * SEQ, pad_id=0)
    real, slots = T.token_counts({k: torch.from_numpy(v) for k, v in padded.items()})
    real_p, slots_p = T.token_counts({k: torch.from_numpy(v) for k, v in packed.items()})
    assert real == real_p == sum(lengths)
    assert 1 - real_p / slots_p < (1 - real / slots) / 2


def test_as_packed_lets_padded_rows_share_a_forward_with_packed_ones(folders):
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(folders["qwen2"], dtype=torch.float32).eval()
    pad = {k: torch.from_numpy(v) for k, v in T.encode({"text": ["count from 3: 3 4", "c d"]},
                                                       model(folders["qwen2"]), data("causal_lm"), 16).items()}
    with torch.no_grad():
        a = lm(**T.model_inputs(pad)).logits
        b = lm(**T.model_inputs(T.as_packed(pad))).logits
    mask = pad["attention_mask"].bool()
    torch.testing.assert_close(a[mask], b[mask], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Eval splits in every format


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "arrow"])
def test_load_split_reads_every_format_and_scores_chat_loss(folders, tmp_path, fmt):
    import pyarrow as pa

    from launcher import synthetic
    from launcher.spec import DataSpec

    if fmt == "arrow":
        table = synthetic.GENERATORS["chat"](20, 3)
        path = tmp_path / "eval.arrow"
        with pa.ipc.new_file(path, table.schema) as w:
            w.write_table(table)
    else:
        path = synthetic.make("chat", 20, tmp_path, 3, "eval", fmt)
    spec = {"data": {"task": "chat"}, "model": model(folders["qwen2"], seq_len=64)}
    rows = C.load_split(str(path), DataSpec.model_validate(data("chat")), 8)
    assert len(rows["messages"]) == 8 and rows["messages"][0][-1]["role"] == "assistant"
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(folders["qwen2"], dtype=torch.float32)
    loss = C.evaluate(lm, rows, spec)["loss"]
    enc = C.encode_split(rows, spec)
    with torch.no_grad():
        assert loss == pytest.approx(float(lm(**enc).loss), rel=1e-5)  # over the assistant tokens only
    assert (enc["labels"] != T.IGNORE).sum() < enc["attention_mask"].sum() / 2
