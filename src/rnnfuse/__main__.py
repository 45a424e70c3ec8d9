"""Command line: ``python -m rnnfuse <command>``."""
import json
import os
import sys

from ._checks import OneLineParser


def _add_shared(p, *, hidden, layers, epochs):
    """The flags every training command takes."""
    g = p.add_argument_group("model and training")
    g.add_argument("--cell", choices=("lstm", "gru", "rnn"), default="lstm",
                   help="recurrent cell (default: %(default)s)")
    g.add_argument("--hidden", type=int, default=hidden, help="hidden size (default: %(default)s)")
    g.add_argument("--layers", type=int, default=layers,
                   help="stacked recurrent layers (default: %(default)s)")
    g.add_argument("--epochs", type=int, default=epochs, help="passes over the training data "
                   "(default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="seed of every random choice "
                   "(default: %(default)s)")
    g.add_argument("--threads", type=int, default=1, help="BLAS/OpenMP threads (threadpoolctl "
                   "limit; default: %(default)s, the fastest for these sizes on 2 cores)")
    g.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (default: %(default)s)")
    g.add_argument("--clip", type=float, default=1.0,
                   help="max global gradient norm, 0 for none (default: %(default)s)")
    g.add_argument("--patience", type=int, default=None,
                   help="stop after this many evaluations without improvement")
    g.add_argument("--eval-every", type=int, default=None, metavar="STEPS",
                   help="also evaluate every STEPS steps (default: %(default)s)")
    g.add_argument("--steps", type=int, default=None, help="stop after this many steps in all")
    g.add_argument("--max-minutes", type=float, default=None,
                   help="stop training after this many minutes, 0 for no limit "
                   "(default: %(default)s)")
    o = p.add_argument_group("output")
    o.add_argument("--save", metavar="PATH", help="checkpoint written (atomically) every epoch")
    o.add_argument("--resume", metavar="PATH", help="continue from a checkpoint of --save")
    o.add_argument("--metrics", metavar="PATH", help="append one JSON line per evaluation")
    o.add_argument("--plot", metavar="PNG", help="loss curve (needs matplotlib)")
    o.add_argument("--json", action="store_true",
                   help="print a final machine-readable JSON line with the metrics")
    o.add_argument("--quiet", action="store_true",
                   help="no progress display and no evaluation lines on stderr")


