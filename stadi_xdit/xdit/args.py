"""STADI's flags and configs inside xDiT: `StadiArgs(xFuserArgs)` and `StadiEngineConfig(EngineConfig)`.

Where STADI sits in xDiT's degree tuple: on the data-parallel slot. xDiT's data-parallel ranks
already hold full model replicas and exchange nothing, and `initialize_model_parallel` builds the
dp group as exactly the ranks that share a CFG branch ("tp-sp-pp-cfg-dp" order), which is the
STADI group. So a STADI run is `dp_degree = world / cfg_degree` and xDiT's product rule holds
without touching `ParallelConfig`; the plugin only refuses degrees it cannot compose with.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field

from xfuser.config import EngineConfig, xFuserArgs

from stadi_xdit.config import MODES, StadiConfig


@dataclass(frozen=True)
class StadiEngineConfig(EngineConfig):
    """xDiT's engine config plus the STADI settings; STADI pipelines read `stadi_config`."""

    stadi_config: StadiConfig = field(default_factory=StadiConfig)


def add_stadi_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add `--use_stadi` and `--stadi_*` to an xDiT parser (underscore style, like xDiT's own).

    Idempotent: xDiT's own `add_cli_args` may already have added them (the CLI hook, or the
    upstream plugin loop), and argparse refuses a second definition.
    """
    if "--use_stadi" in parser._option_string_actions:
        return parser
    group = parser.add_argument_group("STADI (heterogeneity-aware patch parallelism)")
    group.add_argument("--use_stadi", action="store_true",
                       help="Run STADI on the ranks of each CFG branch (replaces data parallelism).")
    group.add_argument("--stadi_mode", type=str, default="full", choices=MODES,
                       help="uniform: equal bands (patch parallelism); spatial: bands by speed; "
                            "full: bands by speed x stride and fewer steps on slow ranks.")
    group.add_argument("--stadi_exact", action="store_true",
                       help="Every step synchronous with stride 1: output equals one process.")
    group.add_argument("--stadi_max_stride", type=int, default=2, help="Largest step stride of a slow rank.")
    group.add_argument("--stadi_tolerance", type=float, default=0.02,
                       help="Accept a predicted slowdown this large for a smaller sync period.")
    group.add_argument("--stadi_speeds", type=str, default=None,
                       help="Comma-separated relative speeds per rank; skips measurement.")
    group.add_argument("--stadi_emulate_slowdown", type=str, default=None,
                       help="Testing aid: comma-separated slowdown factor per rank (1 = full speed).")
    group.add_argument("--stadi_profile_cache", type=str, default=None,
                       help="JSON file to store and reuse measured speeds.")
    group.add_argument("--stadi_timeout", type=float, default=600.0,
                       help="Seconds before a stalled peer makes the run fail.")
    return parser


def _stadi_config_from(args: StadiArgs) -> StadiConfig:
    return StadiConfig(
        use_stadi=args.use_stadi, mode=args.stadi_mode, exact=args.stadi_exact,
        max_stride=args.stadi_max_stride, tolerance=args.stadi_tolerance, speeds=args.stadi_speeds,
        emulate_slowdown=args.stadi_emulate_slowdown, profile_cache=args.stadi_profile_cache,
        timeout_seconds=args.stadi_timeout)


def validate_degrees(args: xFuserArgs, world_size: int) -> int:
    """The STADI degree (ranks per CFG branch), or a one-line error naming the flag."""
    for flag, value in (("--ulysses_degree", args.ulysses_degree), ("--ring_degree", args.ring_degree),
                        ("--pipefusion_parallel_degree", args.pipefusion_parallel_degree),
                        ("--tensor_parallel_degree", args.tensor_parallel_degree),
                        ("--data_parallel_degree", args.data_parallel_degree)):
        if value not in (None, 1):
            raise ValueError(f"{flag} {value} cannot be combined with --use_stadi "
                             "(STADI uses every rank of a CFG branch)")
    if args.use_fast_attn:
        raise ValueError("--use_fast_attn cannot be combined with --use_stadi")
    dit_world = world_size - (args.vae_parallel_size or 0)
    cfg = 2 if args.use_cfg_parallel else 1
    if dit_world < cfg or dit_world % cfg:
        raise ValueError(f"world size {dit_world} must be a multiple of {cfg} with --use_cfg_parallel")
    return dit_world // cfg


@dataclass
class StadiArgs(xFuserArgs):
    """xFuserArgs plus STADI's fields; `from_cli_args` picks them up through dataclass fields."""

    use_stadi: bool = False
    stadi_mode: str = "full"
    stadi_exact: bool = False
    stadi_max_stride: int = 2
    stadi_tolerance: float = 0.02
    stadi_speeds: str | None = None
    stadi_emulate_slowdown: str | None = None
    stadi_profile_cache: str | None = None
    stadi_timeout: float = 600.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.stadi_speeds, (list, tuple)):
            self.stadi_speeds = ",".join(str(v) for v in self.stadi_speeds)
        if isinstance(self.stadi_emulate_slowdown, (list, tuple)):
            self.stadi_emulate_slowdown = ",".join(str(v) for v in self.stadi_emulate_slowdown)
        self.stadi = _stadi_config_from(self)  # validates every --stadi_* value now

    @staticmethod
    def add_cli_args(parser):
        xFuserArgs.add_cli_args(parser)
        return add_stadi_cli_args(parser)

    def validate(self, world_size: int | None = None) -> int:
        """Check the flags against the launch size before any process group exists."""
        if world_size is None:
            world_size = int(os.environ.get("WORLD_SIZE", "1"))
        degree = validate_degrees(self, world_size)
        self.stadi.check_world(degree)
        if self.height % 16 or self.width % 16:
            raise ValueError(f"--height/--width must be multiples of 16 px with --use_stadi, "
                             f"got {self.height}x{self.width}")
        return degree

    def create_config(self):
        if not self.use_stadi:
            return super().create_config()
        # STADI occupies the data-parallel slot (see module docstring).
        self.data_parallel_degree = self.validate()
        try:
            engine_config, input_config = super().create_config()
        finally:
            self.data_parallel_degree = 1
        fields = {f.name: getattr(engine_config, f.name) for f in dataclasses.fields(EngineConfig)}
        return StadiEngineConfig(**fields, stadi_config=self.stadi), input_config
