"""Parameter tables by closed form, without torch: the planner's counts for the architectures it
knows (Llama, Mistral, Qwen2, BERT), from the config dict alone.

A table lists every parameter as transformers names it (`named_parameters()`, tied tensors once)
and every linear layer in module order, so the counts built from it are the meta-device counts
exactly (tests/unit/test_closed_form.py holds them equal for every shipped and made config). A
config this module does not know, or one with a setting it does not model, gives None: the
planner then builds the model on the meta device, as before.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from common import catalog, hfsource

# What a config.json that leaves a key out gets: its config class's default (the test holds these
# equal to transformers'). None: derived (key-value heads = attention heads, head_dim = h / heads).
_DECODER = {"vocab_size": 32000, "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": None, "head_dim": None, "tie_word_embeddings": False}
DEFAULTS = {
    "llama": {**_DECODER, "intermediate_size": 11008, "attention_bias": False, "mlp_bias": False},
    "mistral": {**_DECODER, "intermediate_size": 14336, "num_key_value_heads": 8},
    "qwen2": {**_DECODER, "vocab_size": 151936, "intermediate_size": 22016},
    "bert": {"vocab_size": 30522, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
             "num_attention_heads": 12, "max_position_embeddings": 512, "type_vocab_size": 2},
}


@dataclass
class Table:
    """`params`: [(name, numel)]; `linears`: [(name, d_in, d_out)] without the output heads;
    `modules`: each module's own parameter count (for the largest layer); `head`: the output
    layer's parameter names (a classifier's, which peft trains in full beside an adapter)."""
    params: list = field(default_factory=list)
    linears: list = field(default_factory=list)
    modules: list = field(default_factory=list)
    head: list = field(default_factory=list)

    def linear(self, name: str, d_in: int, d_out: int, bias: bool = False, head: bool = False) -> None:
        own = [(f"{name}.weight", d_in * d_out)] + ([(f"{name}.bias", d_out)] if bias else [])
        self.params += own
        self.modules.append(sum(n for _, n in own))
        if head:
            self.head += [n for n, _ in own]
        else:
            self.linears.append((name, d_in, d_out))

    def vector(self, name: str, size: int, bias: bool = False) -> None:
        """An embedding table (size = rows x width) or a norm (with its bias when it has one)."""
        own = [(f"{name}.weight", size)] + ([(f"{name}.bias", size)] if bias else [])
        self.params += own
        self.modules.append(sum(n for _, n in own))

    @property
    def total(self) -> int:
        return sum(n for _, n in self.params)


def config_dict(model: dict) -> Optional[dict]:
    """The model's config as the plain dict its config class is built from, overrides applied
    (what common.catalog.config_for builds), or None for a source with no such dict."""
    source = model.get("source", "tiny-llama")
    overrides = dict(model.get("config") or {})
    if source == "tiny-llama":
        return {"model_type": "llama", **catalog.TINY_LLAMA, "pad_token_id": 0, **overrides}
    if source == "llama-2-7b":
        return {"model_type": "llama", **catalog.LLAMA_2_7B, **overrides}
    if source == "minilm":
        path = catalog.minilm_config_path()
        base = json.loads(path.read_text()) if path else dict(catalog.MINILM)
        return {**base, "model_type": "bert", **overrides}
    if source.startswith("hf:"):
        try:
            folder = Path(hfsource.resolve(source[3:]))
            return {**json.loads((folder / "config.json").read_text()), **overrides}
        except (hfsource.NotInCache, OSError, ValueError):
            return None  # the meta path says what is wrong, in its own words
    return None


def table_for(config: dict, num_labels: Optional[int] = None) -> Optional[Table]:
    """The parameter table of the model the job builds from `config`: a causal LM (or, with
    `num_labels`, a sequence classifier) for decoders; BertModel (or BertForSequenceClassification)."""
    kind = config.get("model_type")
    if kind not in DEFAULTS:
        return None
    full = {**DEFAULTS[kind], **{k: v for k, v in config.items() if v is not None}}
    return _bert(full, num_labels) if kind == "bert" else _decoder(full, kind, num_labels)


def _decoder(c: dict, kind: str, num_labels: Optional[int]) -> Optional[Table]:
    if c.get("quantization_config"):  # a pre-quantized checkpoint: packed weights the meta path counts
        return None
    h, inter, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    heads = c["num_attention_heads"]
    kv = c["num_key_value_heads"] or heads
    head_dim = c["head_dim"] or h // heads
    # Qwen2: q, k and v with a bias, o without; Llama: all four by attention_bias; Mistral: none.
    qkv_bias = kind == "qwen2" or (kind == "llama" and bool(c["attention_bias"]))
    o_bias = kind == "llama" and bool(c["attention_bias"])
    mlp_bias = kind == "llama" and bool(c["mlp_bias"])
    tied = bool(c["tie_word_embeddings"])
    t = Table()
    t.vector("model.embed_tokens", c["vocab_size"] * h)
    for i in range(layers):
        p = f"model.layers.{i}"
        t.linear(f"{p}.self_attn.q_proj", h, heads * head_dim, qkv_bias)
        t.linear(f"{p}.self_attn.k_proj", h, kv * head_dim, qkv_bias)
        t.linear(f"{p}.self_attn.v_proj", h, kv * head_dim, qkv_bias)
        t.linear(f"{p}.self_attn.o_proj", heads * head_dim, h, o_bias)
        t.linear(f"{p}.mlp.gate_proj", h, inter, mlp_bias)
        t.linear(f"{p}.mlp.up_proj", h, inter, mlp_bias)
        t.linear(f"{p}.mlp.down_proj", inter, h, mlp_bias)
        t.vector(f"{p}.input_layernorm", h)
        t.vector(f"{p}.post_attention_layernorm", h)
    t.vector("model.norm", h)
    if num_labels:
        t.linear("score", h, num_labels, head=True)
    elif not tied:  # a tied head is the embedding table: counted once, as named_parameters does
        t.linear("lm_head", h, c["vocab_size"], head=True)
    return t


def _bert(c: dict, num_labels: Optional[int]) -> Optional[Table]:
    h, inter = c["hidden_size"], c["intermediate_size"]
    pre = "bert." if num_labels else ""
    t = Table()
    t.vector(f"{pre}embeddings.word_embeddings", c["vocab_size"] * h)
    t.vector(f"{pre}embeddings.position_embeddings", c["max_position_embeddings"] * h)
    t.vector(f"{pre}embeddings.token_type_embeddings", c["type_vocab_size"] * h)
    t.vector(f"{pre}embeddings.LayerNorm", h, bias=True)
    for i in range(c["num_hidden_layers"]):
        p = f"{pre}encoder.layer.{i}"
        for name in ("query", "key", "value"):
            t.linear(f"{p}.attention.self.{name}", h, h, bias=True)
        t.linear(f"{p}.attention.output.dense", h, h, bias=True)
        t.vector(f"{p}.attention.output.LayerNorm", h, bias=True)
        t.linear(f"{p}.intermediate.dense", h, inter, bias=True)
        t.linear(f"{p}.output.dense", inter, h, bias=True)
        t.vector(f"{p}.output.LayerNorm", h, bias=True)
    t.linear(f"{pre}pooler.dense", h, h, bias=True)
    if num_labels:
        t.linear("classifier", h, num_labels, bias=True, head=True)
    return t
