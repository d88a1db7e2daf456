"""Inference on a run's artifacts: greedy generation (the one implementation: `ftlaunch infer`,
the Python API and the jobs' generation eval all call `greedy`), a finetune run's (or compare
variant's) trained model (`RunModel`), a multitask run's adapters swapped on one base
(`AdapterSet`: the base loaded once, every registered adapter attached to it), and a joint
multitask run's backbone with every task's head (`JointModel`; `joint_logits` is the one forward
the job trains with and the loader reproduces).

torch, transformers and peft are imported inside the functions: `import launcher` stays light.

    adapters = AdapterSet("runs/<run_id>")
    adapters.generate(["count from 41:"], task="counting")
    adapters.logits(texts, tasks=["counting", "alphabet"])   # one mixed batch, one adapter per row
    joint = JointModel("runs/<run_id>")                       # mode: joint: backbone + heads
    joint.predict(["the team scored a goal"], task="topic")
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Optional, Sequence, Union

from common.chat import CHAT_TEMPLATES, PLAIN_TEMPLATE, instruction_messages
from common.runfolder import JOINT_EXPORT, MANIFEST, REGISTRY, run_path
from launcher.errors import LauncherError
from launcher.planner.counts import require_torch
from launcher.registry import load_registry

TEMPLATED_TASKS = ("instruction", "chat")  # tasks whose prompts go through the chat template
_MARK = "\x00FTL-END-OF-ANSWER\x00"


# ---------------------------------------------------------------------------------------------
# Greedy generation: one implementation for infer, the Python API and the jobs' generation eval


def end_of_turn(tok) -> Optional[str]:
    """The text the chat template puts right after an assistant turn (`<|im_end|>`, `<|eot_id|>`,
    the eos token): rendered from a probe conversation, whitespace stripped; None without one."""
    if not getattr(tok, "chat_template", None):
        return None
    text = tok.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": _MARK}],
                                   tokenize=False)
    suffix = text[text.rindex(_MARK) + len(_MARK):].strip() if _MARK in text else ""
    return suffix.split()[0] if suffix else None


def stop_token_ids(tok) -> list[int]:
    """Generation stops at the eos token and at the template's end-of-turn token, when that is one
    token of the vocabulary's specials (a Qwen2 tokenizer's eos is `<|endoftext|>`, its chats end
    in `<|im_end|>`)."""
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    marker = end_of_turn(tok)
    if marker:
        specials = set(tok.all_special_ids) | set(getattr(tok, "added_tokens_decoder", {}) or {})
        first = tok(marker, add_special_tokens=False)["input_ids"][:1]
        if first and first[0] in specials:
            ids.add(first[0])
    return sorted(ids)


def greedy(model, tok, prompts: Sequence[str], max_new_tokens: int, *, add_special_tokens: bool = False,
           batch_size: int = 16) -> list[str]:
    """Greedy completions of `prompts` (text as the model sees it), batched with left padding;
    each stops at a stop token (`stop_token_ids`) and is cut at the end-of-turn text. Works on a
    plain or peft-wrapped causal LM (unwrap DDP first). Eval mode while it runs."""
    import torch
    from transformers import GenerationConfig

    stop, marker = stop_token_ids(tok), end_of_turn(tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (stop[0] if stop else 0)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              eos_token_id=stop or None, pad_token_id=pad)
    device = next(model.parameters()).device
    was_training, out = model.training, []
    model.eval()
    try:
        for i in range(0, len(prompts), batch_size):
            encoded = [tok(p, add_special_tokens=add_special_tokens)["input_ids"] or [pad]
                       for p in prompts[i:i + batch_size]]
            width = max(len(e) for e in encoded)
            ids = torch.full((len(encoded), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, e in enumerate(encoded):  # left padding: every prompt ends where generation starts
                ids[row, width - len(e):] = torch.tensor(e, dtype=torch.long)
                mask[row, width - len(e):] = 1
            with torch.no_grad():
                generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                           generation_config=config)
            for row in generated[:, width:].tolist():
                cut = next((j for j, t in enumerate(row) if t in stop), len(row))
                text = tok.decode(row[:cut], skip_special_tokens=True)
                out.append(text.split(marker)[0] if marker else text)
    finally:
        model.train(was_training)
    return out


def with_template(tok, data: dict):
    """The tokenizer ready for a task's prompts: its own chat template, else the one the spec's
    `data.chat_template` names, else the plain template for an instruction task (the rule the
    jobs apply when they render: jobs/text.py)."""
    if not getattr(tok, "chat_template", None):
        if data.get("chat_template"):
            tok.chat_template = CHAT_TEMPLATES[data["chat_template"]]
        elif data.get("task") == "instruction":
            tok.chat_template = PLAIN_TEMPLATE
    return tok


def prompt_text(tok, text: str, task: str, system: Optional[str] = None) -> str:
    """What the model is given for an input: for instruction and chat runs the input as the user
    turn (an instruction run's instruction) rendered with the chat template and the assistant's
    generation prompt; for other text tasks the input itself."""
    if task not in TEMPLATED_TASKS:
        return text
    messages = instruction_messages({"instruction": text, "system": system})
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# ---------------------------------------------------------------------------------------------
# A finetune run's (or a compare variant's) trained model


def open_run(run: Union[str, Path], storage: Union[str, Path] = "./runs", variant: Optional[str] = None,
             task: Optional[str] = None, device: str = "cpu"):
    """The inference object of any run folder: an AdapterSet for a multitask run (its registry),
    a JointModel for a joint multitask run, a RunModel for a finetune run or one variant of a
    compare run."""
    folder = run_path(run, storage)
    if (folder / JOINT_EXPORT).is_dir():
        return JointModel(folder, device=device)
    if (folder / REGISTRY).is_file():
        return AdapterSet(folder, tasks=[task] if task else None, device=device)
    return RunModel(folder, variant=variant, device=device)


def _stage_of(run_dir: Path, spec, stage: Optional[str]) -> tuple[dict, Path]:
    """A finetune pipeline's stage as the finetune spec it ran (on the model the chain gave it)
    and its folder; the last stage unless one is named."""
    from launcher import stages as chain
    from launcher.kinds.pipeline import is_arrcoc

    if is_arrcoc(spec):
        raise LauncherError(f"run {run_dir.name} is an ARR-COC pipeline (VQA over a closed answer set); infer "
                            "answers text-generation runs only")
    raw = spec.model_dump(mode="json")
    names = [s["name"] for s in raw["stages"]]
    stage = stage or names[-1]
    if stage not in names:
        hint = difflib.get_close_matches(stage, names, n=1)
        fix = f"did you mean {hint[0]!r}?" if hint else f"use one of: {', '.join(names)}"
        raise LauncherError(f"--stage {stage!r}: run {run_dir.name} has no such stage; {fix}")
    return chain.chain(raw, run_dir)[names.index(stage)], chain.stage_folder(run_dir, stage)


class RunModel:
    """A finetune run's trained model: its export (`adapter/` on the run's base, or `model/`),
    the tokenizer the run saved (with its chat template), and its task's prompt rendering.

        model = RunModel("runs/<run_id>")                 # or RunModel(run, variant="lora")
        model.generate(["what colour is the zorp?"])      # answers only, greedy
    """

    def __init__(self, run_dir: Union[str, Path], variant: Optional[str] = None, device: str = "cpu",
                 stage: Optional[str] = None):
        require_torch()  # first: it quiets the libraries' import chatter
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        from launcher.spec import validate

        hf_logging.disable_progress_bar()
        self.run_dir = Path(run_dir)
        try:
            manifest = json.loads((self.run_dir / MANIFEST).read_text())
        except FileNotFoundError:
            raise LauncherError(f"no run at {self.run_dir} (no {MANIFEST}); pass a run folder or its run id "
                                "with --storage") from None
        spec = manifest.get("spec") or {}
        folder, variants = self.run_dir, getattr(validate(spec), "variant_specs", None)
        if variants is not None:  # a compare run: one variant's finetune, in variants/<name>
            specs = variants()
            if variant is None and len(specs) == 1:
                variant = next(iter(specs))
            if variant not in specs:
                raise LauncherError(f"run {self.run_dir.name} compares variants {', '.join(specs)}; "
                                    "name one with --variant")
            spec, folder = specs[variant], self.run_dir / "variants" / variant
        elif variant is not None:
            raise LauncherError(f"--variant {variant}: run {self.run_dir.name} is a {manifest.get('kind')} run, "
                                "not a compare; drop --variant")
        if manifest.get("kind") == "pipeline":  # one stage's finetune, in stages/<name> (default: the last)
            spec, folder = _stage_of(self.run_dir, validate(spec), stage)
        elif stage is not None:
            raise LauncherError(f"--stage {stage}: run {self.run_dir.name} is a {manifest.get('kind')} run, "
                                "not a pipeline; drop --stage")
        data, model_spec = spec.get("data") or {}, spec.get("model") or {}
        if model_spec.get("num_labels"):
            raise LauncherError(f"run {self.run_dir.name} trains a classifier (model.num_labels); infer "
                                "answers text-generation runs only")
        self.task, self.device = data.get("task", "causal_lm"), device
        export = next((folder / e for e in ("adapter", "model") if (folder / e).is_dir()), None)
        if export is None or not (folder / "tokenizer").is_dir():
            raise LauncherError(f"run folder {folder} has no trained model yet (no adapter/ or model/ and "
                                "tokenizer/); wait for the run to succeed (ftlaunch status)")
        self.tokenizer = with_template(AutoTokenizer.from_pretrained(folder / "tokenizer"), data)
        if export.name == "adapter":
            from peft import PeftModel

            base = folder / "base" if (folder / "base").is_dir() else _base_folder(model_spec)
            self.model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), export)
        else:
            self.model = AutoModelForCausalLM.from_pretrained(export)
        self.model.to(device).eval()

    def prompt(self, text: str, system: Optional[str] = None) -> str:
        return prompt_text(self.tokenizer, text, self.task, system)

    def generate(self, texts: Sequence[str], max_new_tokens: int = 64, system: Optional[str] = None) -> list[str]:
        """Greedy answers (the completion only) to inputs, rendered as the run's task renders them."""
        return greedy(self.model, self.tokenizer, [self.prompt(t, system) for t in texts], max_new_tokens,
                      add_special_tokens=self.task not in TEMPLATED_TASKS)


