"""Command line: ``python -m tiedlora_kernels demo [flags]``, also installed as ``tiedlora demo``."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``tiedlora`` / ``python -m tiedlora_kernels``. Returns the exit status."""
    parser = argparse.ArgumentParser(prog="tiedlora", description="tiedlora-kernels command line")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from .demo.run import __doc__ as demo_doc, add_arguments

    demo = sub.add_parser("demo", help="fine-tune a small LM with LoRA, VeRA and TL1..TL6 and compare them",
                          description=demo_doc.split("\n\n")[0])
    add_arguments(demo)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    from .demo.run import run_demo

    run_demo(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
