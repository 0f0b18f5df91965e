"""Command line: ``python -m tiedlora_kernels demo|serve [flags]``, also installed as ``tiedlora``."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``tiedlora`` / ``python -m tiedlora_kernels``. Returns the exit status."""
    parser = argparse.ArgumentParser(prog="tiedlora", description="tiedlora-kernels command line")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from .demo.run import __doc__ as demo_doc, add_arguments
    from .demo.serve import __doc__ as serve_doc, add_arguments as add_serve_arguments

    demo = sub.add_parser("demo", help="fine-tune a small LM with every preset (LoRA, VeRA, TL1..TL6 and the variants) and compare them",
                          description=demo_doc.split("\n\n")[0])
    add_arguments(demo)
    serve = sub.add_parser("serve", help="several adapters trained on different tasks answer one mixed batch",
                           description=serve_doc.split("\n\n")[0])
    add_serve_arguments(serve)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.command == "serve":
        from .demo.serve import run_serve

        return run_serve(args)
    from .demo.run import run_demo

    run_demo(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
