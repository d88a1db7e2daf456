"""Pieces every training method shares: tokenizer, model, strategy, data stream, checkpoints.

Each training method (jobs/finetune.py, ...) reads as one story and calls into these; the loop's
bookkeeping is jobs/loop.py. They take the typed spec (launcher/spec.py); the ones a test or a
notebook calls in-process also take the plain dict of a spec part and validate it.
"""

from __future__ import annotations

import hashlib
import os
from typing import Iterator, Optional

import numpy as np
import torch
from pydantic import BaseModel

# The catalogue's configs are the planner's too, so what is planned is what runs. The loops read
# RANDOM_INIT_SOURCES from here: a random-init base is saved beside its adapter.
from common.catalog import RANDOM_INIT_SOURCES, config_for, minilm_dir  # noqa: F401
from jobs import text
from launcher.spec import DataSpec, ModelSpec, ResourcesSpec


def task_and_model(spec) -> tuple[str, ModelSpec]:
    """A spec's data task and model block; a spec dict (as a test holds one, perhaps only those
    two parts) has its model block validated."""
    if isinstance(spec, BaseModel):
        return spec.data.task, spec.model
    return spec["data"]["task"], ModelSpec.model_validate(spec["model"])


def data_of(spec) -> DataSpec:
    """A spec's data block; a spec dict's may lack the paths (a test's in-process rows)."""
    if isinstance(spec, BaseModel):
        return spec.data
    return DataSpec.model_validate({"train": "in-process", **spec["data"]})


def ray_train_configs(res: ResourcesSpec, name: str, storage: dict, max_failures: int) -> dict:
    """The ScalingConfig and RunConfig of every ftlaunch Ray Train run: one rank per worker with
    the spec's CPUs and GPUs; a run named so that a rerun of the name resumes from its last
    checkpoint (two kept) that is still whole (jobs/checkpoints.py repairs the run snapshot of
    one gone or cut short); `max_failures` dead workers recovered from it. `storage`: RunDir's
    `ray_storage()` (a folder, or a bucket path and its filesystem)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    from jobs import checkpoints

    gone = checkpoints.repair(storage, name)
    if gone:
        print(f"[ftlaunch] checkpoint {', '.join(gone)} of {name} is gone or cut short (a stop or a "
              "prune killed mid-way); the run continues from the last whole one, or from the start", flush=True)

    return {
        "scaling_config": ScalingConfig(  # elastic: Ray Train runs min..max, as many as the cluster holds
            num_workers=(res.min_workers, res.workers) if res.min_workers else res.workers,
            use_gpu=res.gpus_per_worker > 0,
            resources_per_worker={"CPU": res.cpus_per_worker, "GPU": res.gpus_per_worker, **res.custom_per_worker},
            placement_strategy=res.placement.upper(),
        ),
        "run_config": RunConfig(name=name, **storage,
                                checkpoint_config=CheckpointConfig(num_to_keep=2),
                                failure_config=FailureConfig(max_failures=max_failures)),
    }


def accumulation_for(accumulation: int, workers: int, world: int) -> int:
    """Micro-batches per optimizer step on `world` ranks, so that the global batch is that of
    `workers` ranks accumulating `accumulation` (elastic workers); rounded up where it does not
    divide (the records say the global batch each size ran)."""
    return max(1, -(-accumulation * workers // world))


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


def tokenize_causal(batch: dict, column: str = "text", seq_len: int = 64,
                    model_spec: ModelSpec | dict | None = None) -> dict:
    """Ray Data `map_batches` function: text -> input_ids, attention_mask, labels (pad = -100),
    with the model's own tokenizer (jobs/text.py; the byte-level one for the random-init models)."""
    data = {"task": "causal_lm", "train": "in-process", "columns": {"text": column}}
    return text.encode(batch, model_spec or ModelSpec(), data, seq_len)


TENSOR_COLUMNS = ("input_ids", "attention_mask", "labels")

# The model's own tokenizer, for every task (jobs/text.py owns it).
tokenizer_for = text.tokenizer_for


