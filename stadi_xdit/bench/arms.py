"""The arms of ``stadi-bench`` and the job that runs one arm on its own ranks.

One *job* per arm: ``run_distributed`` spawns the arm's ranks (1 for ``single``, N otherwise), each
pinned to its core; they build the pipeline once, connect back to the controller and then run one
pipeline call per ``run`` command. Jobs stay alive (blocked on a socket, using no CPU) while the
other arms run, so the controller can interleave arms (A B C A B C ...) with one build and one
warm-up per arm. Separate processes per arm are required: xDiT's process groups are global per
process (``initialize_model_parallel`` runs once), and each arm needs another degree tuple.
"""

from __future__ import annotations

import functools
import os
import secrets
import threading
import time
import traceback
from multiprocessing.connection import Client, Listener
from types import SimpleNamespace

import torch

from stadi_xdit.bench.catalog import ARMS, Arm
from stadi_xdit.bench.presets import BenchPreset, get_preset
from stadi_xdit.geometry import PATCH_SIZE, VAE_SCALE
from stadi_xdit.runtime.profile import work_clock
from stadi_xdit.topology import Topology


def skip_reason(arm: Arm, preset: BenchPreset, height: int, world: int, steps: int, warmup: int,
                pipefusion_patches: int | None = None) -> str | None:
    """Why ``arm`` cannot run this shape (None when it can)."""
    latent_rows = height // VAE_SCALE
    units, unit = preset.band_units(height), preset.band_unit  # token rows, or latent frames of a clip
    if height % (VAE_SCALE * PATCH_SIZE):
        return f"height {height} is not a multiple of {VAE_SCALE * PATCH_SIZE} px"
    if arm.cache and arm.cache not in preset.step_caches:
        return f"xDiT has no in-tree {arm.cache} for {preset.family} (only for {', '.join(_cached_families())})"
    if arm.kind == "single":
        return None
    if world < 2:
        return "needs at least 2 ranks"
    if arm.kind == "stadi":
        if _stadi_pipeline_class(preset) is None:
            return f"no STADI pipeline for {preset.family} ({preset.variant}) in stadi_xdit.models"
        if units < world:
            return f"{units} {unit}s < {world} ranks"
        if not 1 <= warmup < steps:
            return f"STADI needs 1 <= warmup ({warmup}) < steps ({steps})"
        if arm.ulysses > 1:
            return _grouped_skip_reason(arm.ulysses, preset, world)
        return None
    runner = preset.xdit_runner_transformer
    if runner and arm.name not in ("ulysses", "ring"):
        return (f"xfuser 0.7.0 serves {preset.family} only through its runner ({runner.rpartition('.')[2]} in the "
                f"diffusers pipeline): Ulysses/Ring, no {arm.name}")
    if not runner and arm.name in ("ulysses", "ring") and latent_rows % (PATCH_SIZE * world):
        return f"latent height {latent_rows} is not a multiple of patch {PATCH_SIZE} x {world} ranks"
    if arm.name == "ulysses" and preset.heads % world:
        return f"{preset.heads} attention heads are not divisible by {world} ranks"
    if arm.name == "pipefusion":
        patches = pipefusion_patches or world
        if preset.layers < world:
            return f"{preset.layers} transformer blocks < {world} pipeline stages"
        if units < patches:
            return f"{units} {unit}s < {patches} pipeline patches"
    return None


def _grouped_skip_reason(ulysses: int, preset: BenchPreset, world: int) -> str | None:
    """Why STADI over groups of `ulysses` ranks cannot run this shape (None when it can; any number of rows
    can: the last group computes the rows past the plan's whole units)."""
    if world % ulysses or world == ulysses:
        return f"{world} ranks do not make two or more groups of {ulysses} Ulysses ranks"
    if preset.heads % ulysses:
        return f"{preset.heads} attention heads are not divisible by Ulysses {ulysses}"
    if preset.video:
        return "grouped arms run image presets only"
    return None


