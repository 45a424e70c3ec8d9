"""Command line: ``python -m rnnfuse <command>``."""
import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="rnnfuse", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("config", help="print the build and runtime configuration")
    sub.add_parser("bench", help="time the kernels against the NumPy reference and peers",
                   add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "config":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        from . import show_config
        show_config()
        return 0
    from . import bench
    return bench.main(rest)


if __name__ == "__main__":
    sys.exit(main())
