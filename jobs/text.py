"""Text on the cluster: the model's own tokenizer, and conversations rendered with its chat template.

Every text task of every kind tokenizes here (issue 15): the training stream, eval, retain, EWC
samples, the probe, generation eval and inference. The built-in byte-level tokenizer is the
vocabulary of the random-init catalogue models only; any other model brings its own.
"""

from __future__ import annotations

import copy
import os
from typing import Optional

import numpy as np

from common import hfsource
from common.catalog import minilm_dir
from common.chat import CHAT_TEMPLATES, PLAIN_TEMPLATE, to_messages
from jobs.data.badrows import BAD_COLUMN
from launcher.spec import DataSpec, ModelSpec

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.txt", "vocab.json", "tokenizer_config.json")

_CACHE: dict = {}


def model_folder(model_spec: ModelSpec | dict) -> Optional[str]:
    """The folder a spec's model loads from (None for the random-init catalogue models)."""
    source = ModelSpec.model_validate(model_spec).source
    if source == "minilm":
        return str(minilm_dir())
    if source.startswith("hf:"):
        return hfsource.resolve(source[3:])  # a folder, or <org>/<name>[@rev] in the local HF cache
    return None


def tokenizer_for(model_spec: ModelSpec | dict, data_spec: DataSpec | dict | None = None):
    """The tokenizer of a spec's model, ready for its task: the folder's own (with its chat
    template), else the byte-level one of the random-init models; a pad token (eos when it has
    none); the chat template `data.chat_template` names when the tokenizer has none, or the plain
    instruction template for an instruction task. Cached per (folder, template)."""
    from jobs.components import tokenizer as byte_tokenizer

    folder = model_folder(model_spec)
    data = DataSpec.model_validate(data_spec) if isinstance(data_spec, dict) else data_spec
    key = (folder, getattr(data, "chat_template", None), getattr(data, "task", None))
    if key in _CACHE:
        return _CACHE[key]
    if folder is None:
        tok = copy.deepcopy(byte_tokenizer())  # a copy: a chat template set below stays this key's
    else:
        if not any(os.path.exists(os.path.join(folder, f)) for f in TOKENIZER_FILES):
            raise ValueError(f"model folder {folder} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}); "
                             "save the model's tokenizer into it (tokenizer.save_pretrained)")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if data is not None and not getattr(tok, "chat_template", None):
        if data.chat_template:
            tok.chat_template = CHAT_TEMPLATES[data.chat_template]
        elif data.task == "instruction":
            tok.chat_template = PLAIN_TEMPLATE
    _CACHE[key] = tok
    return tok


