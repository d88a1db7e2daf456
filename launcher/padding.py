"""The plan's packing figure: how much of each `seq_len` row would be padding without and with
`data.packing`, from a sample of the train rows tokenized the way the job does it.

The folder's tokenizer.json runs through the `tokenizers` library (no transformers); instruction
and chat rows are rendered first with the chat template the job uses (the folder's own, else
`data.chat_template`, else the plain instruction template) through jinja2, as transformers does;
the random-init catalogue models' byte-level tokenizer is one id per UTF-8 byte. A causal_lm text
gets the eos the job appends. Packing is simulated as the job packs: whole examples (cut at
seq_len) laid greedily, in order, into rows of seq_len.
"""

from __future__ import annotations

import json
import os
from typing import Optional

SAMPLE_ROWS = 256
TEXT_TASKS = ("causal_lm", "instruction", "chat")
CUT_WARNING = 0.05  # an SFT plan warns when more of its sampled rows than this are cut at seq_len


def figures(lengths: list[int], seq_len: int) -> dict:
    """Padding fractions of examples of these token `lengths`, one per row vs packed."""
    kept = [min(n, seq_len) for n in lengths]
    rows, free = 0, 0
    for n in kept:
        if n > free:
            rows, free = rows + 1, seq_len
        free -= n
    tokens = sum(kept)
    return {
        "sampled": len(lengths),
        "mean_tokens": round(sum(lengths) / len(lengths), 2),
        "max_tokens": max(lengths),
        "truncated": round(sum(n > seq_len for n in lengths) / len(lengths), 4),
        "padding_unpacked": round(1 - tokens / (len(kept) * seq_len), 4),
        "padding_packed": round(1 - tokens / (rows * seq_len), 4),
        "rows_per_packed_row": round(len(kept) / rows, 2),
    }


def _renderer(template: str, bos: Optional[str], eos: Optional[str]):
    """A chat template compiled the way transformers compiles it (sandboxed, trimmed blocks)."""
    import datetime

    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False, ensure_ascii=False: json.dumps(
        x, indent=indent, separators=separators, sort_keys=sort_keys, ensure_ascii=ensure_ascii)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.datetime.now().strftime(f))
    try:
        compiled = env.from_string(template)
    except TemplateError as exc:
        raise ValueError(f"the chat template does not compile: {exc}") from None

    def render(messages):
        try:
            return compiled.render(messages=messages, bos_token=bos or "", eos_token=eos or "",
                                   add_generation_prompt=False)
        except TemplateError as exc:
            raise ValueError(f"the chat template fails on a train row: {exc}") from None

    return render


def lengths(model: dict, data: dict, rows: list[dict]) -> list[int]:
    """Token counts of `rows` as the job would tokenize them (see the module's note)."""
    from common import hfsource
    from common.catalog import RANDOM_INIT_SOURCES, minilm_dir
    from common.chat import CHAT_TEMPLATES, PLAIN_TEMPLATE, to_messages
    from launcher.modelcheck import tokenizer_facts

    source, task, columns = model.get("source", "tiny-llama"), data.get("task", "causal_lm"), data.get("columns") or {}
    if source in RANDOM_INIT_SOURCES:
        folder, bos, eos, own = None, "<s>", "</s>", None
    else:
        folder = str(minilm_dir()) if source == "minilm" else hfsource.resolve(source[len(hfsource.HF):])
        facts = tokenizer_facts(folder)
        bos, eos, own = facts.bos, facts.eos, facts.chat_template
    if task == "causal_lm":
        texts, special = [str(r.get(columns.get("text", "text"), "")) for r in rows], True
    else:
        template = own or CHAT_TEMPLATES.get(data.get("chat_template") or "") or (
            PLAIN_TEMPLATE if task == "instruction" else None)
        if template is None:
            raise ValueError("no chat template to render the rows with")
        render = _renderer(template, bos, eos)
        texts, special = [render(to_messages(r, task, columns)) for r in rows], False
    extra = 1 if task == "causal_lm" else 0  # the eos the job appends to a text
    if folder is None:
        return [len(t.encode("utf-8")) + extra for t in texts]
    if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
        raise ValueError(f"{folder} has no tokenizer.json to count tokens with")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    return [len(e.ids) + extra for e in tok.encode_batch(texts, add_special_tokens=special)]


def estimate(spec: dict) -> tuple[Optional[dict], list[str]]:
    """The length figures of a finetune spec dict (resolved paths) and warnings: with packing,
    why there is no figure; for instruction and chat rows, that many of them are cut at seq_len
    (their ends, the answers the loss is on, would be lost)."""
    from launcher.datacheck import sample_rows

    data, model = spec["data"], spec.get("model") or {}
    if data.get("task") not in TEXT_TASKS:
        return None, []
    try:
        rows = sample_rows(data["train"], SAMPLE_ROWS)
        found = lengths(model, data, rows)
    except (ImportError, OSError, ValueError) as exc:  # no tokenizers/jinja2 here, or a folder without tokenizer.json
        why = f"no padding estimate ({str(exc).splitlines()[0][:120]})"
        return None, [f"data.packing: {why}"] if data.get("packing") else []
    if not found:
        return None, []
    seq_len = model.get("seq_len", 64)
    fig = figures(found, seq_len)
    warnings = []
    if data["task"] != "causal_lm" and fig["truncated"] > CUT_WARNING:
        warnings.append(f"model.seq_len: {seq_len} cuts {100 * fig['truncated']:.0f}% of {fig['sampled']} sampled "
                        f"train rows (mean {fig['mean_tokens']:g}, longest {fig['max_tokens']} tokens): the end of "
                        "each (its last answer, which the loss is on) is not trained on; raise model.seq_len "
                        f"(to {fig['max_tokens']} for all)")
    return fig, warnings


def describe(fig: dict, seq_len: int) -> str:
    pct = lambda x: f"{100 * x:.0f}%"  # noqa: E731
    cut = f", {pct(fig['truncated'])} cut at seq_len" if fig["truncated"] else ""
    return (f"packing       padding {pct(fig['padding_unpacked'])} unpacked -> {pct(fig['padding_packed'])} packed "
            f"({fig['rows_per_packed_row']:g} examples per row; mean {fig['mean_tokens']:g} tokens of seq_len "
            f"{seq_len} over {fig['sampled']} sampled train rows{cut})")