def tokenize_classification(batch: dict, column: str = "text", label: str = "label",
                            seq_len: int = 64, model_spec: ModelSpec | dict | None = None,
                            data: DataSpec | dict | None = None) -> dict:
    """Ray Data `map_batches` function: text, label -> input_ids, attention_mask, labels. With
    `data` (a stream), a row that cannot be trained on (a null or non-string text, a null label,
    an over-long text: badrows.row_problem) becomes a marker row (BAD_COLUMN 1) in its place,
    for the consumer to skip or name (jobs/data/badrows.py)."""
    from jobs.data.badrows import BAD_COLUMN

    tok = tokenizer_for(model_spec or ModelSpec())
    texts, labels = list(batch[column]), list(batch[label])
    bad = None
    if data is not None:
        bad = text.bad_rows(batch, DataSpec.model_validate(data))
        texts = ["" if b else t for t, b in zip(texts, bad)]
        labels = [0 if b else y for y, b in zip(labels, bad)]
    enc = tok([str(t) for t in texts], padding="max_length", truncation=True,
              max_length=seq_len, return_tensors="np")
    out = {
        "input_ids": enc["input_ids"].astype(np.int64),
        "attention_mask": enc["attention_mask"].astype(np.int64),
        "labels": np.asarray(labels).astype(np.int64),
    }
    if bad is not None:
        out[BAD_COLUMN] = bad.astype(np.int64)
    return out


REPLAY_FLAG = "from_replay"


def flag_rows(batch: dict, value: int) -> dict:
    """Ray Data `map_batches` function: mark each row as replayed (1) or new (0)."""
    rows = len(next(iter(batch.values())))
    return {**batch, REPLAY_FLAG: np.full(rows, value, dtype=np.int64)}


def read_columns(data: DataSpec) -> Optional[list[str]]:
    """The columns a task reads from its files (None: all)."""
    if data.task == "classification":
        return [data.columns.get("text", "text"), data.columns.get("label", "label")]
    return text.read_columns(data)


def tokenized(ds, spec, tasks: int = 1):
    """A Ray Dataset of a spec's rows as model rows: classification's tokenize, or jobs/text.py's
    one stream for every causal-LM text task (encoded, packed with data.packing); `tasks` of each
    stage at once (jobs/data/read.py task_args)."""
    from jobs.data.read import task_args

    data, model, cols = spec.data, spec.model, spec.data.columns
    if data.task == "classification":
        if data.packing:
            raise ValueError("data.packing packs causal-LM text tasks (causal_lm, instruction, chat); "
                             "remove it for classification")
        return ds.map_batches(tokenize_classification, batch_format="numpy", fn_kwargs={
            "column": cols.get("text", "text"), "label": cols.get("label", "label"),
            "seq_len": model.seq_len, "model_spec": model, "data": data}, **task_args(tasks))
    return text.stream(ds, model, data, model.seq_len, **task_args(tasks))


# ---------------------------------------------------------------------------------------------
# Model and strategy


def build_model(model_spec: ModelSpec | dict, seed: int = 0, dtype: Optional[torch.dtype] = None):
    """The base model of a spec, with its attention kernel (`model.attn_implementation`) and in
    `dtype` (None: fp32; jobs/precision.base_dtype). Random-init sources are deterministic by seed."""
    model_spec = ModelSpec.model_validate(model_spec)
    source, labels = model_spec.source, model_spec.num_labels
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if labels else AutoModelForCausalLM
    extra = {"num_labels": labels} if labels else {}
    attn = model_spec.config.get("attn_implementation") or model_spec.attn_implementation
    if attn == "flash_attention_2":
        import importlib.util

        if importlib.util.find_spec("flash_attn") is None:
            raise ValueError("model.attn_implementation: flash_attention_2 needs the flash-attn package on the "
                             "cluster's workers (pip install flash-attn); use sdpa")
    kwargs = {"attn_implementation": attn, **({"dtype": dtype} if dtype is not None else {})}
    torch.manual_seed(seed)  # a new head (classifier, score) is random: same seed, same head
    if source == "tiny-llama":
        return auto.from_config(config_for(model_spec.model_dump()), **kwargs)
    if source == "minilm" or source.startswith("hf:"):
        folder = minilm_dir() if source == "minilm" else source[3:]
        config = {k: v for k, v in model_spec.config.items() if k != "attn_implementation"}
        return auto.from_pretrained(folder, local_files_only=True, **extra, **config, **kwargs)
    raise ValueError(f"model source {source!r} is not runnable by this job yet")


def apply_strategy(model, strategy):
    """Make exactly the strategy's parameters trainable; returns the (possibly wrapped) model.
    `strategy`: its spec model (or the dict of one)."""
    from jobs import strategies

    return strategies.apply(model, strategy)


