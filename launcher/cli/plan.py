"""`ftlaunch plan SPEC`: print what submit would do. Pure (no network, no GPU) unless `--address`
names a Ray cluster: then its live nodes are read, as submit reads them (launcher/capacity.py)."""

import dataclasses

from launcher.cli.common import add_spec_args, add_target_args, print_json, target_of
from launcher.jobplan import plan
from launcher.kinds import get_kind
from launcher.spec import load_spec
from launcher.tracking import describe as tracking_lines


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="show the plan (resources, entrypoint, ids) without submitting")
    add_spec_args(p)
    add_target_args(p)
    p.add_argument("--submission-id", help="use this id instead of a generated one")
    p.add_argument("--profile", help="check fit against this cluster profile (cluster/profiles.yaml)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    job = plan(load_spec(args.spec, tuple(args.overrides)), target_of(args),
               submission_id=args.submission_id, profile=args.profile)
    if args.address and job.target in ("ray", "local"):
        from launcher.targets.ray import live_capacity, resolve_address

        live, _ = live_capacity(resolve_address(args.address), job.resources, job.spec)
        job = dataclasses.replace(job, warnings=[*job.warnings, *live])
    if args.json:
        print_json(job.to_dict())
        return 0
    print(describe(job))
    return 0


def describe(job) -> str:
    kind = get_kind(job.kind)
    r = job.resources
    gpus = f", {r['gpus_per_worker']} GPU" if r["gpus_per_worker"] else ""
    lines = [
        f"run id        {job.run_id}",
        f"kind          {job.kind} ({kind.label(job.spec)})",
        f"target        {job.target}",
        f"workers       {_workers(job)} x ({r['cpus_per_worker']} CPU{gpus})",
        *_elastic(job),
        *([f"data stream   {r['data_tasks']} Ray Data task(s) at once per stage (read, tokenize), asking no CPU "
           "(resources.data_tasks)"] if r.get("data_tasks") else []),
        f"entrypoint    {job.entrypoint}",
        f"artifacts     {job.run_dir}",
    ]
    lines += kind.data_lines(job.data)
    lines += kind.describe(job.spec, job.estimate)
    lines += tracking_lines(job.spec.get("tracking") or {})
    lines += [f"warning       {w}" for w in job.warnings]
    if job.estimate:
        lines += ["", kind.format_estimate(job.estimate)]
    if getattr(job, "engine_config", None):
        import json

        lines += ["", "DeepSpeed config (world size = workers)", json.dumps(job.engine_config, indent=2)]
    return "\n".join(lines)


def _workers(job) -> str:
    r = job.resources
    return f"{r['min_workers']}-{r['workers']}" if r.get("min_workers") else str(r["workers"])


def _elastic(job) -> list[str]:
    """Elastic workers' line: how the run sizes itself, and what keeps its global batch."""
    r = job.resources
    if not r.get("min_workers"):
        return []
    train = job.spec.get("train") or {}
    micro, accumulation = train.get("micro_batch", 1), train.get("grad_accumulation", 1)
    low = -(-accumulation * r["workers"] // r["min_workers"])
    return [f"elastic       starts with as many workers as the cluster holds (at least {r['min_workers']}) "
            f"and goes on after a lost one without waiting; global batch {micro * accumulation * r['workers']} "
            f"at every size, by gradient accumulation ({accumulation} on {r['workers']} workers, {low} on "
            f"{r['min_workers']}; rounded up where it does not divide)"]
