"""Pieces every training method shares: tokenizer, model, strategy, data stream, checkpoints.

Each training method (jobs/finetune.py, ...) reads as one story and calls into these.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import traceback
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

# The tiny Llama every CPU test and the demo uses (random init from this config, never downloaded).
TINY_LLAMA = dict(
    vocab_size=259,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)
RANDOM_INIT_SOURCES = ("tiny-llama",)


@contextlib.contextmanager
def plain_errors():
    """Re-raise worker errors as RuntimeError carrying type and message.

    Some library exceptions cannot be unpickled on the driver (transformers' config validation
    errors need extra constructor arguments), which would replace the real cause with a
    TypeError. The full traceback stays in the worker's log.
    """
    try:
        yield
    except Exception as exc:
        traceback.print_exc()
        raise RuntimeError(f"{type(exc).__name__}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Tokenizer


_TOKENIZER = None


def tokenizer():
    """A byte-level tokenizer built locally: 3 specials + 256 bytes, no merges, no download."""
    global _TOKENIZER
    if _TOKENIZER is None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
        vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(alphabet)}}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        _TOKENIZER = PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
        )
    return _TOKENIZER


def tokenize_causal(batch: dict, column: str = "text", seq_len: int = 64) -> dict:
    """Ray Data `map_batches` function: text -> input_ids, attention_mask, labels (pad = -100)."""
    tok = tokenizer()
    texts = [f"{t}{tok.eos_token}" for t in batch[column]]
    enc = tok(texts, padding="max_length", truncation=True, max_length=seq_len, return_tensors="np")
    ids = enc["input_ids"].astype(np.int64)
    mask = enc["attention_mask"].astype(np.int64)
    return {"input_ids": ids, "attention_mask": mask, "labels": np.where(mask == 1, ids, -100)}


TENSOR_COLUMNS = ("input_ids", "attention_mask", "labels")


# ---------------------------------------------------------------------------------------------
# Model and strategy


def build_model(model_spec: dict, seed: int = 0):
    """The base model of a spec. Random-init sources are deterministic by seed."""
    source = model_spec["source"]
    if source == "tiny-llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(**{**TINY_LLAMA, **model_spec.get("config", {})})
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)
    if source.startswith("hf:"):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(source[3:], local_files_only=True)
    raise ValueError(f"model source {source!r} is not runnable by this job yet")


def apply_strategy(model, strategy: dict):
    """Make exactly the strategy's parameters trainable; returns the (possibly wrapped) model."""
    kind = strategy["type"]
    if kind == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=strategy["r"],
            lora_alpha=strategy["alpha"],
            lora_dropout=strategy["dropout"],
            target_modules=strategy["target_modules"],
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, config)
    raise ValueError(f"strategy {kind!r} is not runnable by this job yet")


def parameter_counts(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def digest(tensors: Iterator[torch.Tensor]) -> str:
    """A content hash of tensors, to prove frozen weights are bit-identical after training."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def frozen_and_trainable_digests(model) -> dict:
    named = list(model.named_parameters())
    return {
        "frozen": digest(p for _, p in named if not p.requires_grad),
        "trainable": digest(p for _, p in named if p.requires_grad),
    }


def unwrap(model):
    return model.module if hasattr(model, "module") else model


# ---------------------------------------------------------------------------------------------
# Evaluation


def eval_texts(path: Optional[str], column: str, limit: int) -> list[str]:
    if not path:
        return []
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=[column]).column(column).to_pylist()[:limit]


@torch.no_grad()
def causal_lm_loss(model, texts: list[str], seq_len: int, batch_size: int = 16) -> Optional[float]:
    """Mean token loss of a model over texts (no gradient, eval mode restored afterwards)."""
    if not texts:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(texts), batch_size):
        enc = tokenize_causal({"text": texts[i : i + batch_size]}, "text", seq_len)
        batch = {k: torch.from_numpy(v) for k, v in enc.items()}
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += float(model(**batch).loss) * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


PROBE_TEXT = ["count from 41: 41 42 43", "letters from c: c d e"]


@torch.no_grad()
def probe(model) -> dict:
    """Logits of the trained model on fixed inputs: a reloaded export must reproduce them."""
    was_training = model.training
    model.eval()
    enc = tokenize_causal({"text": PROBE_TEXT}, "text", 24)
    inputs = {k: torch.from_numpy(enc[k]) for k in ("input_ids", "attention_mask")}
    logits = model(**inputs).logits.detach().cpu()
    model.train(was_training)
    return {**inputs, "logits": logits}


# ---------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(model, optimizer, step: int, export: bool) -> str:
    """Write a checkpoint folder: trainable weights + optimizer + step (+ the exported model)."""
    path = tempfile.mkdtemp(prefix="ftl-ckpt-")
    inner = unwrap(model)
    trainable = {n: p.detach().cpu() for n, p in inner.named_parameters() if p.requires_grad}
    torch.save({"trainable": trainable, "optimizer": optimizer.state_dict(), "step": step},
               os.path.join(path, "state.pt"))
    if export:
        inner.save_pretrained(os.path.join(path, "export"))
    return path


def load_checkpoint(model, optimizer, checkpoint) -> int:
    """Restore trainable weights and optimizer from a Ray checkpoint; returns the step reached."""
    with checkpoint.as_directory() as path:
        state = torch.load(os.path.join(path, "state.pt"), weights_only=False)
    inner = unwrap(model)
    missing = set(state["trainable"]) - {n for n, _ in inner.named_parameters()}
    if missing:
        raise RuntimeError(f"checkpoint has parameters the model lacks: {sorted(missing)[:3]}")
    params = dict(inner.named_parameters())
    with torch.no_grad():
        for name, value in state["trainable"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"])


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
