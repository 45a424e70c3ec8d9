"""Command line: ``python -m rnnfuse <command>``."""
import sys

from ._checks import OneLineParser


def _build_parser():
    from . import apps

    parser = OneLineParser(prog="rnnfuse", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("config", help="print the build and runtime configuration")
    sub.add_parser("bench", help="time the kernels against the NumPy reference and peers",
                   add_help=False)
    for name in apps.COMMANDS:  # rnnfuse/apps/<name>.py
        apps.command(name).add_parser(sub)
    return parser


def _run(command, args):
    """The command's exit status; an input error, a refused checkpoint or a failed training
    is one line on stderr and status 2."""
    # the errors' classes from their modules, never this file's: under `python -m rnnfuse`
    # this file is __main__, and an import of rnnfuse.__main__ would be a second copy
    from . import apps
    from .apps.common import InputError
    from .checkpoint import CheckpointError
    from .train import TrainingError

    def fail(message):
        print(f"rnnfuse {command}: error: {message}", file=sys.stderr)
        return 2

    try:
        return apps.command(command).run(args)
    except (InputError, CheckpointError, TrainingError) as e:
        return fail(e)
    except OSError as e:  # a path that is missing, a directory, unreadable, too long, ...
        return fail(f"{e.strerror or e}: {e.filename or ''}".rstrip(": "))
    except MemoryError as e:  # sizes too large for this machine
        return fail(f"out of memory ({str(e) or 'no detail'}); choose smaller sizes")
    except KeyboardInterrupt:
        print(f"rnnfuse {command}: interrupted", file=sys.stderr)
        return 130


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
    return _run(args.command, args)


if __name__ == "__main__":
    sys.exit(main())
