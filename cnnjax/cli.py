"""The ``cnnjax`` command line: a thin layer over library functions.

Each subcommand parses its flags and calls one importable function, so a
notebook gets the same result as the shell. Heavy imports (jax, flax) happen
inside the subcommands, so ``cnnjax --help`` answers at once.
"""

from __future__ import annotations

import argparse
import sys


def _cmd_shape(args: argparse.Namespace) -> int:
    from cnnjax.shapes import ShapeError, conv_output_size, effective_kernel_size

    padding = args.padding
    if padding.upper() in ("SAME", "VALID"):
        pad_value: int | str = padding.upper()
    else:
        try:
            pad_value = int(padding)
        except ValueError:
            print(f"error: --padding must be an integer, SAME or VALID, got {padding!r}.",
                  file=sys.stderr)
            return 2
    try:
        out = conv_output_size(
            args.size, args.kernel, args.stride, pad_value, args.dilation,
            exact=not args.floor, name="shape",
        )
    except (ShapeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    f_eff = effective_kernel_size(args.kernel, args.dilation)
    if isinstance(pad_value, str):
        from cnnjax.shapes import same_padding

        lo, hi = (0, 0) if pad_value == "VALID" else same_padding(
            args.size, args.kernel, args.stride, args.dilation)
        pad_text = f"{lo}+{hi}"
    else:
        pad_text = f"2*{pad_value}"
    f_text = str(args.kernel) if args.dilation == 1 else (
        f"{f_eff} (= {args.dilation}*({args.kernel}-1)+1)")
    division = "//" if args.floor else "/"
    print(f"(W - F + 2P) {division} S + 1 = ({args.size} - {f_text} + {pad_text}) {division} "
          f"{args.stride} + 1 = {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cnnjax",
        description="Classic convolutional networks in JAX/Flax: train, evaluate, inspect.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    shape = sub.add_parser(
        "shape", aliases=["shapes"],
        help="output size of a conv/pool layer: (W - F + 2P) / S + 1",
        description="Output size of a convolution or pooling layer along one dimension.",
    )
    shape.add_argument("--size", type=int, required=True, help="input size W")
    shape.add_argument("--kernel", type=int, required=True, help="filter size F")
    shape.add_argument("--stride", type=int, default=1, help="stride S (default 1)")
    shape.add_argument("--padding", default="0", help="zero padding P per side, SAME or VALID")
    shape.add_argument("--dilation", type=int, default=1, help="dilation D (default 1)")
    shape.add_argument("--floor", action="store_true",
                       help="floor an inexact division (TensorFlow/PyTorch) instead of failing")
    shape.set_defaults(func=_cmd_shape)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
