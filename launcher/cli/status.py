"""`ftlaunch status ID`: the job's state, message and run folder."""

from launcher.cli.common import add_target_args, print_json, target_of
from launcher.client import TERMINAL, attach


def add_parser(sub) -> None:
    p = sub.add_parser("status", help="show a job's status")
    p.add_argument("submission_id")
    add_target_args(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--namespace", default="default", help="k8s target: the RayJob's namespace")
    p.add_argument("--kubeconfig", help="k8s target: the kubeconfig")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.target == "k8s":
        return k8s_status(args)
    handle = attach(args.submission_id, target_of(args), args.address)
    info = handle.info()
    row = {
        "submission_id": info.submission_id,
        "status": str(info.status.value),
        "message": info.message,
        "start_time": info.start_time,
        "end_time": info.end_time,
        "run_dir": handle.run_dir,
    }
    manifest = handle.manifest()
    row["run_status"], row["error"] = manifest.get("status"), manifest.get("error")
    if args.json:
        print_json(row)
    else:
        print(f"{row['submission_id']}  {row['status']}  {row['message'] or ''}".rstrip())
        if row["error"]:
            print(f"error: {row['error']}")
        if row["status"] in TERMINAL and row["run_status"] == "RUNNING":
            print(f"run: still RUNNING in its manifest: the driver ended without recording why "
                  f"(killed?); continue it with: ftlaunch resume {handle.run_dir}")
        if handle.run_dir:
            print(f"artifacts: {handle.run_dir}")
    return 0


def k8s_status(args) -> int:
    """A RayJob's jobStatus and jobDeploymentStatus, read from the Kubernetes API."""
    from launcher.k8s.submit import api_client_from, rayjob_status

    row = rayjob_status(args.submission_id, args.namespace, api_client_from(args.kubeconfig))
    if args.json:
        print_json(row)
    else:
        print(f"{row['name']}  {row['job_status'] or '-'}  (deployment {row['deployment_status'] or '-'})"
              f"  {row['message']}".rstrip())
    return 0