def _base_folder(model_spec: dict) -> str:
    source = str(model_spec.get("source", ""))
    if source == "minilm" or not source.startswith("hf:"):
        raise LauncherError(f"the run's base {source!r} was not saved beside its adapter; rerun it")
    return str(Path(source[3:]).expanduser())


# ---------------------------------------------------------------------------------------------
# A multitask run's adapters on one base


class AdapterSet:
    """A run's base model with its adapters; `set_adapter` switches, `tasks=` mixes per row."""

    def __init__(self, run_dir: Union[str, Path], tasks: Optional[Sequence[str]] = None,
                 device: str = "cpu"):
        require_torch()  # first: it quiets the libraries' import chatter
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.run_dir = Path(run_dir)
        self.registry = load_registry(self.run_dir)
        known = self.registry["adapters"]
        names = list(tasks) if tasks else sorted(known)
        missing = [n for n in names if n not in known]
        if not known or missing:
            raise LauncherError(f"no adapter {', '.join(missing) or '(none registered)'} in "
                                f"{self.run_dir}; registered: {', '.join(sorted(known)) or 'none'}")
        base_path = self._path(self.registry["base"]["path"])
        self.tokenizer = AutoTokenizer.from_pretrained(self._path(self.registry["tokenizer"]))
        # Each task's data block (its task and chat template), from the run's spec.
        try:
            spec = json.loads((self.run_dir / MANIFEST).read_text()).get("spec") or {}
        except FileNotFoundError:
            spec = {}
        from launcher.spec import validate

        tasks = getattr(validate(spec), "tasks", []) if spec else []  # a multitask run's
        self.data = {t.name: t.data.model_dump(mode="json") for t in tasks}
        base = AutoModelForCausalLM.from_pretrained(base_path).to(device)
        first, *rest = names
        self.model = PeftModel.from_pretrained(base, self._path(known[first]["path"]), adapter_name=first)
        for name in rest:
            self.model.load_adapter(self._path(known[name]["path"]), adapter_name=name)
        self.model.eval()
        self.device, self.names, self.active = device, names, first

    def _path(self, path: str) -> str:
        return str(path if Path(path).is_absolute() else self.run_dir / path)

    def set_adapter(self, task: str) -> None:
        if task not in self.names:
            raise LauncherError(f"no adapter {task!r} loaded; loaded: {', '.join(self.names)}")
        self.model.set_adapter(task)
        self.active = task

    def encode(self, texts: Sequence[str], seq_len: Optional[int] = None) -> dict:
        enc = self.tokenizer(list(texts), padding="longest" if seq_len is None else "max_length",
                             truncation=seq_len is not None, max_length=seq_len, return_tensors="pt")
        return {k: enc[k].to(self.device) for k in ("input_ids", "attention_mask")}

    def logits(self, texts: Sequence[str], task: Optional[str] = None,
               tasks: Optional[Sequence[str]] = None, seq_len: Optional[int] = None):
        """Logits of `texts` under one adapter (`task`, else the active one) or, with `tasks`,
        one adapter per row in a single mixed batch (peft's `adapter_names=`)."""
        import torch

        enc = self.encode(texts, seq_len)
        with torch.no_grad():
            if tasks is not None:
                if len(tasks) != len(texts):
                    raise LauncherError(f"tasks has {len(tasks)} names for {len(texts)} texts; give one per text")
                return self.model(**enc, adapter_names=list(tasks)).logits
            if task is not None:
                self.set_adapter(task)
            return self.model(**enc).logits

    def prompt(self, text: str, task: str, system: Optional[str] = None) -> str:
        """An input as the task's adapter was trained to see it (chat template for instruction/chat)."""
        data = self.data.get(task) or {}
        return prompt_text(with_template(self.tokenizer, data), text, data.get("task", "causal_lm"), system)

    def generate(self, texts: Sequence[str], task: Optional[str] = None,
                 tasks: Optional[Sequence[str]] = None, max_new_tokens: int = 24,
                 system: Optional[str] = None) -> list[str]:
        """Greedy completions (batched per adapter, `greedy`); `tasks`: one adapter per text."""
        names = list(tasks) if tasks is not None else [task or self.active] * len(texts)
        if len(names) != len(texts):
            raise LauncherError(f"tasks has {len(names)} names for {len(texts)} texts; give one per text")
        out: list = [None] * len(texts)
        for name in dict.fromkeys(names):
            rows = [i for i, n in enumerate(names) if n == name]
            self.set_adapter(name)
            templated = (self.data.get(name) or {}).get("task") in TEMPLATED_TASKS
            answers = greedy(self.model, self.tokenizer, [self.prompt(texts[i], name, system) for i in rows],
                             max_new_tokens, add_special_tokens=not templated)
            for i, answer in zip(rows, answers):
                out[i] = answer
        return out