def _build_parser():
    parser = OneLineParser(prog="rnnfuse", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("config", help="print the build and runtime configuration")
    sub.add_parser("bench", help="time the kernels against the NumPy reference and peers",
                   add_help=False)
    c = sub.add_parser("charlm", help="train a character-level language model",
                       description="Character-level language model (Embedding -> recurrent "
                       "stack -> Linear) trained with truncated BPTT; reports held-out bits "
                       "per character beside the unigram baseline and prints a sample. "
                       "Without --text it trains on a seeded selection of the Python "
                       "standard library's .py sources.")
    c.add_argument("--text", metavar="FILE", help="UTF-8 training text (default: the Python "
                   "standard library's sources)")
    c.add_argument("--max-chars", type=int, default=3_000_000,
                   help="cap on the default corpus (default: %(default)s)")
    c.add_argument("--heldout", type=float, default=0.05,
                   help="fraction held out for evaluation (default: %(default)s)")
    c.add_argument("--bptt", type=int, default=64, help="TBPTT window k (default: %(default)s)")
    c.add_argument("--batch", type=int, default=64, help="rows per batch (default: %(default)s)")
    c.add_argument("--embed", type=int, default=64, help="embedding size (default: %(default)s)")
    c.add_argument("--temperature", type=float, default=0.8,
                   help="sampling temperature, 0 for greedy (default: %(default)s)")
    c.add_argument("--sample", type=int, default=300, metavar="N",
                   help="characters to generate after training, 0 for none (default: %(default)s)")
    c.add_argument("--prime", default="def ", help="text the sample starts from")
    _add_shared(c, hidden=256, layers=1, epochs=20)
    c.set_defaults(max_minutes=4.0, eval_every=500)
    for name in _COMMANDS:
        _command(name).add_parser(sub, _add_shared)
    return parser


# The other training commands, one module each (rnnfuse/cmd_<name>.py) with
# add_parser(sub, add_shared) and run(args) -> exit status.
_COMMANDS = ("forecast", "classify", "memory", "autoencode")


def _command(name):
    import importlib
    return importlib.import_module(f".cmd_{name}", __package__)


# Bad flags are input errors like any other. One class from a real module, because under
# `python -m rnnfuse` this file is __main__, and a command module importing
# rnnfuse.__main__ gets a second copy of it, with a second class of the same name.
from .tasks import InputError as _UserError  # noqa: E402
from .tasks import check_flag as _positive  # noqa: E402
from .tasks import check_shared_flags  # noqa: E402

def _charlm(args):
    import numpy as np
    from threadpoolctl import threadpool_limits

    from . import optim, tasks, train

    check_shared_flags(args)
    for name in ("bptt", "embed", "max_chars"):
        _positive(f"--{name.replace('_', '-')}", getattr(args, name))
    _positive("--sample", args.sample, 0)
    if not args.temperature >= 0:  # NaN fails too
        raise _UserError(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.heldout < 0.5:
        raise _UserError(f"--heldout must lie in (0, 0.5), got {args.heldout}")
    out = open(os.devnull, "w") if args.quiet else sys.stderr  # progress and eval lines

    # 1. the corpus: documents, then held-out = the last documents (or the tail of one text)
    if args.text is not None:
        text = tasks.read_text(args.text)
        cut = int(len(text) * (1 - args.heldout))
        train_text, held_text, source = text[:cut], text[cut:], args.text
    else:
        docs, _ = tasks.stdlib_corpus(args.max_chars, seed=0)
        total, acc, cut = sum(map(len, docs)), 0, len(docs)
        for i, d in enumerate(docs):
            acc += len(d)
            if acc > total * (1 - args.heldout):
                cut = max(1, i)
                break
        train_text, held_text = "\n".join(docs[:cut]), "\n".join(docs[cut:])
        source = f"Python {sys.version.split()[0]} standard library ({len(docs)} files)"
    if len(held_text) < 2:
        raise tasks.InputError("the text is too short to hold out any of it for evaluation")
    vocab = tasks.Vocab(train_text, min_count=1)
    train_ids, held_ids = vocab.encode(train_text), vocab.encode(held_text)
    entropy, unigram = tasks.unigram_bits(train_ids, held_ids, vocab.size)
    print(f"charlm: {source}: {len(train_ids):,} training / {len(held_ids):,} held-out chars, "
          f"vocabulary {vocab.size}", file=out)

    # 2. model, optimizer, task
    rng = np.random.default_rng(args.seed)
    model = tasks.char_model(vocab.size, args.cell, args.hidden, args.layers, args.embed,
                             seed=args.seed)
    opt = optim.Adam(model.named_parameters(), lr=args.lr)
    task = tasks.CharLM(model, train_ids, held_ids, args.bptt, args.batch, rng)
    config = {"task": "charlm", "cell": args.cell, "hidden": args.hidden, "layers": args.layers,
              "embed": args.embed, "vocab": vocab.size, "bptt": args.bptt, "batch": args.batch}

    def report(rec):
        print(f"eval  epoch {rec['epoch']} step {rec['step']}: held-out {rec['bpc']:.3f} "
              f"bits/char (unigram {unigram:.3f}), {rec['tok_per_s']:,.0f} chars/s, "
              f"{rec['elapsed_s']:.0f} s", file=out, flush=True)

    with threadpool_limits(limits=args.threads):
        result = train.fit_from_flags(task, opt, args, max_minutes=args.max_minutes, rng=rng,
                                      unit="tok", stream=out, config=config, on_eval=report)
        sample = (task.sample(vocab, args.prime, args.sample, args.temperature,
                              np.random.default_rng(args.seed))
                  if args.sample > 0 else "")
    last = result.last
    print(f"held-out bits/char: {last['bpc']:.4f} (unigram baseline {unigram:.4f}; "
          f"training-text entropy {entropy:.4f}) after {result.step} steps, "
          f"{result.elapsed_s:.0f} s ({result.stopped})")
    if sample:
        print(f"--- sample (temperature {args.temperature}) ---")
        print(sample)
        print("---")
    if args.json:
        print(json.dumps({"command": "charlm", "bpc": last["bpc"], "best_bpc": result.best["bpc"],
                          "unigram_bpc": unigram, "train_entropy_bits": entropy,
                          "steps": result.step, "epochs": result.epoch,
                          "stopped": result.stopped, "elapsed_s": round(result.elapsed_s, 3),
                          "chars_per_s": last["tok_per_s"], "train_chars": int(len(train_ids)),
                          "heldout_chars": int(len(held_ids)), "vocab": vocab.size,
                          **config, "cell": args.cell, "seed": args.seed}))
    return 0


def main(argv=None):
    parser = _build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "bench":
        parser.exit(2, f"rnnfuse {args.command}: error: unrecognized arguments: "
                    f"{' '.join(rest)}\n")
    if args.command == "config":
        from . import show_config
        show_config()
        return 0
    if args.command == "bench":
        from . import bench
        return bench.main(rest)
    from .checkpoint import CheckpointError
    from .tasks import InputError
    from .train import TrainingError
    try:
        return _charlm(args) if args.command == "charlm" else _command(args.command).run(args)
    except (_UserError, InputError, CheckpointError, TrainingError) as e:
        print(f"rnnfuse {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path that is missing, a directory, unreadable, too long, ...
        print(f"rnnfuse {args.command}: error: {e.strerror or e}: "
              f"{e.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2
    except MemoryError as e:  # sizes too large for this machine
        print(f"rnnfuse {args.command}: error: out of memory ({str(e) or 'no detail'}); "
              "choose smaller sizes", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rnnfuse {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
