"""The ARR-COC pipeline (kind: pipeline) planned stage by stage: parameters per group (vision,
texture, llm, lora), and each stage's memory, fit and time (each stage runs alone)."""

from __future__ import annotations

import math
from typing import Optional

from cluster import profiles as cluster_profiles
from common.catalog import TEXTURE_CHANNELS, arrcoc_config, arrcoc_llm_config
from launcher.planner.counts import dims_of, json_cached, linear_layers, lora_closed_form, require_torch
from launcher.planner.fit import STAGE_LEVERS, fit
from launcher.planner.memory import GIB, memory_per_gpu
from launcher.planner.timing import time_estimate


def arrcoc_vision_params(cfg: dict) -> int:
    """Closed form of the ViT's parameters (tests check it against the built module)."""
    v, d_llm = cfg["vision"], cfg["llm"]["hidden_size"]
    w, hidden, m2 = v["width"], v["width"] * v["mlp_ratio"], cfg["merge"] ** 2
    patch = 3 * cfg["temporal_patch"] * cfg["patch_size"] ** 2 * w
    block = 2 * 2 * w + (w * 3 * w + 3 * w) + (w * w + w) + (w * hidden + hidden) + (hidden * w + w)
    merger = 2 * w + (w * m2 * w * m2 + w * m2) + (w * m2 * d_llm + d_llm)
    return patch + v["depth"] * block + merger


def arrcoc_texture_params(cfg: dict) -> int:
    """Texture adapter: projection (13 -> LLM), query (LLM -> q), 1x1-conv key (13 -> q), balancer."""
    c, d, q, hb = TEXTURE_CHANNELS, cfg["llm"]["hidden_size"], cfg["query_dim"], cfg["balancer_hidden"]
    return (c * d + d) + (d * q + q) + (c * q + q) + (3 * hb + hb) + (hb + 1)


@json_cached(maxsize=8)
def arrcoc_counts(model: dict, lora: Optional[dict]) -> dict:
    """Parameters per group (vision, texture, llm, lora) of an ARR-COC model; the LLM and its
    LoRA are counted on the meta device, the vision tower and adapter by closed form."""
    torch, transformers = require_torch()
    cfg = arrcoc_config(model)
    config = arrcoc_llm_config(cfg)
    with torch.device("meta"):
        net = transformers.AutoModelForCausalLM.from_config(config)
    llm = sum(p.numel() for p in net.parameters())
    lora_params = 0
    if lora:
        lora_params = lora_closed_form(linear_layers(net), lora.get("r", 8),
                                       lora.get("target_modules", "all-linear"))
    groups = {"vision": arrcoc_vision_params(cfg), "texture": arrcoc_texture_params(cfg), "llm": llm,
              "lora": lora_params}
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in net.modules())
    return {"groups": groups, "config": cfg, "largest_layer": int(largest),
            "dims": dims_of(config, causal_lm=True)}


def estimate_pipeline(spec: dict, profile_name: Optional[str] = None) -> dict:
    """Per-stage parameters, memory, fit and time of a pipeline spec (each stage runs alone)."""
    model, stages = spec["model"], spec["stages"]
    lora = next((s["strategy"] for s in stages if s.get("strategy")), None)
    counted = arrcoc_counts(model, lora)
    groups, cfg = counted["groups"], counted["config"]
    total = sum(groups.values())
    out = []
    for stage in stages:
        res = stage["resources"]
        resources = {k: res[k] for k in ("workers", "cpus_per_worker", "gpus_per_worker")}
        on_gpu = resources["gpus_per_worker"] > 0
        profile = cluster_profiles.get_profile(profile_name or ("local-cpu" if not on_gpu else "a100-40g-1"))
        trainable = sum(groups[g] for g in stage["train"])
        counts = {"trainable": trainable, "frozen": total - trainable, "total": total, "base_total": total,
                  "largest_layer": counted["largest_layer"], "quantizable": 0, "dims": counted["dims"]}
        # The LLM reads the kept vision tokens, the question and the answer.
        seq = cfg["top_k"] + model.get("seq_len", 64) + cfg["answer_len"]
        memory = memory_per_gpu(counts, None, "lora", workers=resources["workers"],
                                micro_batch=stage["micro_batch"], seq_len=seq,
                                precision="bf16" if on_gpu else "fp32")
        # The frozen vision tower runs without gradient: only one block's activations are live,
        # and they are freed before the LLM's forward starts; the peak is the larger of the two.
        v, s_v = cfg["vision"], (cfg["grid"] * cfg["merge"]) ** 2
        vision_act = stage["micro_batch"] * s_v * v["width"] * (34 + 5 * v["heads"] * s_v / v["width"])
        vision_act *= 1 if on_gpu else 2
        llm_act = memory["activations"]
        memory["vision_activations"] = int(vision_act)
        memory["activations"] = int(max(llm_act, vision_act))
        memory["total"] = int(memory["model_states"] + memory["activations"])
        memory["assumptions"].append(
            f"frozen vision tower over {s_v} patches without gradient: one block's activations "
            f"({vision_act / GIB:.2f} GiB) live at a time, before the LLM's; the peak takes the larger")
        tokens = stage["steps"] * stage["micro_batch"] * resources["workers"] * seq
        per_worker = resources["gpus_per_worker"] or resources["cpus_per_worker"]
        devices = max(1, math.ceil(resources["workers"] * per_worker))
        timing = None if on_gpu and not profile["gpus"] else time_estimate(
            counts, tokens, profile, "lora", devices=devices)
        out.append({
            "stage": stage["name"],
            "model": model["source"],
            "strategy": "+".join(stage["train"]),
            "profile": profile["name"],
            "resources": resources,
            "parameters": {"total": total, "trainable": trainable, "frozen": total - trainable,
                           "percent_trainable": round(100.0 * trainable / total, 4), "groups": groups,
                           "train": list(stage["train"])},
            "memory": {k: v for k, v in memory.items() if k != "inputs"},
            "memory_settings": {k: v for k, v in memory["inputs"].items() if k != "counts"},
            "fit": fit(memory, profile, resources, STAGE_LEVERS),
            "time": timing,
        })
    worst = max(out, key=lambda e: e["memory"]["total"])
    verdicts = [e["fit"]["verdict"] for e in out]
    bad = next((e for e in out if e["fit"]["verdict"] != "fits"), None)
    return {
        "kind": "pipeline",
        "model": model["source"],
        "profile": worst["profile"],
        "stages": out,
        # The pipeline fits when every stage fits; its figures are its largest stage's.
        "fit": {"verdict": bad["fit"]["verdict"] if bad else "fits",
                "reason": f"stage {bad['stage']}: {bad['fit']['reason']}" if bad else None,
                "suggestions": bad["fit"]["suggestions"] if bad else [], "stages": verdicts},
        "peak_per_device_bytes": worst["memory"]["total"],
    }