# ---------------------------------------------------------------------------------------------
# A joint multitask run: one backbone, one classification head per task

HEADS_JSON = "heads.json"  # in the export folder: the backbone's folder, pooling, each head's file and classes


def joint_logits(backbone, head, input_ids, attention_mask):
    """A task's logits: the backbone's last hidden states, mean-pooled over the real tokens,
    through the task's linear head. jobs/joint.py trains with it; `JointModel` reloads with it."""
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    return head(pooled)


class JointModel:
    """A joint multitask run's export (`joint/`: `backbone/` as save_pretrained writes it, with
    its tokenizer; `heads/<task>.safetensors`; `heads.json`) loaded once, every head on it.

        joint = JointModel("runs/<run_id>")      # the run folder, or its joint/ folder
        joint.logits(["rain and storm today"], task="topic")
    """

    def __init__(self, folder: Union[str, Path], device: str = "cpu"):
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        folder = Path(folder)
        folder = folder / JOINT_EXPORT if (folder / JOINT_EXPORT).is_dir() else folder
        if not (folder / HEADS_JSON).is_file():
            raise LauncherError(f"{folder} holds no joint export ({HEADS_JSON}); pass a joint multitask run's "
                                "folder once it has succeeded (ftlaunch status)")
        self.folder, self.device = folder, device
        self.description = json.loads((folder / HEADS_JSON).read_text())
        backbone = folder / self.description["backbone"]
        self.tokenizer = AutoTokenizer.from_pretrained(backbone)
        self.backbone = AutoModel.from_pretrained(backbone).to(device).eval()
        self.heads = {}
        for name, head in self.description["tasks"].items():
            weights = load_file(str(folder / head["file"]))
            layer = torch.nn.Linear(weights["weight"].shape[1], weights["weight"].shape[0])
            layer.load_state_dict(weights)
            self.heads[name] = layer.to(device).eval()

    @property
    def tasks(self) -> list[str]:
        return list(self.heads)

    def logits(self, texts: Sequence[str], task: str):
        """The task head's logits for `texts`, encoded as the run encoded its rows."""
        import torch

        if task not in self.heads:
            raise LauncherError(f"no head {task!r} in {self.folder}; heads: {', '.join(self.heads)}")
        enc = self.tokenizer([str(t) for t in texts], padding="max_length", truncation=True,
                             max_length=self.description["seq_len"], return_tensors="pt")
        with torch.no_grad():
            return joint_logits(self.backbone, self.heads[task], enc["input_ids"].to(self.device),
                                enc["attention_mask"].to(self.device))

    def predict(self, texts: Sequence[str], task: str) -> list:
        """Each text's class: its label name where the run recorded them, else its index."""
        names = self.description["tasks"][task].get("label_names")
        best = self.logits(texts, task).argmax(-1).tolist()
        return [names[i] for i in best] if names else best
