"""`qlora`: LoRA on a base whose linear layers are quantized to 4 bits by bitsandbytes (NF4,
double quantization); norms and the head stay in full precision."""

from __future__ import annotations

import os
import tempfile
from typing import Literal

from pydantic import Field

from launcher.strategies import Strategy, register_strategy
from launcher.strategies.lora import LoraStrategy, lora_config


class QloraStrategy(LoraStrategy):
    type: Literal["qlora"]
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = Field(True, description="quantize the quantization constants too")
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype of the 4-bit matmuls (bfloat16 on a GPU)"
    )


def bnb_config(spec):
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=spec.quant_type,
        bnb_4bit_use_double_quant=spec.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, spec.compute_dtype),
    )


def load_quantized(model, spec):
    """Quantize an in-memory model the way from_pretrained does: save it, load it in 4 bits."""
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = (AutoModelForSequenceClassification if type(model).__name__.endswith("ForSequenceClassification")
            else AutoModelForCausalLM)
    with tempfile.TemporaryDirectory(prefix="ftl-qbase-") as folder:
        # Not save_pretrained: under torch.distributed it writes on rank 0 only, and every rank
        # quantizes its own copy.
        model.config.save_pretrained(folder)
        save_model(model, os.path.join(folder, "model.safetensors"))
        return auto.from_pretrained(folder, quantization_config=bnb_config(spec),
                                    device_map="cpu" if not torch.cuda.is_available() else None)


def quantize_base(model, spec):
    """The 4-bit base LoRA wraps, prepared for training (norms and head in fp32)."""
    from peft import prepare_model_for_kbit_training

    quantized = load_quantized(model, spec)
    # Checkpointing is a memory choice, not QLoRA's: it stays off here.
    quantized = prepare_model_for_kbit_training(quantized, use_gradient_checkpointing=False)
    quantized.train()  # from_pretrained returns eval mode (DESIGN: call train() after loading)
    return quantized


register_strategy(Strategy(
    name="qlora", spec=QloraStrategy, family="adapter",
    summary="LoRA on a 4-bit NF4 base (bitsandbytes, double quantization)",
    peft_config=lora_config, prepare_base=quantize_base,
))