def member_factors(per_rank: str | None, ulysses: int) -> str | None:
    """`--stadi_emulate_slowdown`/`--stadi_emulate_shift` factors per rank as one per STADI member (a group of
    `ulysses` consecutive ranks): the group runs at its slowest rank's pace, so the largest of its factors."""
    if per_rank is None or ulysses == 1:
        return per_rank
    step, _, text = per_rank.rpartition(":")
    factors = [float(k) for k in text.split(",")]
    grouped = [max(factors[i:i + ulysses]) for i in range(0, len(factors), ulysses)]
    return (f"{step}:" if step else "") + ",".join(f"{k:g}" for k in grouped)


def _cached_families() -> list[str]:
    from stadi_xdit.bench.presets import bench_presets

    return sorted({p.family for p in bench_presets().values() if p.step_caches})


def _stadi_pipeline_class(preset: BenchPreset):
    """STADI's pipeline class for a preset (the twin of its xFuser wrapper), or None where the plugin has none."""
    from stadi_xdit.registry import twin_for

    return twin_for(preset.xdit_wrapper)


# --------------------------------------------------------------------------------------------
# inside a rank


class ArmForwardHooks:
    """Forward hooks on the transformer: time every forward and, with a factor > 1, slow it down.

    Compute time ``c`` of a forward is the calling thread's CPU time on CPU (ranks run single-threaded,
    and collectives block without burning that thread's CPU, so communication waits drop out), or the
    wall time after a device synchronize on CUDA (there it includes waits inside the forward). The
    slowdown rule is STADI's ``--stadi_emulate_slowdown`` rule: after the forward, sleep ``(k-1)*c``.
    ``schedule`` = (k before, k after, first step of 'after' or None): the denoising step of a forward
    is counted by its ``timestep`` argument (a new value starts a step; PipeFusion's patches share one).
    """

    def __init__(self, module: torch.nn.Module, schedule: tuple[float, float, int | None] = (1.0, 1.0, None),
                 cuda: bool = False):
        self.schedule = schedule
        self._clock = work_clock(torch.device("cuda" if cuda else "cpu"))
        self.records: list[tuple[float, float, float, float]] = []  # wall start, wall end, compute, slept
        self._start = (0.0, 0.0)
        self._step, self._timestep = -1, None
        self._handles = [module.register_forward_pre_hook(self._pre, with_kwargs=True),
                         module.register_forward_hook(self._post)]

    def _pre(self, module, args, kwargs) -> None:
        timestep = kwargs.get("timestep")
        value = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) and timestep.numel() else timestep
        if value != self._timestep or value is None:
            self._step, self._timestep = self._step + 1, value
        self._start = (time.perf_counter(), self._clock())

    def _post(self, module, args, output) -> None:
        compute = self._clock() - self._start[1]
        before, after, at_step = self.schedule
        factor = after if at_step is not None and self._step >= at_step else before
        slept = max(0.0, (factor - 1.0) * compute)
        if slept > 0:
            time.sleep(slept)
        self.records.append((self._start[0], time.perf_counter(), compute, slept))

    def reset(self) -> None:
        self.records = []
        self._step, self._timestep = -1, None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class _RunnerPipeline:
    """xDiT as xfuser's runner serves a family it has no pipeline wrapper for (Wan2.1-T2V): the diffusers
    pipeline with the runner's sequence-parallel transformer (``preset.xdit_runner_transformer``), same weights."""

    def __init__(self, base, engine_config, transformer_path: str):
        import importlib

        from xfuser.core.distributed import initialize_runtime_state

        module, _, name = transformer_path.rpartition(".")
        source = base.transformer
        transformer = getattr(importlib.import_module(module), name).from_config(source.config)
        transformer.load_state_dict(source.state_dict())
        transformer = transformer.to(source.device)
        if source.dtype != transformer.dtype:  # as the base pipeline was cast (diffusers warns on a no-op cast)
            transformer = transformer.to(source.dtype)
        base.transformer = transformer.eval()
        initialize_runtime_state(base, engine_config)  # as the runner: after the model parallel groups
        self.module = base

    def __call__(self, **kwargs):
        return self.module(**kwargs)


