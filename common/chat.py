"""Conversations, torch-free: the chat templates the project ships and one row -> messages rule.

Every text task that trains on prompts and answers (instruction, chat) turns a row into a list of
`{role, content}` messages here, on the client (pre-flight checks, `ftlaunch infer`) and on the
cluster (the training stream, generation eval) alike, so the two never disagree.

- `instruction` rows: `instruction`, `response`, optional `input` and `system` (renamable with
  `data.columns`) -> [system], user (instruction, then a blank line and the input), assistant.
- `chat` rows: a `messages` column of `{role, content}` lists (OpenAI style), or ShareGPT's
  `conversations` of `{from, value}` with `human`/`gpt`/`system` (recognised without configuration);
  `data.columns.messages` renames the column.

A tokenizer without a chat template of its own renders with `data.chat_template` (one of
CHAT_TEMPLATES); an instruction task without either renders with PLAIN_TEMPLATE.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'system' %}{{ '[INST] ' + message['content'] + '\\n' }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)
CHAT_TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3, "mistral": MISTRAL}
CHAT_TEMPLATE_NAMES = tuple(CHAT_TEMPLATES)

# An instruction task on a tokenizer with no chat template (and none named): the prompt is
# "### Instruction:\n...\n\n### Response:\n" (the input, if any, after the instruction); the
# response follows, then the tokenizer's eos token. Loss falls on the response and eos only.
PLAIN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    "{% else %}{{ '### Response:\\n' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
)

INSTRUCTION_ROLES = ("instruction", "response", "input", "system")  # the optional ones: input, system
# The instruction layouts the usual tools read, recognised without data.columns: Alpaca's
# (instruction, input, output), Dolly's (instruction, context, response) and TRL's
# prompt-completion (prompt, completion). A role's own column, or the one data.columns maps, wins.
INSTRUCTION_ALIASES = {"instruction": ("prompt",), "response": ("output", "completion"), "input": ("context",)}
MESSAGES = "messages"
SHAREGPT = "conversations"
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}
ROLES = ("system", "user", "assistant")


def messages_column(columns: dict[str, str], names: Iterable[str]) -> str:
    """The column of a chat dataset with these column `names`: `data.columns.messages` if set,
    else `messages`, else ShareGPT's `conversations`."""
    names = list(names)
    if "messages" in columns:
        return columns["messages"]
    if MESSAGES not in names and SHAREGPT in names:
        return SHAREGPT
    return MESSAGES


def normalise(turns: Any) -> list[dict]:
    """One chat's turns as `{role, content}` dicts: OpenAI style as is, ShareGPT's `{from, value}`
    mapped (human -> user, gpt -> assistant). A turn of another shape raises ValueError."""
    out = []
    for i, turn in enumerate(turns or []):
        if not isinstance(turn, dict):
            raise ValueError(f"turn {i} is a {type(turn).__name__}, not a {{role, content}} object")
        if "role" in turn:
            role, content = turn.get("role"), turn.get("content")
        elif "from" in turn:
            role, content = SHAREGPT_ROLES.get(str(turn.get("from")).lower()), turn.get("value")
            if role is None:
                raise ValueError(f"turn {i}: ShareGPT speaker {turn.get('from')!r} is not one of "
                                 f"{', '.join(sorted(SHAREGPT_ROLES))}")
        else:
            raise ValueError(f"turn {i} has neither role/content nor from/value keys: {sorted(turn)}")
        if role not in ROLES:
            raise ValueError(f"turn {i}: role {role!r} is not one of {', '.join(ROLES)}")
        out.append({"role": role, "content": "" if content is None else str(content)})
    return out


def instruction_columns(columns: dict[str, str], names: Iterable[str]) -> dict[str, str]:
    """Role -> column of an instruction dataset with these column `names`: `data.columns`'s,
    else the role's own name, else a known layout's (INSTRUCTION_ALIASES) that no other role
    takes; a role found nowhere keeps its own name (plan says it is missing)."""
    names = set(names)
    found = {r: columns[r] for r in INSTRUCTION_ROLES if r in columns}
    for role in INSTRUCTION_ROLES:
        if role not in found:
            taken = set(found.values())
            found[role] = role if role in names else next(
                (a for a in INSTRUCTION_ALIASES.get(role, ()) if a in names and a not in taken), role)
    return found


def instruction_messages(row: dict, columns: Optional[dict] = None) -> list[dict]:
    """An instruction row (its columns renamed by `columns`, or in a known layout) as
    system?/user/assistant messages."""
    columns = instruction_columns(columns or {}, row.keys())
    get = lambda role: row.get(columns[role])  # noqa: E731
    user = str(get("instruction") or "")
    if get("input"):
        user = f"{user}\n\n{get('input')}"
    messages = [{"role": "system", "content": str(get("system"))}] if get("system") else []
    messages.append({"role": "user", "content": user})
    if get("response") is not None:
        messages.append({"role": "assistant", "content": str(get("response"))})
    return messages


def to_messages(row: dict, task: str, columns: Optional[dict] = None) -> list[dict]:
    """A row of an instruction or chat dataset as its list of `{role, content}` messages."""
    columns = columns or {}
    if task == "instruction":
        return instruction_messages(row, columns)
    if task == "chat":
        return normalise(row.get(messages_column(columns, row.keys())))
    raise ValueError(f"task {task!r} has no messages; only instruction and chat rows do")


def prompt_and_reference(messages: list[dict]) -> tuple[list[dict], Optional[str]]:
    """For generation eval: the messages before the last assistant turn, and that turn's text."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "assistant":
            return messages[:i], messages[i]["content"]
    return messages, None


def normalise_answer(text: str) -> str:
    """Exact match compares answers with whitespace collapsed and ends stripped."""
    return " ".join(str(text).split())
