"""The ``sparseq`` command line (also ``python -m sparseq``).

Subcommands register themselves in ``COMMANDS``; each module adds its own parser so the
CLI grows with the package without one file knowing every option.
"""
from __future__ import annotations

import argparse
import platform
import sys
from typing import Callable, Dict, List, Optional

COMMANDS: Dict[str, Callable[[argparse._SubParsersAction], None]] = {}


def command(name: str):
    """Register ``fn(subparsers)`` that adds the parser for subcommand ``name``."""

    def deco(fn):
        COMMANDS[name] = fn
        return fn

    return deco


@command("info")
def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="versions, GPU and which backends loaded")
    p.set_defaults(func=run_info)


def run_info(args: argparse.Namespace) -> int:
    import torch

    import sparseq

    print(f"sparseq   {sparseq.__version__} (format version {sparseq.FORMAT_VERSION})")
    print(f"python    {platform.python_version()} on {platform.machine()}")
    print(f"torch     {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    try:
        import triton

        print(f"triton    {triton.__version__}")
    except ImportError:
        print("triton    not installed")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            print(f"gpu {i}     {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]})")
    else:
        print("gpu       none")
    for name, status in sparseq.kernels_available().items():
        mark = "yes" if status.available else "no "
        print(f"backend   {name:<13} {mark}  {status.reason}")
    return 0


PLUGINS = ("sparseq.demo", "sparseq.compress.cli", "sparseq.tune", "sparseq.benchmarks.cli")
"""Modules that add subcommands when imported; a plugin that is not there is skipped."""


def _load_plugins() -> None:
    import importlib

    for module in PLUGINS:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if not (e.name and module.startswith(e.name)):
                raise


def build_parser() -> argparse.ArgumentParser:
    _load_plugins()
    parser = argparse.ArgumentParser(prog="sparseq", description="2:4 sparse and int8 models that run fast")
    sub = parser.add_subparsers(dest="command", metavar="command")
    for add in COMMANDS.values():
        add(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
