"""The `sana` command: a thin layer over the library. Errors a user can cause are one line on stderr."""

from __future__ import annotations

import argparse
import sys

from sana import __version__
from sana.errors import SanaError

EXIT_USAGE = 2


def _cmd_convert(args: argparse.Namespace) -> int:
    from sana.weights.load import AUTOENCODER, TRANSFORMER, convert

    kind = {"auto": None, "transformer": TRANSFORMER, "autoencoder": AUTOENCODER}[args.kind]
    config = args.preset
    if config is not None and kind is None:
        raise SanaError("--preset needs --kind transformer or --kind autoencoder")
    out = convert(args.src, args.dst, to=args.to, kind=kind, config=config)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sana",
        description="Sana text-to-image: generate, convert, train and serve.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sana {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "convert",
        help="rewrite a transformer or DC-AE checkpoint in another layout",
        description="Convert a checkpoint between layouts: native (one .safetensors with its config), diffusers "
        "(a folder) and original (NVlabs/efficientvit keys; .pth or .safetensors).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("src", help="diffusers folder, original .pth/.safetensors, or native .safetensors")
    p.add_argument("dst", help="output: a .safetensors file (native/original), a .pth (original) or a folder")
    p.add_argument("--to", choices=("native", "diffusers", "original"), default="native", help="output layout")
    p.add_argument(
        "--kind", choices=("auto", "transformer", "autoencoder"), default="auto", help="what the checkpoint holds"
    )
    p.add_argument(
        "--preset", default=None, help="architecture preset to use instead of inferring it (e.g. sana-1600m-1024)"
    )
    p.set_defaults(func=_cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return args.func(args)
    except SanaError as e:
        print(f"sana {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"sana {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
