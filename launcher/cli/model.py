"""`ftlaunch model make FAMILY --out DIR`: a stand-in for a user's own model folder."""

from launcher import modelmake


def add_parser(sub) -> None:
    p = sub.add_parser("model", help="make a small random-init model folder (the layout of a downloaded one)")
    p.add_argument("action", choices=("make",))
    p.add_argument("family", choices=sorted(modelmake.FAMILIES), help="the architecture and its tokenizer conventions")
    p.add_argument("--out", required=True, help="the folder to write (use it as model.source: hf:<folder>)")
    p.add_argument("--size", default="tiny", choices=list(modelmake.SIZES),
                   help="tiny (CPU tests, demo), small, 1b (GPU benchmarks)")
    p.add_argument("--vocab-size", type=int, default=1024, help="BPE vocabulary trained here")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args) -> int:
    folder = modelmake.make_model(args.family, args.out, size=args.size, vocab_size=args.vocab_size, seed=args.seed)
    files = ", ".join(sorted(f.name for f in folder.iterdir()))
    print(f"{folder}: {args.family} ({args.size}) with its own tokenizer and chat template: {files}")
    print(f"use it with: model: {{source: hf:{folder}}}")
    return 0
