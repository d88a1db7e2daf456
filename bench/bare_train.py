"""B1's baseline: the same LoRA training as configs/tiny/lora.yaml, as a bare Ray Train script.

Submitted with plain `ray job submit`; no spec, plan, pre-flight or manifest. It appends the time
of its first training step to --mark, the number B1 compares ftlaunch against.
"""

import argparse
import json
import time

import ray
import ray.data
import ray.train
import torch
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from jobs import components as C


def loop(cfg):
    torch.set_num_threads(1)
    model = C.apply_strategy(C.build_model({"source": "tiny-llama"}), {
        "type": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"})
    model = ray.train.torch.prepare_model(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    shard = ray.train.get_dataset_shard("train")
    step = 0
    for batch in shard.iter_torch_batches(batch_size=cfg["micro_batch"], drop_last=True, dtypes=torch.long):
        loss = model(**{k: batch[k] for k in C.TENSOR_COLUMNS}).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step == 1 and ray.train.get_context().get_world_rank() == 0:
            with open(cfg["mark"], "a") as f:
                f.write(json.dumps({"event": "first_step", "time": time.time()}) + "\n")
        if step >= cfg["steps"]:
            break
    ray.train.report({"step": step})


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--mark", required=True)
    p.add_argument("--storage", required=True)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    ds = ray.data.read_parquet(args.data, columns=["text"]).map_batches(
        C.tokenize_causal, fn_kwargs={"column": "text", "seq_len": 48}, batch_format="numpy")
    TorchTrainer(
        loop, train_loop_config={"micro_batch": 16, "steps": args.steps, "mark": args.mark},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(storage_path=args.storage), datasets={"train": ds},
    ).fit()
