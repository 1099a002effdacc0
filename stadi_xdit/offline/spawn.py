"""The one multi-process harness: run a function on N CPU ranks (spawn + gloo) and collect results.

    results = run_distributed(fn, 2, arg, timeout=60)   # fn(rank, world_size, arg) on ranks 0, 1

``fn`` must be a module-level function.  Test modules collected by pytest's importlib mode are
not importable by name in a fresh process, so such a module is re-loaded there from its file.
Each rank sees MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE (so xfuser's
``init_distributed_environment()`` works with env://), runs single-threaded, and imports
``stadi_xdit.xdit`` first, so the CPU compat layer is in place before xfuser is imported.

Ranks are forked from one forkserver that has already imported torch, xfuser and diffusers (3-5 s of
CPU per rank otherwise, most of a small test's time). Each rank still sees the caller's environment as
it is at the call. A test that needs what only a new interpreter gives (``PYTHONHASHSEED``, or a
variable that a library reads once at import, such as ``HF_HOME``) passes ``fresh_interpreter=True``.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import queue as queue_mod
import random
import socket
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stadi_xdit.offline.modules import load_module_from_path

__all__ = ["DistributedTestError", "free_port", "run_distributed"]


class DistributedTestError(RuntimeError):
    """A rank failed, died or did not finish in time."""


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a rendezvous, drawn below the kernel's ephemeral range, and claimed.

    A port the kernel hands out itself (a bind to port 0, a gloo pair's listener, a client's connection) can
    be taken by another process's socket between this call and the launch that binds it: CI saw a launcher
    refuse its --master_port as busy while another test's ranks ran beside it. Below that range a port is
    only ever taken by whoever asks for it by number. Two callers drawing the same number (two test
    workers, or one drawing the ports of several launches before any of them binds) would meet at one
    store, each launch's ranks in the other's rendezvous: so each port drawn is claimed for as long as this
    process lives (`_claim`), and never drawn again by it or by another process on this machine."""
    low = _ephemeral_ports()[0]
    draw = random.SystemRandom()  # not the seeded `random`: two test workers would draw alike
    for _ in range(100):
        port = draw.randint(max(1024, low - 12000), low - 1)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        if _claim(port):
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # every draw taken: let the kernel pick
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Port -> the open file whose lock claims it; held until this process exits (the kernel then drops the lock).
_CLAIMED: dict[int, int] = {}


def _claim(port: int) -> bool:
    """Claim `port` for this process: an exclusive lock on a file named by it in a folder every process of this
    user shares. False where this process or a live other one holds it already."""
    import fcntl
    import tempfile

    if port in _CLAIMED:
        return False
    folder = Path(tempfile.gettempdir()) / f"stadi-xdit-ports-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(folder / str(port), os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    _CLAIMED[port] = fd
    return True


def _ephemeral_ports() -> tuple[int, int]:
    """The kernel's range for ports it picks itself (Linux's default where /proc does not say)."""
    try:
        low, high = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return 32768, 60999
    return (low, high) if 2048 <= low <= high else (32768, 60999)


def _fn_ref(fn) -> tuple[str, str | None, str]:
    """(module, file to load it from when it is not importable by name, qualname)."""
    if "<locals>" in fn.__qualname__ or fn.__name__ == "<lambda>":
        raise ValueError(f"run_distributed needs a module-level function, got {fn.__qualname__}")
    module = sys.modules[fn.__module__]
    path = getattr(module, "__file__", None)
    try:
        spec = importlib.util.find_spec(fn.__module__)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and path and spec.origin and os.path.samefile(spec.origin, path):
        path = None  # importable by name
    return fn.__module__, path, fn.__qualname__


def _resolve_fn(module_name: str, path: str | None, qualname: str):
    if path is not None and module_name not in sys.modules:
        load_module_from_path(module_name, path)
    obj = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


# Imported once in the forkserver, so every forked rank starts with them (and the compat layer) loaded.
FORKSERVER_PRELOAD = ["torch", "torch.distributed", "stadi_xdit.xdit", "stadi_xdit.families.components",
                      "stadi_xdit.xdit.build"]


