"""``stadi-plan``: print the STADI plan (or its JSON) for given speeds or GPU models.

Example::

    stadi-plan --speeds 1,0.5 --height 1024 --patch-size 2 --vae-scale 8 --steps 20 --warmup 2 --mode full
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Callable, Sequence

from ..cli_errors import OneLineArgumentParser, stdout_guard  # pure standard library, like this package
from .gpus import parse_gpu_list, relative_speeds
from .plan_types import MODES, Plan
from .planning import plan
from .validation import MIN_RELATIVE_SPEED

# Planner arguments named in a ValueError -> the flag the user typed ("speeds" is set per call).
_FLAG_FOR_ARGUMENT = {
    "rows": "--height",
    "align": "--align",
    "num_steps": "--steps",
    "warmup_steps": "--warmup",
    "max_stride": "--max-stride",
    "tolerance": "--tolerance",
    "sync_seconds": "--sync-seconds",
    "exchange_seconds": "--exchange-seconds",
    "step_overhead_seconds": "--step-overhead-seconds",
}
# With MIN_RELATIVE_SPEED, a bound that keeps every predicted time finite, so the table never shows
# inf/nan and --json stays strict JSON: cost terms far beyond a real run.
MAX_COST_SECONDS = 1e6  # --sync-seconds, --exchange-seconds, --step-overhead-seconds (~11 days)
_COST_FLAGS = ("--sync-seconds", "--exchange-seconds", "--step-overhead-seconds")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``stadi-plan``; bad input exits 2 with one ``stadi-plan: error: ...`` line naming the flag, an
    output that cannot be written exits 1 with one line."""
    with stdout_guard("stadi-plan"):
        return _plan_command(argv)


def _plan_command(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parse_checked(parser, argv)
    speeds = args.speeds if args.speeds is not None else relative_speeds(args.gpus)
    rows = _latent_rows(parser, args)
    _check_costs(parser, args)
    speeds_flag = "--speeds" if args.speeds is not None else "--gpus"
    try:
        result = plan(
            speeds,
            rows=rows,
            align=args.align,
            num_steps=args.steps,
            warmup_steps=args.warmup,
            mode=args.mode,
            max_stride=args.max_stride,
            tolerance=args.tolerance,
            sync_seconds=args.sync_seconds,
            exchange_seconds=args.exchange_seconds,
            step_overhead_seconds=args.step_overhead_seconds,
            warmup_speeds_known=args.warmup_speeds_known,
        )
    except ValueError as error:
        parser.error(_blame_flag(str(error), speeds_flag=speeds_flag))
    except ArithmeticError:  # subnormal speeds: rows / speed overflows, and 1 / inf then divides by zero
        parser.error(_not_finite(speeds_flag, rows, args.steps, speeds))
    if not _finite_prediction(result):
        parser.error(_not_finite(speeds_flag, rows, args.steps, speeds))
    if args.json:
        print(result.to_json())
        return 0
    print(result.explain())
    if args.gpus is not None:
        print("note: --gpus speeds are datasheet ratios (fastest = 1), so times are in relative units")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog="stadi-plan", description="Plan STADI bands and strides.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--speeds", type=_speed_list, help="per-rank throughput, e.g. 1,0.5 (rows/s)")
    source.add_argument("--gpus", type=_gpu_list, help="GPU models, e.g. A100x2,RTX3090x2 (datasheet ratios)")
    parser.add_argument("--height", type=int, required=True, help="image height in pixels")
    parser.add_argument("--width", type=int, help="image width in pixels (does not affect rows)")
    parser.add_argument("--patch-size", type=int, default=2, help="DiT patch size (default 2)")
    parser.add_argument("--vae-scale", type=int, default=8, help="VAE downsampling factor (default 8)")
    parser.add_argument("--align", type=int, default=1, help="band granularity in token rows (default 1)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps T (default 20)")
    parser.add_argument("--warmup", type=int, default=2, help="synchronous warmup steps W (default 2)")
    parser.add_argument("--mode", choices=MODES, default="full", help="planner mode (default full)")
    parser.add_argument("--max-stride", type=int, default=2, help="largest stride (default 2)")
    parser.add_argument("--tolerance", type=float, default=0.02, help="relative latency slack (default 0.02)")
    parser.add_argument("--sync-seconds", type=float, default=0.0, help="cost of one sync point")
    parser.add_argument("--exchange-seconds", type=float, default=0.0, help="K/V exchange cost per period")
    parser.add_argument("--step-overhead-seconds", type=float, default=0.0, help="fixed cost per step")
    parser.add_argument(
        "--warmup-speeds-known",
        action="store_true",
        help="speeds were known before the run, so warmup used elastic bands",
    )
    parser.add_argument("--json", action="store_true", help="print Plan.to_json() instead of the table")
    return parser