def render(tok, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
    """A conversation as the text the model sees, through the tokenizer's chat template."""
    if not getattr(tok, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; set data.chat_template "
                         f"({' | '.join(CHAT_TEMPLATES)}) or use a model folder that ships one")
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


# ---------------------------------------------------------------------------------------------
# Encoding: rows -> token ids and labels (-100 where no loss falls)

IGNORE = -100
TEXT_TASKS = ("causal_lm", "instruction", "chat")  # the causal-LM tasks encode() runs


def read_columns(data_spec: DataSpec | dict) -> Optional[list[str]]:
    """The columns a causal-LM task reads (None: all of them; a chat set's messages column is
    `messages` or ShareGPT's `conversations`, known only from the file)."""
    data = DataSpec.model_validate(data_spec)
    cols = data.columns
    if data.task == "causal_lm":
        return [cols.get("text", "text")]
    if data.task == "instruction":
        return None  # instruction, response, and the optional input and system
    if data.task == "chat":
        return [cols["messages"]] if "messages" in cols else None
    raise ValueError(f"data.task {data.task!r} is not a causal-LM text task; use one of {', '.join(TEXT_TASKS)}")


def _plain(value):
    """A Ray Data / Arrow value as plain Python (numpy arrays of dicts -> lists of dicts)."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()] if value.dtype == object else value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value


def rows_of(batch: dict) -> list[dict]:
    """A columnar batch (numpy, lists) as a list of plain row dicts."""
    names = list(batch)
    n = len(batch[names[0]]) if names else 0
    return [{c: _plain(batch[c][i]) for c in names} for i in range(n)]


def assistant_spans(tok, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans the model learns: each assistant turn's
    text as the template writes it after the generation prompt, through its end-of-turn token
    (trailing whitespace, the next turn's framing, left out).

    A turn's span is found by rendering the conversation up to it: the template must render a
    conversation's first turns as a prefix of the whole (the shipped templates and the
    published families' do)."""
    full = render(tok, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = _prefix(tok, messages[:i], full)
        end = len(render(tok, messages[: i + 1]).rstrip())
        if not full.startswith(render(tok, messages[: i + 1])) or end < start:
            raise ValueError("the chat template does not render a conversation's first turns as a prefix of "
                             f"the whole (turn {i}); set data.chat_template ({' | '.join(CHAT_TEMPLATES)})")
        spans.append((start, end))
    return full, spans


def _prefix(tok, before: list[dict], full: str) -> int:
    """Where the assistant's text starts: after the turns before it and the generation prompt."""
    if not before:
        return 0
    for gen in (True, False):
        text = render(tok, before, add_generation_prompt=gen)
        if full.startswith(text):
            return len(text)
    raise ValueError("the chat template does not render a conversation's first turns as a prefix of the "
                     f"whole; set data.chat_template ({' | '.join(CHAT_TEMPLATES)})")


def encode_conversations(tok, conversations: list[list[dict]], seq_len: int) -> list[tuple[list, list]]:
    """Each conversation's ids and labels: labels = ids on the assistant spans, -100 elsewhere;
    cut at seq_len (ids and labels together, so they stay aligned)."""
    rendered = [assistant_spans(tok, msgs) for msgs in conversations]
    enc = tok([text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for (_, spans), ids, offsets in zip(rendered, enc["input_ids"], enc["offset_mapping"]):
        labels = [t if any(s <= a < e for s, e in spans) else IGNORE for t, (a, _b) in zip(ids, offsets)]
        out.append((list(ids[:seq_len]), labels[:seq_len]))
    return out


def encode_texts(tok, texts: list[str], seq_len: int) -> list[tuple[list, list]]:
    """causal_lm: each text and the end token, loss on every token; cut at seq_len."""
    enc = tok([str(t) for t in texts])
    out = []
    for ids in enc["input_ids"]:
        ids = list(ids) + [tok.eos_token_id]
        out.append((ids[:seq_len], ids[:seq_len]))
    return out


def encode_examples(batch: dict, model: ModelSpec | dict, data: DataSpec | dict, seq_len: int):
    """A batch of rows of a causal-LM task as (ids, labels) examples, and the tokenizer used."""
    data = DataSpec.model_validate(data)
    tok = tokenizer_for(model, data)
    if data.task == "causal_lm":
        column = data.columns.get("text", "text")
        return encode_texts(tok, list(batch[column]), seq_len), tok
    if data.task not in TEXT_TASKS:
        raise ValueError(f"data.task {data.task!r} is not a causal-LM text task; use one of {', '.join(TEXT_TASKS)}")
    conversations = [to_messages(row, data.task, data.columns) for row in rows_of(batch)]
    return encode_conversations(tok, conversations, seq_len), tok


def encode(batch: dict, model: ModelSpec | dict, data: DataSpec | dict, seq_len: int,
           mark_bad: bool = False) -> dict:
    """Ray Data `map_batches` function for every causal-LM text task: rows -> input_ids,
    attention_mask, labels padded to seq_len; unpadded (ragged) examples with `data.packing`,
    for pack() to fill rows with. `mark_bad`: a row that cannot be trained on (jobs/data/badrows.py)
    becomes a marker row in its place (BAD_COLUMN 1, no tokens) for the consumer to count."""
    data = DataSpec.model_validate(data)
    marked = batch.pop(BAD_COLUMN, None)  # lines the JSON lines reader could not make rows of
    bad = bad_rows(batch, data) if mark_bad or marked is not None else None
    if marked is not None:
        bad |= np.asarray(marked, dtype=bool)
    if bad is not None and bad.any():
        batch = {k: [v for v, b in zip(values, bad) if not b] for k, values in batch.items()}
    examples, tok = encode_examples(batch, model, data, seq_len)
    if bad is not None and bad.any():  # the markers back in their rows' places
        good = iter(examples)
        examples = [([], []) if b else next(good) for b in bad]
    if data.packing:
        out = {"input_ids": _ragged([ids for ids, _ in examples]),
               "labels": _ragged([labels for _, labels in examples])}
    else:
        out = padded(examples, seq_len, tok.pad_token_id)
    if bad is not None:
        out[BAD_COLUMN] = bad.astype(np.int64)
    return out


def bad_rows(batch: dict, data: DataSpec) -> np.ndarray:
    """Per row of a batch: whether it cannot be trained on (badrows.row_problem)."""
    from jobs.data.badrows import _text_problem, row_problem

    if data.task == "causal_lm":
        column = data.columns.get("text", "text")
        return np.array([_text_problem(v, column, data.max_row_chars) is not None for v in batch[column]],
                        dtype=bool)
    return np.array([row_problem(row, data) is not None for row in rows_of(batch)], dtype=bool)


def _ragged(lists: list[list[int]]) -> np.ndarray:
    out = np.empty(len(lists), dtype=object)
    for i, values in enumerate(lists):
        out[i] = np.asarray(values, dtype=np.int64)
    return out


def padded(examples: list[tuple[list, list]], seq_len: int, pad_id: int) -> dict:
    """Examples as seq_len rows: pad ids on the right, attention_mask 0 and labels -100 there."""
    n = len(examples)
    ids = np.full((n, seq_len), pad_id, dtype=np.int64)
    labels = np.full((n, seq_len), IGNORE, dtype=np.int64)
    mask = np.zeros((n, seq_len), dtype=np.int64)
    for i, (x, y) in enumerate(examples):
        ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = x, y, 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ---------------------------------------------------------------------------------------------
# Packing: examples concatenated into seq_len rows, nothing crossing an example's boundary

PACKED_COLUMNS = ("input_ids", "attention_mask", "labels", "position_ids", "segment_ids")


def pack(batch: dict, seq_len: int, pad_id: int) -> dict:
    """Ray Data `map_batches` function after encode(): the batch's examples, first fit in order,
    into rows of seq_len. Per token: position_ids restart at 0 for each example, segment_ids
    number the examples of a row from 1 (0: padding), and each example's first label is -100 (its
    first token would otherwise be predicted from the example before it), so a packed row's loss
    is the sum of its examples' own."""
    rows: list[list[int]] = []  # example indices per row
    free: list[int] = []
    lengths = [len(x) for x in batch["input_ids"]]
    markers = int(np.sum(batch[BAD_COLUMN])) if BAD_COLUMN in batch else None
    for i, length in enumerate(lengths):
        if length == 0:
            continue
        for r, room in enumerate(free):
            if length <= room:
                rows[r].append(i)
                free[r] -= length
                break
        else:
            rows.append([i])
            free.append(seq_len - length)
    n = len(rows)
    out = {"input_ids": np.full((n, seq_len), pad_id, dtype=np.int64),
           "labels": np.full((n, seq_len), IGNORE, dtype=np.int64),
           "attention_mask": np.zeros((n, seq_len), dtype=np.int64),
           "segment_ids": np.zeros((n, seq_len), dtype=np.int64),
           "position_ids": np.tile(np.arange(seq_len, dtype=np.int64), (n, 1))}
    for r, members in enumerate(rows):
        at = 0
        for seg, i in enumerate(members, start=1):
            ids, labels, k = np.asarray(batch["input_ids"][i]), np.asarray(batch["labels"][i]), lengths[i]
            out["input_ids"][r, at:at + k] = ids
            out["labels"][r, at:at + k] = labels
            out["labels"][r, at] = IGNORE
            out["attention_mask"][r, at:at + k] = 1
            out["segment_ids"][r, at:at + k] = seg
            out["position_ids"][r, at:at + k] = np.arange(k)
            at += k
        out["position_ids"][r, at:] = np.arange(seq_len - at)  # padding: a segment of its own
    if markers is not None:  # the bad examples (empty) as marker rows after the packed ones
        out[BAD_COLUMN] = np.zeros(n, dtype=np.int64)
        if markers:
            out = {k: np.concatenate([v, np.repeat(_empty_row(k, seq_len, pad_id), markers, axis=0)])
                   for k, v in out.items()}
            out[BAD_COLUMN][n:] = 1
    return out


def _empty_row(column: str, seq_len: int, pad_id: int) -> np.ndarray:
    """One row with no tokens in it, in a packed column."""
    value = {"input_ids": pad_id, "labels": IGNORE, "position_ids": 0}.get(column, 0)
    return np.full((1, seq_len), value, dtype=np.int64) if column != BAD_COLUMN else np.zeros(1, np.int64)


def stream(ds, model: ModelSpec | dict, data: DataSpec | dict, seq_len: int, **map_kwargs):
    """A Ray Dataset of a causal-LM task's rows as model rows: encoded, then packed with
    `data.packing` (PACK_ROWS examples per packing batch)."""
    model, data = ModelSpec.model_validate(model), DataSpec.model_validate(data)
    kw = {"model": model.model_dump(mode="json"), "data": data.model_dump(mode="json"), "seq_len": seq_len}
    ds = ds.map_batches(encode, fn_kwargs={**kw, "mark_bad": True}, batch_format="numpy", **map_kwargs)
    if data.packing:
        pad_id = tokenizer_for(model, data).pad_token_id
        ds = ds.map_batches(pack, fn_kwargs={"seq_len": seq_len, "pad_id": pad_id}, batch_size=PACK_ROWS,
                            batch_format="numpy", **map_kwargs)
    return ds


PACK_ROWS = 512  # examples one packing batch fills rows from (a partial last row per batch)


def encode_rows(rows: dict, model: ModelSpec | dict, data: DataSpec | dict, seq_len: int) -> dict:
    """In-process (eval, retain, EWC samples, tests): encode() and, with packing, pack()."""
    enc = encode(rows, model, data, seq_len)
    if DataSpec.model_validate(data).packing:
        enc = pack(enc, seq_len, tokenizer_for(model, data).pad_token_id)
    return enc


# ---------------------------------------------------------------------------------------------
# Worker side: a batch of model rows -> the model's keyword arguments


def model_inputs(batch: dict, attn_implementation: str = "sdpa") -> dict:
    """The keyword arguments of a causal LM's forward for a batch of rows (torch tensors).

    Padded rows: input_ids, attention_mask, labels. Packed rows (segment_ids present): position_ids
    restarting per example, and a block-diagonal causal mask so no token attends across an
    example's boundary: a 4D boolean mask (True = attend) for sdpa, an additive float one for
    eager (transformers uses a 4D mask as given); flash_attention_2 takes the boundaries from
    position_ids alone (its varlen path)."""
    out = {"input_ids": batch["input_ids"], "labels": batch["labels"]}
    if "segment_ids" not in batch:
        out["attention_mask"] = batch["attention_mask"]
        return out
    import torch

    out["position_ids"] = batch["position_ids"]
    if attn_implementation == "flash_attention_2":
        return out
    seg = batch["segment_ids"]
    n = seg.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=seg.device).tril()
    allowed = (seg[:, :, None] == seg[:, None, :]) & causal
    if attn_implementation == "eager":
        mask = torch.zeros(allowed.shape, dtype=torch.float32, device=seg.device)
        out["attention_mask"] = mask.masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]
    else:
        out["attention_mask"] = allowed[:, None]
    return out


def token_counts(batch: dict) -> tuple[int, int]:
    """(tokens that are not padding, all tokens) of a batch of model rows: padding_fraction's terms."""
    mask = batch["attention_mask"]
    return int(mask.sum()), int(mask.numel() if hasattr(mask, "numel") else mask.size)


def attention_of(model) -> str:
    """The attention implementation a (wrapped: DDP, DeepSpeed, peft) model runs."""
    inner = getattr(model, "module", model)
    config = getattr(inner, "config", None)
    return getattr(config, "_attn_implementation", None) or "sdpa"


def as_packed(batch: dict) -> dict:
    """Padded rows (torch) in the packed rows' columns: one example per row, segment 1."""
    import torch

    if "segment_ids" in batch:
        return batch
    mask = batch["attention_mask"]
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return {**batch, "segment_ids": mask.long(), "position_ids": positions.contiguous()}
