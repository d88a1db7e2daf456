"""`ftlaunch data make NAME --rows N --out DIR`: synthetic, learnable datasets (Parquet or JSON lines)."""

from launcher import synthetic


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="make synthetic datasets")
    p.add_argument("action", choices=("make",))
    p.add_argument("name", help=f"one of: {', '.join(sorted(synthetic.GENERATORS))}, demo")
    p.add_argument("--rows", type=int, default=4000)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", help="file name: <out>/<split>.<format> (default: train; for "
                   f"{' and '.join(synthetic.SFT_SETS)}, train and eval)")
    p.add_argument("--format", default="parquet", choices=synthetic.FORMATS, help="parquet (default) or jsonl")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.name == "demo":
        paths = synthetic.make_demo(args.out, args.rows, args.seed)
    elif args.split is None and args.name in synthetic.SFT_SETS:
        paths = synthetic.make_splits(args.name, args.rows, args.out, args.seed, args.format)
    else:
        split = args.split or "train"
        paths = {split: synthetic.make(args.name, args.rows, args.out, args.seed, split, args.format)}
    for split, path in paths.items():
        print(f"{split}: {path}")
    return 0
