"""`ftlaunch plan SPEC`: print what submit would do. Pure: no network, no GPU."""

from launcher.cli.common import add_spec_args, add_target_args, print_json, target_of
from launcher.jobplan import plan
from launcher.spec import load_spec


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
    if args.json:
        print_json(job.to_dict())
        return 0
    print(describe(job))
    return 0


def describe(job) -> str:
    r = job.resources
    gpus = f", {r['gpus_per_worker']} GPU" if r["gpus_per_worker"] else ""
    lines = [
        f"run id        {job.run_id}",
        f"kind          {job.kind} ({job.spec.get('strategy', {}).get('type', '-') if 'stages' not in job.spec else job.spec['model']['source']})",
        f"target        {job.target}",
        f"workers       {r['workers']} x ({r['cpus_per_worker']} CPU{gpus})",
        f"entrypoint    {job.entrypoint}",
        f"artifacts     {job.run_dir}",
    ]
    for role, found in job.data.items():
        lines.append(f"data.{role:<8} {found['rows']:,} rows in {found['files']} file(s)")
    if "tasks" in job.spec:
        from launcher.multitask import describe as describe_tasks

        lines += describe_tasks(job.spec, job.estimate)
    if job.spec.get("stages"):
        lines += [f"stage         {s['name']}: trains {'+'.join(s['train'])}, {s['steps']} steps, "
                  f"{s['resources']['workers']} x ({s['resources']['cpus_per_worker']} CPU, "
                  f"{s['resources']['gpus_per_worker']} GPU)" for s in job.spec["stages"]]
    else:
        lines.append(f"steps         {job.spec.get('train', {}).get('max_steps')}")
    lines += [f"warning       {w}" for w in job.warnings]
    if job.estimate:
        from launcher.planner import format_estimate, format_pipeline_estimate

        fmt = format_pipeline_estimate if job.estimate.get("kind") == "pipeline" else format_estimate
        lines += ["", fmt(job.estimate)]
    if getattr(job, "engine_config", None):
        import json

        lines += ["", "DeepSpeed config (world size = workers)", json.dumps(job.engine_config, indent=2)]
    return "\n".join(lines)
