"""`ftlaunch model make FAMILY --out DIR`: a small random-init model folder in exactly the layout
`save_pretrained` gives a downloaded model (config.json, model.safetensors, generation_config.json,
tokenizer.json, tokenizer_config.json, chat_template.jinja), with a BPE tokenizer trained here on
the project's synthetic text and the family's own chat template and special tokens.

It stands in for a user's own model (nothing can be downloaded on these machines): jobs load it
through the same `hf:<folder>` path as any downloaded checkpoint. torch, transformers and
tokenizers are imported inside the functions: the client stays light.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from common.chat import CHATML, LLAMA3, MISTRAL
from launcher.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Family:
    config_class: str  # transformers class name
    bos: str
    eos: str
    pad: str
    specials: tuple  # the family's chat-format tokens, kept whole by the tokenizer
    chat_template: str  # Jinja, as the family ships it (trimmed to what these models need)
    extra: dict = dataclasses.field(default_factory=dict)  # config fields of the family
    # The family's own pre-tokenizer split, as its published tokenizer.json holds it (Qwen2: digits
    # one by one, NFC-normalised). transformers' Qwen2Tokenizer rebuilds this pipeline whatever the
    # file says; writing it into the file too keeps the `tokenizers` library (the plan) in agreement.
    split: Optional[str] = None



FAMILIES = {
    "qwen2": Family("Qwen2Config", bos="<|endoftext|>", eos="<|im_end|>", pad="<|endoftext|>",
                    specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"), chat_template=CHATML,
                    extra={"tie_word_embeddings": True},
                    split=r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                          r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""),
    "llama": Family("LlamaConfig", bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|finetune_pad|>",
                    specials=("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                              "<|end_header_id|>", "<|eot_id|>", "<|finetune_pad|>"),
                    chat_template=LLAMA3),
    "mistral": Family("MistralConfig", bos="<s>", eos="</s>", pad="<pad>",
                      specials=("<s>", "</s>", "<pad>", "[INST]", "[/INST]"), chat_template=MISTRAL),
}
# Sizes: `tiny` for CPU tests and the demo, `1b` (~1.1B parameters, Llama-3.2-1B's shape) for GPU
# benchmarks. vocab_size is the trained tokenizer's, rounded up to a multiple of 64.
SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512),
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, max_position_embeddings=1024),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, max_position_embeddings=4096),
}


def corpus(rows: int = 3000, seed: int = 0) -> list[str]:
    """Text the tokenizer is trained on: the project's synthetic tasks, so their words are tokens."""
    from launcher import synthetic

    texts = []
    for name in ("counting", "alphabet", "classification"):
        texts += [str(t) for t in synthetic.GENERATORS[name](rows, seed).column("text").to_pylist()]
    table = synthetic.GENERATORS["instruction"](rows, seed)
    texts += [f"{i} {r}" for i, r in zip(table.column("instruction").to_pylist(), table.column("response").to_pylist())]
    # Conversations too, as a published tokenizer has seen them: their everyday words are tokens.
    for chat in synthetic.GENERATORS["chat"](rows // 3, seed).column("messages").to_pylist():
        texts += [turn["content"] for turn in chat]
    return texts


def train_tokenizer(family: Family, vocab_size: int = 1024, seed: int = 0):
    """A byte-level BPE tokenizer trained here, with the family's special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if family.split:
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(family.split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(family.specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(seed=seed), trainer=trainer)
    return tok


def make_model(family_name: str, out: str | Path, *, size: str = "tiny", vocab_size: int = 1024,
               seed: int = 0, config: Optional[dict] = None) -> Path:
    """Write the folder; returns its path. The weights are random (seeded), the layout real."""
    if family_name not in FAMILIES:
        raise ConfigError(f"model family {family_name!r} is unknown; use one of: {', '.join(FAMILIES)}")
    if size not in SIZES:
        raise ConfigError(f"--size {size!r} is unknown; use one of: {', '.join(SIZES)}")
    from launcher.planner.counts import require_torch

    torch, transformers = require_torch()
    from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    family = FAMILIES[family_name]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    raw = train_tokenizer(family, vocab_size, seed)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=family.bos, eos_token=family.eos,
                                        pad_token=family.pad, model_max_length=SIZES[size]["max_position_embeddings"])
    tokenizer.chat_template = family.chat_template
    vocab = -(-len(tokenizer) // 64) * 64  # embedding rows rounded up, as published models do
    ids = {k: tokenizer.convert_tokens_to_ids(getattr(family, k)) for k in ("bos", "eos", "pad")}
    cfg = getattr(transformers, family.config_class)(
        **{**SIZES[size], **family.extra, **(config or {})}, vocab_size=vocab,
        bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.generation_config = GenerationConfig(bos_token_id=ids["bos"], eos_token_id=ids["eos"],
                                               pad_token_id=ids["pad"])
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