def warmup(step: int, warmup_steps: int) -> float:
    """The learning-rate factor of the update after `step` updates: linear over `warmup_steps`."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0


def parameter_counts(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def digest(tensors: Iterator[torch.Tensor]) -> str:
    """A content hash of tensors, to prove frozen weights are bit-identical after training."""
    h = hashlib.sha256()
    for t in tensors:
        # raw bytes, whatever the dtype (numpy has no bfloat16)
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def frozen_and_trainable_digests(model, trainable: Optional[set] = None) -> dict:
    """Hashes of the frozen and the trainable weights; `trainable` names them (default:
    requires_grad now; gradual unfreezing passes the set trainable by the end of its schedule)."""
    named = list(model.named_parameters())
    is_trained = (lambda n, p: p.requires_grad) if trainable is None else (lambda n, p: n in trainable)
    return {
        "frozen": digest(p for n, p in named if not is_trained(n, p)),
        "trainable": digest(p for n, p in named if is_trained(n, p)),
    }


def unwrap(model):
    return model.module if hasattr(model, "module") else model


# ---------------------------------------------------------------------------------------------
# Evaluation


def _count(rows: Optional[dict]) -> int:
    return len(next(iter(rows.values()))) if rows else 0


def _slice(rows: dict, i: int, j: int) -> dict:
    return {k: v[i:j] for k, v in rows.items()}


def encode_split(rows: dict, spec) -> dict:
    """A split's rows (a causal-LM text task's) as padded tensor rows: eval is never packed."""
    _, model_spec = task_and_model(spec)
    data = data_of(spec).model_copy(update={"packing": False})
    return {k: torch.from_numpy(v) for k, v in text.encode(rows, model_spec, data, model_spec.seq_len).items()}


@torch.no_grad()
def causal_lm_loss(model, rows, spec=None, batch_size: int = 16) -> Optional[float]:
    """Mean token loss of a model over a split's rows (no gradient, eval mode restored after).
    `rows`: a split (load_split) and its spec, or a list of texts and the seq_len (a causal_lm
    set on the catalogue's byte-level tokenizer)."""
    if isinstance(rows, list):
        rows, spec = {"text": rows}, {"data": {"task": "causal_lm"}, "model": {"seq_len": spec}}
    if not _count(rows):
        return None
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, _count(rows), batch_size):
        batch = {k: v.to(device) for k, v in encode_split(_slice(rows, i, i + batch_size), spec).items()}
        n = int((batch["labels"][:, 1:] != -100).sum())
        if n:
            total += float(model(**batch).loss) * n
            count += n
    model.train(was_training)
    return total / count if count else None


def load_split(path: Optional[str], data: DataSpec, limit: int, skipped: Optional[dict] = None) -> Optional[dict]:
    """The first `limit` rows of an eval/retain split, from any format the data checks accept
    (Parquet, Arrow IPC, JSON lines, a save_to_disk folder): {column: values}; classification's
    keyed by role (text, label). Bad rows are dropped as `split_without_bad_rows` says, and
    counted in `skipped[path]`."""
    if not path:
        return None
    from jobs.data.read import read_head

    table = read_head(path, read_columns(data), limit)
    columns = split_without_bad_rows({c: table.column(c).to_pylist() for c in table.column_names}, path, data,
                                     skipped)
    if data.task != "classification":
        return columns
    text_col, label = data.columns.get("text", "text"), data.columns.get("label", "label")
    return {"text": columns[text_col], "label": columns[label]}


SPLIT_SKIPS = ("eval_bad_rows_skipped", "retain_bad_rows_skipped")  # summary keys: load_split's drops


def split_skips(skipped: dict, data: DataSpec) -> dict:
    """The eval and retain splits' bad rows skipped (load_split's `skipped`), as the before-record
    (and then the summary) keeps them."""
    return {f"{split}_bad_rows_skipped": skipped.get(path, 0)
            for split, path in (("eval", data.eval), ("retain", data.retain)) if path}


def split_without_bad_rows(columns: dict, path: str, data: DataSpec, skipped: Optional[dict] = None) -> dict:
    """An in-memory split ({column: values}) without the rows its task cannot use (a null or
    non-string text, a null label, an over-long row): up to data.skip_bad_rows are dropped (their
    count in `skipped[path]`, and a line); one more raises BadRowsError naming the file's row and
    the fix (a null would otherwise be trained as "None")."""
    from jobs.data.badrows import FIX, BadRowsError, row_problem

    names = list(columns)
    rows = [dict(zip(names, values)) for values in zip(*columns.values())]
    bad = [(i, problem) for i, row in enumerate(rows) if (problem := row_problem(row, data))]
    if len(bad) > data.skip_bad_rows:
        i, problem = bad[data.skip_bad_rows]
        raise BadRowsError(f"{path} row {i + 1}: {problem}; {FIX}")
    if not bad:
        return columns
    if skipped is not None:
        skipped[path] = len(bad)
    print(f"[ftlaunch] {path}: {len(bad)} bad row(s) skipped (data.skip_bad_rows {data.skip_bad_rows}); "
          f"the first, row {bad[0][0] + 1}: {bad[0][1]}", flush=True)
    drop = {i for i, _ in bad}
    return {c: [v for i, v in enumerate(values) if i not in drop] for c, values in columns.items()}


