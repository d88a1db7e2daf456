"""Generation eval for instruction and chat tasks: eval rows answered greedily, scored by exact match.

Each eval row's prompt is its messages before the last assistant turn, rendered with the chat
template and the assistant's generation prompt; the reference is that turn. Answers are
generated greedily in left-padded batches (launcher/inference.py `greedy`, the same code as
`ftlaunch infer`), up to the longest reference's token count plus a margin, stopping at eos or
the template's end-of-turn token. Exact match: the whitespace-normalised answer equals the
whitespace-normalised reference (common/chat.py `normalise_answer`), averaged over the rows.
"""

from __future__ import annotations

from typing import Optional

from common.chat import normalise_answer, prompt_and_reference, to_messages
from jobs.data.read import read_head
from jobs.text import render, tokenizer_for
from launcher.inference import greedy

GENERATED_TASKS = ("instruction", "chat")  # the tasks whose eval split is also answered
MARGIN = 8  # new tokens beyond the longest reference: room for a longer (wrong) answer to show


def enabled(data, train) -> bool:
    """Whether a run measures exact match: a generated task, an eval split, `train.eval_generate` > 0."""
    return data.task in GENERATED_TASKS and bool(data.eval) and train.eval_generate > 0


def eval_pairs(path: Optional[str], data, limit: int) -> list[tuple[list[dict], str]]:
    """(prompt messages, reference) of the first `limit` eval rows that have an assistant turn."""
    if not path or limit <= 0:
        return []
    pairs = []
    for row in read_head(path, limit=limit).to_pylist():
        prompt, reference = prompt_and_reference(to_messages(row, data.task, data.columns))
        if reference is not None and prompt:
            pairs.append((prompt, reference))
    return pairs


def exact_match(answers: list[str], references: list[str]) -> Optional[float]:
    """The share of answers equal to their reference, whitespace-normalised; None for no rows."""
    if not references:
        return None
    hits = sum(normalise_answer(a) == normalise_answer(r) for a, r in zip(answers, references, strict=True))
    return hits / len(references)


def max_new_tokens(tok, references: list[str]) -> int:
    return max(len(tok(r, add_special_tokens=False)["input_ids"]) for r in references) + MARGIN


def answer(model, tok, pairs: list[tuple[list[dict], str]], batch_size: int = 16) -> list[str]:
    """Greedy answers to the pairs' prompts (the model: plain or peft-wrapped, DDP unwrapped)."""
    prompts = [render(tok, messages, add_generation_prompt=True) for messages, _ in pairs]
    return greedy(model, tok, prompts, max_new_tokens(tok, [r for _, r in pairs]), batch_size=batch_size)


def evaluate(model, model_spec, data, pairs: list[tuple[list[dict], str]]) -> dict:
    """`{"exact_match": share}` of a model on eval pairs ({} without any), with the tokenizer of
    `model_spec` as `data` renders it: a finetune's blocks, or a multitask task's data."""
    if not pairs:
        return {}
    tok = tokenizer_for(model_spec, data)
    return {"exact_match": exact_match(answer(model, tok, pairs), [r for _, r in pairs])}