def parse_checked(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, refusing ``--flag=--``, ``-f=--`` and ``-f--`` first: Python 3.11's
    argparse turns an attached ``--`` value into an empty list without calling the flag's type."""
    for token in sys.argv[1:] if argv is None else argv:
        long_flag, equals, value = token.partition("=")
        if token.startswith("--") and equals and value == "--":
            parser.error(f"argument {long_flag}: expected one argument")
        if token[:1] == "-" and token[1:2] not in ("", "-") and token[2:] in ("--", "=--"):
            parser.error(f"argument {token[:2]}: expected one argument")
    return parser.parse_args(argv)


def parse_numbers(
    text: str, kind: Callable[[str], float] = float, example: str = "1,0.5"
) -> tuple[float, ...]:
    """``"1, 0.5"`` -> ``(1.0, 0.5)``: finite numbers of ``kind`` (float or int), else ``ValueError``.

    Shared by the comma-separated flags of ``stadi-plan`` and ``stadi-bench`` (speeds, cores, scenarios);
    callers check ranges. nan/inf are rejected here: no list of these tools has a use for them.
    """
    try:
        values = tuple(kind(item) for item in text.split(","))
    except ValueError:  # also int("1" * 5000): over Python's digit limit
        values = None
    if values is None or any(isinstance(value, float) and not math.isfinite(value) for value in values):
        raise ValueError(f"expected comma-separated finite numbers like {example}, got {text!r}")
    return values


def _speed_list(text: str) -> tuple[float, ...]:
    try:
        values = parse_numbers(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    # Speeds <= 0 are left to the planner, whose message names the rank.
    if min(values) > 0 and min(values) < MIN_RELATIVE_SPEED * max(values):
        raise argparse.ArgumentTypeError(
            f"each speed must be >= {MIN_RELATIVE_SPEED:g} x the fastest, got {text!r}")
    return values


def _check_costs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Cost flags above MAX_COST_SECONDS; nan/inf/negative are left to the planner's message."""
    for flag in _COST_FLAGS:
        value = getattr(args, flag.removeprefix("--").replace("-", "_"))
        if math.isfinite(value) and value > MAX_COST_SECONDS:
            parser.error(f"argument {flag}: must be <= {MAX_COST_SECONDS:g} seconds, got {value:g}")


def _finite_prediction(result: Plan) -> bool:
    """Whether every predicted time is finite: tiny absolute speeds (1e-308 rows/s) overflow to inf."""
    predicted = result.predicted
    times = (predicted.total_seconds, predicted.warmup_seconds, predicted.uniform_total_seconds,
             predicted.speedup_vs_uniform, *predicted.busy_seconds, *predicted.idle_seconds)
    return all(math.isfinite(value) for value in times)


def _not_finite(speeds_flag: str, rows: int, steps: int, speeds: Sequence[float]) -> str:
    return (f"argument {speeds_flag}: the predicted latency is not a finite number of seconds (speeds too "
            f"small for {rows} rows x {steps} steps), got {','.join(f'{speed:g}' for speed in speeds)}")


def _gpu_list(text: str) -> tuple[str, ...]:
    try:
        return parse_gpu_list(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error).removeprefix("gpus: ")) from None


def _latent_rows(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    for flag, value in (
        ("--height", args.height),
        ("--width", args.width if args.width is not None else 1),
        ("--patch-size", args.patch_size),
        ("--vae-scale", args.vae_scale),
    ):
        if value < 1:
            parser.error(f"argument {flag}: must be >= 1, got {value}")
    pixels_per_row = args.vae_scale * args.patch_size
    if args.height % pixels_per_row:
        parser.error(
            f"argument --height: must be a multiple of vae-scale*patch-size = {pixels_per_row}, "
            f"got {args.height}"
        )
    return args.height // pixels_per_row


def _blame_flag(message: str, *, speeds_flag: str) -> str:
    """Prefix a planner error with the flag behind the argument it names (``speeds[1] ...`` -> --speeds)."""
    argument = re.match(r"[a-z_]*", message).group()
    flag = {**_FLAG_FOR_ARGUMENT, "speeds": speeds_flag}.get(argument)
    if flag == "--height":
        message += " (rows = height / vae-scale / patch-size)"
    return f"argument {flag}: {message}" if flag else message


if __name__ == "__main__":
    raise SystemExit(main())