class _FramesAsImages:
    """A video pipeline as the bench calls it: its output's ``.images`` is the latent clip (``.frames``)."""

    def __init__(self, pipe):
        self.pipe = pipe

    def __call__(self, **kwargs):
        output = self.pipe(**kwargs)
        return None if output is None else SimpleNamespace(images=output.frames)

    def __getattr__(self, name: str):  # last_result, kv_store, module, ... of the wrapped pipeline
        return getattr(self.pipe, name)


def _build(setup: dict, rank: int, world: int):
    """(callable pipeline, transformer module, is_stadi) for this rank of the arm."""
    from stadi_xdit.bench.presets import build_pipeline

    preset = get_preset(setup["preset"], num_frames=setup.get("num_frames"))
    arm = ARMS[setup["arm"]]
    dtype = getattr(torch, setup["dtype"])
    base = build_pipeline(preset, seed=setup["seed"])
    base.set_progress_bar_config(disable=True)
    if setup["device"] == "cuda":  # untested here (no GPU): rank i on cuda:i
        torch.cuda.set_device(rank)
        base = base.to(f"cuda:{rank}", dtype)
    if arm.kind == "single":
        if arm.compiled:
            from stadi_xdit.runtime.compile import compile_blocks

            compile_blocks(base.transformer)
        if arm.cache:
            from xfuser import xFuserArgs
            from xfuser.core.distributed import initialize_model_parallel

            # xDiT's groups of one process, as its runner makes them on one GPU: its cache reads them.
            xFuserArgs(**_xdit_call_args(setup, preset)).create_config()
            initialize_model_parallel()
            _apply_step_cache(base.transformer, arm.cache, setup)
        return (_FramesAsImages(base) if preset.video else base), base.transformer
    common = _xdit_call_args(setup, preset)
    if arm.kind == "stadi":
        from stadi_xdit.xdit.args import StadiArgs

        # Optional setup keys (no bench flag sets them yet): the stale K/V dtype and the exchange group size.
        args = StadiArgs(use_stadi=True, stadi_mode=arm.mode or arm.name, stadi_replan=arm.replan,
                         stadi_emulate_slowdown=member_factors(setup["emulate"], arm.ulysses),
                         stadi_emulate_shift=member_factors(setup.get("emulate_shift"), arm.ulysses),
                         stadi_max_stride=setup["max_stride"], stadi_profile_cache=setup["profile_cache"],
                         stadi_kv_dtype=setup.get("kv_dtype") or "auto", use_torch_compile=arm.compiled,
                         ulysses_degree=arm.ulysses, **common)
        cls = _stadi_pipeline_class(preset)
        args.stadi_pipeline_class = cls  # checks follow the family (a Wan clip's rows, not the frame's)
    else:
        import xfuser
        from xfuser import xFuserArgs

        degrees = Topology.for_stadi_degree(world).xdit_degrees(arm.name, setup["pipefusion_patches"])
        if arm.name == "ring":
            degrees["attention_backend"] = "SDPA_FLASH"  # Ring merges partial attention by LSE, which it returns
        args = xFuserArgs(**common, **degrees)
        runner = preset.xdit_runner_transformer
        if runner:
            cls = functools.partial(_RunnerPipeline, transformer_path=runner)
        else:
            cls = getattr(xfuser, preset.xdit_wrapper)
    engine_config, _ = args.create_config()
    engine_config.runtime_config.dtype = dtype
    pipe = cls(base, engine_config)
    if arm.kind == "stadi" and setup.get("kv_group_layers"):
        pipe.kv_store.configure(group_layers=int(setup["kv_group_layers"]))
    if arm.cache:  # as xDiT's runner: after compiling; STADI then steers the cache
        _apply_step_cache(pipe.module.transformer, arm.cache, setup)
        pipe.attach_step_cache()
    return (_FramesAsImages(pipe) if preset.video else pipe), pipe.module.transformer


