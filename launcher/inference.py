"""Swap adapters at inference: the base loaded once, every registered adapter attached to it.

torch, transformers and peft are imported inside the functions: `import launcher` stays light.

    adapters = AdapterSet("runs/<run_id>")
    adapters.generate(["count from 41:"], task="counting")
    adapters.logits(texts, tasks=["counting", "alphabet"])   # one mixed batch, one adapter per row
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

from launcher.errors import LauncherError
from launcher.registry import load_registry


class AdapterSet:
    """A run's base model with its adapters; `set_adapter` switches, `tasks=` mixes per row."""

    def __init__(self, run_dir: Union[str, Path], tasks: Optional[Sequence[str]] = None,
                 device: str = "cpu"):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
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
        self.tokenizer = PreTrainedTokenizerFast.from_pretrained(self._path(self.registry["tokenizer"]))
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

    def generate(self, texts: Sequence[str], task: Optional[str] = None,
                 tasks: Optional[Sequence[str]] = None, max_new_tokens: int = 24) -> list[str]:
        """Greedy completions, one text at a time (no padding to get wrong), per-row adapters allowed."""
        import torch

        names = list(tasks) if tasks is not None else [task or self.active] * len(texts)
        eos = self.tokenizer.eos_token_id
        out = []
        for text, name in zip(texts, names):
            ids = self.encode([text])["input_ids"]
            new = []
            with torch.no_grad():
                for _ in range(max_new_tokens):
                    nxt = int(self.model(input_ids=ids, adapter_names=[name]).logits[0, -1].argmax())
                    if nxt == eos:
                        break
                    new.append(nxt)
                    ids = torch.cat([ids, torch.tensor([[nxt]], device=ids.device)], dim=1)
            out.append(self.tokenizer.decode(new))
        return out