@torch.no_grad()
def evaluate(model, rows: Optional[dict], spec, batch_size: int = 16) -> dict:
    """Loss (and accuracy for classification) of a model on a split; {} without a split."""
    if not _count(rows):
        return {}
    task, model_spec = task_and_model(spec)
    if task != "classification":
        return {"loss": causal_lm_loss(model, rows, spec, batch_size)}
    was_training = model.training
    model.eval()
    total, correct, n = 0.0, 0, len(rows["text"])
    for i in range(0, n, batch_size):
        enc = tokenize_classification(
            {"text": rows["text"][i : i + batch_size], "label": rows["label"][i : i + batch_size]},
            seq_len=model_spec.seq_len, model_spec=model_spec,
        )
        batch = {k: torch.from_numpy(v) for k, v in enc.items()}
        out = model(**batch)
        total += float(out.loss) * len(batch["labels"])
        correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
    model.train(was_training)
    return {"loss": total / n, "accuracy": correct / n}


def example_batches(rows: Optional[dict], spec, limit: int) -> list[dict]:
    """Single-example tensor batches of a split (EWC's per-example Fisher)."""
    if not rows:
        return []
    task, model_spec = task_and_model(spec)
    seq_len, out = model_spec.seq_len, []
    for i in range(min(limit, _count(rows))):
        one = _slice(rows, i, i + 1)
        if task == "classification":
            enc = tokenize_classification(one, seq_len=seq_len, model_spec=model_spec)
            out.append({k: torch.from_numpy(v) for k, v in enc.items()})
        else:
            out.append(encode_split(one, spec))
    return out


PROBE_TEXT = ["count from 41: 41 42 43", "letters from c: c d e"]
PROBE_CLS = ["the team scored a goal", "rain and storm today"]


@torch.no_grad()
def probe(model, model_spec: ModelSpec | dict | None = None) -> dict:
    """Logits of the trained model on fixed inputs: a reloaded export must reproduce them."""
    was_training = model.training
    model.eval()
    if model_spec and ModelSpec.model_validate(model_spec).num_labels:
        enc = tokenize_classification({"text": PROBE_CLS, "label": [0, 1]}, seq_len=24, model_spec=model_spec)
    else:
        enc = tokenize_causal({"text": PROBE_TEXT}, "text", 24, model_spec)
    inputs = {k: torch.from_numpy(enc[k]) for k in ("input_ids", "attention_mask")}
    logits = model(**inputs).logits.detach().cpu()
    model.train(was_training)
    return {**inputs, "logits": logits}


# ---------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(path: str, model, optimizer, step: int, export: bool) -> None:
    """Write a checkpoint into folder `path`: trainable weights + optimizer + step (+ the exported model)."""
    inner = unwrap(model)
    trainable = {n: p.detach().cpu() for n, p in inner.named_parameters() if p.requires_grad}
    torch.save({"trainable": trainable, "optimizer": optimizer.state_dict(), "step": step},
               os.path.join(path, "state.pt"))
    if export:
        inner.save_pretrained(os.path.join(path, "export"))


def load_checkpoint(path: str, model, optimizer) -> int:
    """Restore trainable weights and optimizer from a checkpoint folder; returns the step reached."""
    state = torch.load(os.path.join(path, "state.pt"), weights_only=False)
    restore_trainable(model, state["trainable"], optimizer, state["optimizer"])
    return int(state["step"])


def restore_trainable(model, weights: dict, optimizer, optimizer_state: dict) -> None:
    """Saved trainable weights back into `model` (on its parameters' devices) and the optimizer's
    state; a weight the model lacks is an error, not a silent skip."""
    params = dict(unwrap(model).named_parameters())
    missing = set(weights) - set(params)
    if missing:
        raise RuntimeError(f"checkpoint has parameters the model lacks: {sorted(missing)[:3]}")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].device))
    optimizer.load_state_dict(optimizer_state)