def _context(fresh_interpreter: bool):
    # With a GPU, spawn: a forkserver that imported the compat layer may have initialised the CUDA
    # driver, and a process forked after that cannot use CUDA.
    if fresh_interpreter or torch.cuda.is_available():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(FORKSERVER_PRELOAD)
    return ctx


def _worker(rank, world_size, port, fn_ref, payload, init_process_group, caller_env, env, results):
    # A forked rank inherits the forkserver's environment (from its start); use the caller's, as spawn would.
    os.environ.clear()
    os.environ.update(caller_env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )
    os.environ.update(env)
    torch.set_num_threads(1)
    try:
        import stadi_xdit.xdit  # noqa: F401  (CPU compat layer before the test's module imports xfuser)

        fn = _resolve_fn(*fn_ref)
        args, kwargs = pickle.loads(payload)
        if init_process_group:
            dist.init_process_group(
                "gloo",
                init_method=f"tcp://127.0.0.1:{port}",
                rank=rank,
                world_size=world_size,
                timeout=timedelta(seconds=600),
            )
        result = fn(rank, world_size, *args, **kwargs)
        # plain pickle: torch's queue reductions would share tensors through this process's
        # file descriptors, which vanish when it exits
        results.put((rank, True, pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - everything, SystemExit included, goes to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _stop(procs) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 5
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


def run_distributed(
    fn,
    world_size: int,
    *args,
    timeout: float = 300.0,
    init_process_group: bool = False,
    env: dict | None = None,
    faulty_ranks: tuple[int, ...] = (),
    fresh_interpreter: bool = False,
    **kwargs,
) -> list:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` spawned ranks.

    Returns the ranks' results in rank order.  Raises :class:`DistributedTestError` naming
    the failing rank (with its traceback), the rank that died, or the ranks still running at
    ``timeout`` seconds; all ranks are stopped in every case. Ranks in ``faulty_ranks`` (fault
    injection: a killed or hung peer) are not waited for; their result is None unless they
    returned one before the others finished. ``fresh_interpreter``: spawn a new Python per rank instead
    of forking one that has the heavy imports done (see the module docstring).
    """
    ctx = _context(fresh_interpreter)
    results = ctx.Queue()
    port = free_port()
    payload = pickle.dumps((args, kwargs))
    fn_ref = _fn_ref(fn)
    env = {str(k): str(v) for k, v in (env or {}).items()}

    procs = []
    saved_omp = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited at spawn (or by the forkserver), before torch is imported
    caller_env = dict(os.environ)
    try:
        for rank in range(world_size):
            p = ctx.Process(
                target=_worker,
                args=(rank, world_size, port, fn_ref, payload, init_process_group, caller_env, env, results),
                name=f"rank{rank}",
                daemon=True,
            )
            p.start()
            procs.append(p)
    finally:
        if saved_omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved_omp

    outputs: dict[int, object] = {}
    deadline = time.monotonic() + timeout
    try:
        needed = set(range(world_size)) - set(faulty_ranks)
        while not needed <= outputs.keys():
            try:
                rank, ok, data = results.get(timeout=0.1)
            except queue_mod.Empty:
                if time.monotonic() > deadline:
                    pending = [r for r in range(world_size) if r not in outputs]
                    raise DistributedTestError(
                        f"timeout after {timeout:g}s: rank(s) {pending} had not finished"
                    ) from None
                dead = [r for r, p in enumerate(procs) if r not in outputs and p.exitcode is not None]
                dead = [r for r in dead if r not in faulty_ranks]
                if dead:
                    try:  # a result written just before exiting may still be in the pipe
                        rank, ok, data = results.get(timeout=1.0)
                    except queue_mod.Empty:
                        r = dead[0]
                        raise DistributedTestError(
                            f"rank {r} exited with code {procs[r].exitcode} without a result"
                        ) from None
                else:
                    continue
            if not ok:
                raise DistributedTestError(f"rank {rank} failed:\n{data}")
            outputs[rank] = pickle.loads(data)
        for r, p in enumerate(procs):
            if r not in faulty_ranks:
                p.join(timeout=30)
    finally:
        _stop(procs)
        results.close()
        results.join_thread()
    return [outputs.get(r) for r in range(world_size)]
