"""A model folder checked at plan, from its JSON files only (no torch, no transformers): the
tokenizer files are there, the tokenizer fits the embeddings, `seq_len` fits the positions, a chat
task has a chat template, and a pad token (or eos, which the job then pads with).

`tokenizer_facts` is also what the plan's packing estimate renders and tokenizes with.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Optional

from common.chat import CHAT_TEMPLATES
from launcher.errors import ConfigError

# Files that hold a vocabulary (tokenizer_config.json alone holds none).
VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
               "sentencepiece.bpe.model")
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
CHAT_TASKS = ("chat",)  # tasks that cannot render without a chat template (instruction has a plain one)
_MARKERS = re.compile(r"<\|[^|'\s]+\|>|\[/?INST\]")  # the special tokens a shipped template writes


@dataclasses.dataclass(frozen=True)
class TokenizerFacts:
    folder: str
    files: tuple[str, ...]  # the vocabulary files present
    size: Optional[int]  # ids in the vocabulary, added tokens included (None: not countable here)
    tokens: frozenset  # token strings, where the vocabulary is readable
    bos: Optional[str]
    eos: Optional[str]
    pad: Optional[str]
    chat_template: Optional[str]  # the folder's own


def _json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.source: {path} is not readable JSON ({str(e)[:80]}); "
                          "save the model folder again (save_pretrained)") from None


def _token(value: Any) -> Optional[str]:
    """A special token as tokenizer_config.json / special_tokens_map.json write it (text or AddedToken)."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _vocabulary(folder: str, config: dict) -> tuple[Optional[int], frozenset]:
    """(ids, token strings) of the folder's vocabulary: tokenizer.json, else vocab.json/vocab.txt;
    plus the added tokens tokenizer_config.json lists. (None, {}) for a SentencePiece model only."""
    ids: set[int] = set()
    tokens: set[str] = set()
    tj = _json(os.path.join(folder, "tokenizer.json"))
    if isinstance(tj, dict):
        vocab = (tj.get("model") or {}).get("vocab")
        if isinstance(vocab, dict):  # BPE, WordPiece, WordLevel: token -> id
            tokens.update(vocab)
            ids.update(v for v in vocab.values() if isinstance(v, int))
        elif isinstance(vocab, list):  # Unigram: [piece, score] by id
            tokens.update(p[0] for p in vocab if p)
            ids.update(range(len(vocab)))
        for added in tj.get("added_tokens") or []:
            tokens.add(added.get("content"))
            ids.add(added.get("id", -1))
    elif os.path.isfile(os.path.join(folder, "vocab.json")):
        vocab = _json(os.path.join(folder, "vocab.json")) or {}
        tokens.update(vocab)
        ids.update(v for v in vocab.values() if isinstance(v, int))
    elif os.path.isfile(os.path.join(folder, "vocab.txt")):
        with open(os.path.join(folder, "vocab.txt"), encoding="utf-8") as f:
            lines = f.read().splitlines()
        tokens.update(lines)
        ids.update(range(len(lines)))
    else:
        return None, frozenset()
    for number, added in (config.get("added_tokens_decoder") or {}).items():
        if str(number).isdigit():
            ids.add(int(number))
            tokens.add(_token(added))
    added = _json(os.path.join(folder, "added_tokens.json")) or {}
    tokens.update(added)
    ids.update(v for v in added.values() if isinstance(v, int))
    ids.discard(-1)
    tokens.discard(None)
    return (max(ids) + 1 if ids else 0), frozenset(tokens)


def _chat_template(folder: str, config: dict) -> Optional[str]:
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if not template and os.path.isfile(os.path.join(folder, "chat_template.jinja")):
        with open(os.path.join(folder, "chat_template.jinja"), encoding="utf-8") as f:
            template = f.read()
    if not template:
        template = (_json(os.path.join(folder, "chat_template.json")) or {}).get("chat_template")
    return template or None