def _xdit_call_args(setup: dict, preset: BenchPreset) -> dict:
    """The call's size and steps as xDiT's args take them."""
    common = {"model": preset.name, "height": setup["height"], "width": preset.width(setup["height"]),
              "num_inference_steps": setup["steps"], "warmup_steps": setup["warmup"]}
    if preset.video:
        common["num_frames"] = preset.clip_frames
    return common


def _apply_step_cache(transformer: torch.nn.Module, method: str, setup: dict) -> None:
    """xDiT's in-tree `method` on `transformer`, as its runner applies `--cache_method` (its default threshold
    unless the setup names one: `--cache-threshold`)."""
    import json

    from xfuser.model_executor.cache.adapters import apply_cache

    threshold = setup.get("cache_threshold")
    apply_cache(method, num_steps=setup["steps"], pipe=None, transformer=transformer,
                cache_config=None if threshold is None else json.dumps({"residual_diff_threshold": threshold}))


def served_forwards_counter(transformer: torch.nn.Module) -> list[int] | None:
    """A one-item counter of the transformer's forwards that its step cache served (None without a cache)."""
    from stadi_xdit.xdit.step_cache import XditStepCache

    cache = XditStepCache.find(transformer)
    if cache is None:
        return None
    served = [0]
    transformer.register_forward_hook(lambda *_: served.__setitem__(0, served[0] + cache.last_forward_cached()))
    return served


