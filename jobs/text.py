"""Text on the cluster: the model's own tokenizer, and conversations rendered with its chat template.

Every text task of every kind tokenizes here (issue 15): the training stream, eval, retain, EWC
samples, the probe, generation eval and inference. The built-in byte-level tokenizer is the
vocabulary of the random-init catalogue models only; any other model brings its own.
"""

from __future__ import annotations

import os
from typing import Optional

from common import hfsource
from common.catalog import minilm_dir
from common.chat import CHAT_TEMPLATES, PLAIN_TEMPLATE
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
        tok = byte_tokenizer()
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
