"""The ARR-COC vision-language model, in both sizes from one code path (configs in
common/catalog.py ARRCOC_CONFIGS): a frozen ViT, the texture adapter, an LLM with LoRA.

The texture adapter scores each vision token's patch three ways (channel entropy, edge salience,
a learned 1x1-conv match against the question), balances the scores with a small MLP and keeps
the top-K tokens. Top-K indices carry no gradient, so kept tokens are scaled by the sigmoid of
their score: the loss reaches the scorer through that scale (the public ARR-COC code drops it).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.catalog import TEXTURE_CHANNELS, arrcoc_config, arrcoc_llm_config
from common.vqa import VQA_COLOURS, VQA_PLACES, VQA_SHAPES
from jobs.components import tokenizer
from jobs.data.texture import _as_images, texture_array
from launcher.kinds.pipeline import StageSpec

# The closed answer vocabulary of the synthetic VQA set; accuracy is the argmax over it.
ANSWERS = (*VQA_COLOURS, *VQA_SHAPES, *VQA_PLACES, "yes", "no")
GROUPS = ("vision", "texture", "llm", "lora")
# Rough range of each texture channel (RGB, L*, a*, Sobel x/y/mag, y, x, centre, saliency, Y).
_TEXTURE_SCALE = (1, 1, 1, 100, 100, 4, 4, 4, 1, 1, 1, 1, 1)
_APPEARANCE = [0, 1, 2, 3, 4, 5, 6, 7, 11, 12]  # channels that describe content, not position


def group_of(name: str) -> str:
    """The parameter group of a parameter name of ArrCoc."""
    if name.startswith("vision."):
        return "vision"
    if name.startswith("texture."):
        return "texture"
    return "lora" if "lora_" in name else "llm"


# ---------------------------------------------------------------------------------------------
# Vision tower: a ViT in Qwen2-VL's shape (patch embed, pre-LN blocks, an MLP patch merger)


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc1, self.fc2 = nn.Linear(width, width * mlp_ratio), nn.Linear(width * mlp_ratio, width)

    def forward(self, x):
        b, n, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, w))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class VisionTower(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        v, self.cfg = cfg["vision"], cfg
        w, m = v["width"], cfg["merge"]
        self.patch_embed = nn.Linear(3 * cfg["temporal_patch"] * cfg["patch_size"] ** 2, w, bias=False)
        self.blocks = nn.ModuleList(Block(w, v["heads"], v["mlp_ratio"]) for _ in range(v["depth"]))
        self.merge_norm = nn.LayerNorm(w)
        self.merge_fc1 = nn.Linear(w * m * m, w * m * m)
        self.merge_fc2 = nn.Linear(w * m * m, cfg["llm"]["hidden_size"])

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> (B, grid*grid, d_llm) tokens in row-major grid order."""
        cfg, p, m = self.cfg, self.cfg["patch_size"], self.cfg["merge"]
        x = image.to(self.patch_embed.weight.dtype) / 127.5 - 1.0
        b, h, w, _ = x.shape
        x = x.view(b, h // p, p, w // p, p, 3).permute(0, 1, 3, 5, 2, 4).reshape(b, (h // p) * (w // p), -1)
        x = x.repeat(1, 1, cfg["temporal_patch"])  # a still image is its own second frame
        x = self.patch_embed(x)
        for block in self.blocks:
            x = block(x)
        g = cfg["grid"]
        x = self.merge_norm(x).view(b, g, m, g, m, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, g * g, -1)
        return self.merge_fc2(F.gelu(self.merge_fc1(x)))


# ---------------------------------------------------------------------------------------------
# Texture adapter


class TextureAdapter(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        d, q, hb = cfg["llm"]["hidden_size"], cfg["query_dim"], cfg["balancer_hidden"]
        self.proj = nn.Linear(TEXTURE_CHANNELS, d)  # texture features added to each vision token
        self.query = nn.Linear(d, q)  # question embedding -> query
        self.key = nn.Conv2d(TEXTURE_CHANNELS, q, kernel_size=1)  # the learned 1x1-conv match
        self.balancer = nn.Sequential(nn.Linear(3, hb), nn.GELU(), nn.Linear(hb, 1))
        self.register_buffer("scale", torch.tensor(_TEXTURE_SCALE, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)

    def scores(self, texture: torch.Tensor, question: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(B, 13, g, g) texture, (B, d) question -> (B, g*g) balanced scores and the three parts."""
        t = texture / self.scale
        flat = t.flatten(2)  # (B, 13, P)
        # Channel entropy: how evenly a patch's deviation from the image mean spreads over the
        # appearance channels (a patch that differs in many ways carries more information).
        dev = (flat[:, _APPEARANCE] - flat[:, _APPEARANCE].mean(-1, keepdim=True)).abs() + 1e-6
        p = dev / dev.sum(1, keepdim=True)
        entropy = -(p * p.log()).sum(1) * dev.sum(1).clamp(max=10).div(10)
        # Edge salience: Sobel magnitude and colour saliency.
        salience = flat[:, 7] + flat[:, 11]
        match = (self.key(t).flatten(2) * self.query(question).unsqueeze(-1)).sum(1) / math.sqrt(self.key.out_channels)
        parts = torch.stack([entropy, salience, match], -1)  # (B, P, 3)
        z = (parts - parts.mean(1, keepdim=True)) / (parts.std(1, keepdim=True) + 1e-5)
        return self.balancer(z).squeeze(-1), {"entropy": entropy, "salience": salience, "match": match}


# ---------------------------------------------------------------------------------------------
# The model


class ArrCoc(nn.Module):
    def __init__(self, cfg: dict, lora: dict | None = None):
        super().__init__()
        from transformers import AutoModelForCausalLM

        self.cfg = cfg
        self.vision = VisionTower(cfg)
        self.texture = TextureAdapter(cfg)
        self.llm = AutoModelForCausalLM.from_config(arrcoc_llm_config(cfg))
        if lora:
            # Injected in place: the LLM's names stay put, so checkpoints carry across stages.
            # Before the stage that trains it, LoRA's B is zero: the LLM computes as without it.
            from peft import LoraConfig, inject_adapter_in_model

            inject_adapter_in_model(LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                               target_modules=lora["target_modules"]), self.llm)

    def prefix(self, image, texture, q_ids, q_mask):
        """Kept vision tokens (scaled by sigmoid(score)) followed by the question's embeddings."""
        embed = self.llm.get_input_embeddings()
        q_emb = embed(q_ids)
        question = (q_emb * q_mask.unsqueeze(-1)).sum(1) / q_mask.sum(1, keepdim=True).clamp(min=1)
        with torch.set_grad_enabled(torch.is_grad_enabled() and any(p.requires_grad for p in self.vision.parameters())):
            vis = self.vision(image)
        tokens = vis + self.texture.proj((texture / self.texture.scale).flatten(2).transpose(1, 2))
        scores, _ = self.texture.scores(texture, question)
        idx = self.keep(scores).sort(dim=1).values  # keep grid order
        kept = tokens.gather(1, idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        kept = kept * torch.sigmoid(scores.gather(1, idx)).unsqueeze(-1)  # the scorer's gradient path
        mask = torch.cat([torch.ones_like(idx), q_mask], 1)
        return torch.cat([kept, q_emb], 1), mask

    def keep(self, scores: torch.Tensor) -> torch.Tensor:
        """(B, P) scores -> (B, top_k) indices of the kept tokens: the top-scored ones, or, for
        the control `selection: random`, K patches drawn at random (a fixed draw when scoring,
        so every evaluation of the control sees the same patches)."""
        k = self.cfg["top_k"]
        if self.cfg.get("selection", "texture") == "texture":
            return scores.topk(k, dim=1).indices
        draw = None if self.training else torch.Generator(device=scores.device).manual_seed(0)
        return torch.rand(scores.shape, generator=draw, device=scores.device).topk(k, dim=1).indices

    def forward(self, image, texture, q_ids, q_mask, a_ids, a_mask, **_):
        """Mean cross-entropy of the answer tokens given image and question."""
        prefix, mask = self.prefix(image, texture, q_ids, q_mask)
        embeds = torch.cat([prefix, self.llm.get_input_embeddings()(a_ids)], 1)
        labels = torch.cat([torch.full(mask.shape, -100, dtype=torch.long, device=a_ids.device),
                            a_ids.masked_fill(a_mask == 0, -100)], 1)
        return self.llm(inputs_embeds=embeds, attention_mask=torch.cat([mask, a_mask], 1), labels=labels).loss

    @torch.no_grad()
    def answer_logprobs(self, image, texture, q_ids, q_mask) -> torch.Tensor:
        """(B, len(ANSWERS)) summed log-probability of each candidate answer (with its </s>)."""
        prefix, mask = self.prefix(image, texture, q_ids, q_mask)
        cand = answer_tokens(self.cfg["answer_len"])
        a_ids, a_mask = (torch.from_numpy(x).to(q_ids.device) for x in cand)
        b, n = prefix.shape[0], a_ids.shape[0]
        embeds = torch.cat([prefix.repeat_interleave(n, 0),
                            self.llm.get_input_embeddings()(a_ids).repeat(b, 1, 1)], 1)
        full_mask = torch.cat([mask.repeat_interleave(n, 0), a_mask.repeat(b, 1)], 1)
        logits = self.llm(inputs_embeds=embeds, attention_mask=full_mask).logits
        lp = logits[:, prefix.shape[1] - 1 : -1].float().log_softmax(-1)
        ids, m = a_ids.repeat(b, 1), a_mask.repeat(b, 1)
        picked = lp.gather(-1, ids.unsqueeze(-1)).squeeze(-1) * m
        return picked.sum(-1).view(b, n)


def build(model_spec: dict, lora: dict | None = None, seed: int = 0) -> ArrCoc:
    """The model of a spec's model block; random init, deterministic by seed."""
    torch.manual_seed(seed)
    return ArrCoc(arrcoc_config(model_spec), lora)


def pipeline_lora(stages: list) -> dict | None:
    """The LoRA of a pipeline (the first stage that declares one), as `ArrCoc` takes it; every
    stage's model carries it. `stages`: the spec's (typed, or their dicts)."""
    stages = [StageSpec.model_validate(s) for s in stages]
    return next((s.strategy.model_dump() for s in stages if s.strategy), None)


def set_trainable(model: ArrCoc, groups) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(group_of(name) in groups)


def optimizer_for(model: ArrCoc, lr_groups: dict, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """AdamW with one parameter group (and learning rate) per trained group."""
    params = {g: [] for g in lr_groups}
    for name, p in model.named_parameters():
        if p.requires_grad:
            params[group_of(name)].append(p)
    return torch.optim.AdamW([{"params": ps, "lr": lr_groups[g], "name": g} for g, ps in params.items()],
                             weight_decay=weight_decay)


def group_digests(model: ArrCoc) -> dict:
    """A content hash per parameter group: proves which groups a stage changed, bit for bit."""
    from jobs.components import digest

    named = list(model.named_parameters())
    present = {group_of(n) for n, _ in named}
    return {g: digest(p for n, p in named if group_of(n) == g) for g in GROUPS if g in present}


def carried_state(model: ArrCoc, groups) -> dict:
    """The parameters a stage hands on: every group that any stage trains (the rest is the seed's)."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if group_of(n) in groups}


def load_state(model: ArrCoc, state: dict) -> None:
    params = dict(model.named_parameters())
    missing = set(state) - set(params)
    if missing:
        raise RuntimeError(f"checkpoint has parameters the model lacks: {sorted(missing)[:3]}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


# ---------------------------------------------------------------------------------------------
# Data: the streaming transform (texture + tokens) and accuracy


def answer_tokens(answer_len: int, answers=ANSWERS) -> tuple[np.ndarray, np.ndarray]:
    tok = tokenizer()
    enc = tok([f"{a}{tok.eos_token}" for a in answers], padding="max_length", truncation=True,
              max_length=answer_len, return_tensors="np")
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


def vqa_batch(batch: dict, grid: int, q_len: int, answer_len: int) -> dict:
    """Ray Data `map_batches` function: image, question, answer -> the model's tensor columns
    (image, 13-channel texture on the token grid, left-padded question, right-padded answer)."""
    images = _as_images(batch["image"])
    tok = tokenizer()
    tok.padding_side = "left"
    q = tok(list(batch["question"]), padding="max_length", truncation=True, max_length=q_len, return_tensors="np")
    tok.padding_side = "right"
    answers = [str(a) for a in batch["answer"]]
    a_ids, a_mask = answer_tokens(answer_len, answers)
    index = {a: i for i, a in enumerate(ANSWERS)}
    return {
        "image": images,
        "texture": texture_array(images, grid),
        "q_ids": q["input_ids"].astype(np.int64),
        "q_mask": q["attention_mask"].astype(np.int64),
        "a_ids": a_ids,
        "a_mask": a_mask,
        "answer_index": np.array([index.get(a, -1) for a in answers], dtype=np.int64),
    }


TENSOR_COLUMNS = ("image", "texture", "q_ids", "q_mask", "a_ids", "a_mask", "answer_index")


def load_eval(path: str | None, cfg: dict, q_len: int, rows: int) -> dict | None:
    """The first `rows` of an eval split, transformed exactly as the training stream is."""
    if not path or rows <= 0:
        return None
    import pyarrow.parquet as pq

    table = pq.read_table(path).slice(0, rows)
    image = table.column("image").combine_chunks()
    images = (image.to_numpy_ndarray() if hasattr(image, "to_numpy_ndarray")
              else _as_images(image.to_numpy(zero_copy_only=False)))
    batch = {"image": images, "question": table.column("question").to_pylist(),
             "answer": table.column("answer").to_pylist()}
    tensors = vqa_batch(batch, cfg["grid"], q_len, cfg["answer_len"])
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}


@torch.no_grad()
def accuracy(model: ArrCoc, data: dict | None, batch_size: int = 32, selection: str | None = None) -> float | None:
    """Share of rows whose highest-likelihood answer in ANSWERS is the true one; `selection`
    scores the same weights with another token selection (`random`: the control)."""
    if data is None:
        return None
    if selection and selection != model.cfg.get("selection", "texture"):
        own = model.cfg
        model.cfg = {**own, "selection": selection}
        try:
            return accuracy(model, data, batch_size)
        finally:
            model.cfg = own
    was_training = model.training
    model.eval()
    right, n = 0, len(data["answer_index"])
    for i in range(0, n, batch_size):
        part = {k: v[i : i + batch_size] for k, v in data.items()}
        pred = model.answer_logprobs(part["image"], part["texture"], part["q_ids"], part["q_mask"]).argmax(-1)
        right += int((pred == part["answer_index"]).sum())
    model.train(was_training)
    return right / max(n, 1)


def train_step(model: ArrCoc, optimizer, batch: dict, grad_clip: float | None) -> float:
    loss = model(**batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    optimizer.step()
    return float(loss.detach())