def tokenizer_facts(folder: str) -> TokenizerFacts:
    config = _json(os.path.join(folder, "tokenizer_config.json")) or {}
    specials = _json(os.path.join(folder, "special_tokens_map.json")) or {}
    size, tokens = _vocabulary(folder, config)

    def special(name):
        return _token(config.get(f"{name}_token")) or _token(specials.get(f"{name}_token"))

    return TokenizerFacts(
        folder=folder, files=tuple(f for f in VOCAB_FILES if os.path.isfile(os.path.join(folder, f))),
        size=size, tokens=tokens, bos=special("bos"), eos=special("eos"), pad=special("pad"),
        chat_template=_chat_template(folder, config))


def get_field(data: Any, key: str) -> Any:
    return data.get(key) if isinstance(data, dict) else getattr(data, key, None)


def check_folder(folder: str, model: dict, datasets: list = ()) -> list[str]:
    """Refuse (ConfigError, one line per problem) what would fail or train wrong on the cluster;
    return the plan's warnings. `model` is the spec's model block; `datasets` its data blocks."""
    facts = tokenizer_facts(folder)
    config = {**(_json(os.path.join(folder, "config.json")) or {}), **(model.get("config") or {})}
    config = {**(config.get("text_config") or {}), **config}  # a multimodal config keeps the LM's here
    problems, warnings = [], []
    source = model.get("source", f"hf:{folder}")
    if not facts.files:
        problems.append(f"model.source: {folder} has no tokenizer files ({', '.join(VOCAB_FILES[:4])}); save the "
                        "model's tokenizer into it (tokenizer.save_pretrained(folder)) or use the folder it came in")
    rows = config.get("vocab_size")
    if facts.size and isinstance(rows, int) and facts.size > rows:
        problems.append(f"model.source: the tokenizer of {folder} has {facts.size:,} tokens (added ones included) "
                        f"but the model has {rows:,} embedding rows (config.json vocab_size); ids past {rows - 1} "
                        "would index out of range: resize the embeddings (model.resize_token_embeddings"
                        "(len(tokenizer))) and save again, or use the model's own tokenizer")
    key = next((k for k in POSITION_KEYS if isinstance(config.get(k), int)), None)
    seq_len = model.get("seq_len", 64)
    if key and seq_len > config[key]:
        problems.append(f"model.seq_len: {seq_len} is above the {config[key]} positions of {source} "
                        f"(config.json {key}); set model.seq_len to at most {config[key]}")
    for data in datasets:
        task, named = get_field(data, "task"), get_field(data, "chat_template")
        if facts.files and task in CHAT_TASKS and not facts.chat_template and not named:
            problems.append(f"data.task: {task} needs a chat template and the tokenizer of {folder} has none "
                            "(tokenizer_config.json chat_template, chat_template.jinja); set data.chat_template: "
                            f"{' | '.join(CHAT_TEMPLATES)}, or use a folder that ships one")
        elif named and facts.chat_template:
            warnings.append(f"data.chat_template: {named} is not used: the tokenizer of {folder} has its own "
                            "chat template, which the job renders with")
        elif named and facts.tokens:
            missing = [m for m in dict.fromkeys(_MARKERS.findall(CHAT_TEMPLATES[named])) if m not in facts.tokens]
            if missing:
                warnings.append(f"data.chat_template: {named} writes {', '.join(missing)}, which the tokenizer of "
                                f"{folder} does not hold as tokens: each is split into pieces; use the template "
                                "of the model's family, or add them (tokenizer.add_special_tokens) and resize")
    if facts.files and facts.pad is None:
        if facts.eos is None:
            problems.append(f"model.source: the tokenizer of {folder} has neither a pad nor an eos token; add one "
                            "(tokenizer.add_special_tokens({'pad_token': ...})) and save the folder again")
        else:
            warnings.append(f"model.source: the tokenizer of {folder} has no pad token; the job uses eos "
                            f"({facts.eos}) as pad")
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))
    return warnings