def reset_peak_memory(device: str) -> None:
    """Start a new peak-memory window for this process (best effort on CPU: Linux resets VmHWM)."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # "5": reset the peak resident set size (Linux >= 4.0)
    except OSError:
        pass  # then the peak is the process's lifetime peak (model construction included)


def peak_memory_bytes(device: str) -> int | None:
    """Peak memory of this rank since the last reset: CUDA allocator bytes, or on CPU the peak
    resident set size (VmHWM; ru_maxrss where /proc is missing)."""
    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)
    except (ImportError, OSError):
        return None


def _timeline_dict(result, run_start: float) -> dict:
    """A STADI ``DenoiseResult`` reduced to plain data, times relative to the barrier release."""
    timeline = result.timeline
    offset = timeline.origin - run_start
    return {
        "plan": result.plan.to_json(),
        "warmup_plan": result.warmup_plan.to_json(),
        "explain": result.plan.explain(),
        "measured_speeds": result.measured_speeds,
        "num_evals": result.num_evals,
        "busy_seconds": timeline.busy_seconds(),
        "steps": [{"phase": s.phase, "base_step": s.base_step, "start": s.start + offset, "end": s.end + offset,
                       "wait": s.wait, "emulated": s.emulated} for s in timeline.steps],
        "phases": [{"label": label, "start": start + offset, "end": end + offset}
                   for label, start, end in timeline.phases],
        "steps_rows": [s.rows for s in timeline.steps],
        "costs": result.costs.to_json() if result.costs else None,
        "exchange": result.kv_exchange,
        "replans": [event.to_json() for event in result.replans],
        "settle_reasons": result.settle_reasons,
    }


def _call_kwargs(setup: dict, rank: int, steps: int) -> dict:
    from stadi_xdit.bench.presets import call_kwargs

    preset = get_preset(setup["preset"], num_frames=setup.get("num_frames"))
    device = f"cuda:{rank}" if setup["device"] == "cuda" else "cpu"
    return call_kwargs(preset, setup["height"], steps, setup["seed"], device, getattr(torch, setup["dtype"]))


def warm_compiled_arm(setup: dict, pipe, world: int, is_stadi: bool, rank: int) -> dict:
    """A compiled arm's untimed first call, as xDiT's runner makes it before timing: it compiles. STADI runs its
    own (the pipeline's `compile_warmup()`: warmup and displaced steps, not remembered as speed); the single rank
    the whole call.
    Returns its seconds and the graphs dynamo compiled in it."""
    import torch.distributed as dist

    from stadi_xdit.runtime.compile import compiled_graphs

    if world > 1:
        dist.barrier()
    graphs, start = compiled_graphs(), time.perf_counter()
    if is_stadi:
        with pipe.compile_warmup():
            pipe(**_call_kwargs(setup, rank, pipe.compile_warmup_steps(setup["steps"])))
    else:
        pipe(**_call_kwargs(setup, rank, setup["steps"]))
    if setup["device"] == "cuda":
        torch.cuda.synchronize()
    return {"warmup_seconds": time.perf_counter() - start, "warmup_graphs": compiled_graphs() - graphs,
            "graphs": compiled_graphs()}


def _run_once(setup: dict, pipe, timer: ArmForwardHooks, world: int, is_stadi: bool, rank: int, conn,
              compiled: dict | None = None, served: list[int] | None = None) -> dict:
    import torch.distributed as dist

    kwargs = _call_kwargs(setup, rank, setup["steps"])
    timer.reset()
    if served is not None:
        served[0] = 0
    if world > 1:
        dist.barrier()
    reset_peak_memory(setup["device"])
    start = time.perf_counter()
    if rank == 0:  # the controller times load changes from the barrier release (shift scenarios)
        conn.send(("started", rank, start))
    output = pipe(**kwargs)
    if setup["device"] == "cuda":
        torch.cuda.synchronize()
    end = time.perf_counter()
    peak = peak_memory_bytes(setup["device"])
    images = None if output is None else output.images
    latent = images.detach().float().cpu() if isinstance(images, torch.Tensor) else None
    if is_stadi and rank != 0:
        latent = None  # every STADI rank holds the full latent; rank 0 sends it
    result = {
        "rank": rank,
        "seconds": end - start,
        "start": start,
        "latent": latent,
        "forwards": [(s - start, e - start, c, slept) for s, e, c, slept in timer.records],
        "peak_memory_bytes": peak,
    }
    if is_stadi:
        result["stadi"] = _timeline_dict(pipe.last_result, start)
        result["stadi"]["peak_memory_bytes"] = peak
    if served is not None:
        result["served_forwards"] = served[0]  # forwards the step cache served in this call
    if compiled is not None:
        from stadi_xdit.runtime.compile import compiled_graphs

        # Graphs compiled since the compile warmup: recompiles in the timed calls (none expected).
        result["compile"] = {**compiled, "recompiles": compiled_graphs() - compiled["graphs"]}
    return result


def arm_worker(rank: int, world: int, setup: dict, address, authkey: bytes) -> None:
    """Body of one rank of an arm's job (module-level: ``run_distributed`` spawns it)."""
    core = setup["cores"][rank]
    if setup.get("quiet", True):
        import warnings

        warnings.filterwarnings("ignore")
    if core is not None:
        os.sched_setaffinity(0, {core})
    conn = None
    try:
        arm = ARMS[setup["arm"]]
        pipe, transformer = _build(setup, rank, world)
        # STADI emulates by itself (its steps are timed net of waits); the other arms through the hook.
        schedule = tuple(setup["factors"][rank]) if arm.kind != "stadi" else (1.0, 1.0, None)
        timer = ArmForwardHooks(transformer, schedule, cuda=setup["device"] == "cuda")
        compiled = warm_compiled_arm(setup, pipe, world, arm.kind == "stadi", rank) if arm.compiled else None
        served = served_forwards_counter(transformer) if arm.cache else None
        conn = Client(address, authkey=authkey)
        conn.send(("ready", rank, {"pid": os.getpid(), "core": core}))
        while True:
            command = conn.recv()
            if command == "stop":
                break
            conn.send(("result", rank, _run_once(setup, pipe, timer, world, arm.kind == "stadi", rank, conn,
                                                 compiled, served)))
    except BaseException:
        if conn is not None:
            try:
                conn.send(("error", rank, traceback.format_exc()))
            except OSError:
                pass
        raise
    finally:
        if conn is not None:
            conn.close()


# --------------------------------------------------------------------------------------------
# in the controller


class JobError(RuntimeError):
    pass


class ArmJob:
    """One arm's ranks, alive between runs; ``run()`` performs one timed pipeline call on all of them."""

    def __init__(self, setup: dict, num_procs: int, env: dict | None = None, timeout: float = 6 * 3600):
        self.setup = setup
        self.num_procs = num_procs
        self.authkey = secrets.token_bytes(16)
        self.listener = Listener(("127.0.0.1", 0), authkey=self.authkey)
        self.conns: dict[int, object] = {}
        self.rank_info: dict[int, dict] = {}  # pid and core of each rank, from its "ready" message
        self.error: str | None = None
        self._env = env or {}
        self._timeout = timeout
        self._thread = threading.Thread(target=self._launch, daemon=True)
        self._acceptor = threading.Thread(target=self._accept, daemon=True)

    def _launch(self) -> None:
        from stadi_xdit.offline.spawn import run_distributed

        try:
            run_distributed(arm_worker, self.num_procs, self.setup, self.listener.address, self.authkey,
                            timeout=self._timeout, env=self._env)
        except BaseException as error:  # noqa: BLE001 - reported to the controller
            self.error = self.error or str(error)

    def _accept(self) -> None:
        pending = []
        try:
            for _ in range(self.num_procs):
                pending.append(self.listener.accept())
        except OSError:
            return
        for conn in pending:
            message = conn.recv()
            if message[0] != "ready":
                self.error = self.error or f"rank {message[1]} failed:\n{message[2]}"
                return
            self.rank_info[message[1]] = message[2]
            self.conns[message[1]] = conn

    def start(self) -> ArmJob:
        self._acceptor.start()
        self._thread.start()
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.conns) < self.num_procs:
            self._check(deadline, "starting")
            time.sleep(0.05)

    def _check(self, deadline: float, what: str) -> None:
        if self.error:
            raise JobError(self.error)
        if not self._thread.is_alive() and len(self.conns) < self.num_procs:
            raise JobError(self.error or f"job exited while {what}")
        if time.monotonic() > deadline:
            raise JobError(f"timeout while {what}")

    def run(self, timeout: float, on_start=None) -> list[dict]:
        """One call on every rank; ``on_start(t)`` gets the barrier release time (perf_counter) of rank 0."""
        for conn in self.conns.values():
            conn.send("run")
        results: dict[int, dict] = {}
        deadline = time.monotonic() + timeout
        while len(results) < self.num_procs:
            for rank, conn in self.conns.items():
                if rank in results:
                    continue
                try:
                    ready = conn.poll(0.05)
                except (OSError, EOFError):
                    ready = False
                if ready:
                    try:
                        kind, _, payload = conn.recv()
                    except (OSError, EOFError):
                        time.sleep(0.5)  # give the launcher thread a moment to record why
                        raise JobError(self.error or f"rank {rank} closed its connection") from None
                    if kind == "started":
                        if on_start is not None:
                            on_start(payload)
                        continue
                    if kind == "error":
                        raise JobError(f"rank {rank} failed:\n{payload}")
                    results[rank] = payload
            if self.error:
                raise JobError(self.error)
            if time.monotonic() > deadline:
                raise JobError("timeout while running")
        return [results[r] for r in range(self.num_procs)]

    def stop(self) -> None:
        for conn in self.conns.values():
            try:
                conn.send("stop")
            except OSError:
                pass
        self._thread.join(60)
        for conn in self.conns.values():
            conn.close()
        self.listener.close()
