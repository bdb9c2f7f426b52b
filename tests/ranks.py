"""Gloo ranks spawned from a test (CPU), shared by the sharded-training tests.

:func:`run_ranks` starts ``world`` processes (``spawn``, never ``fork``: forking a process that
already ran torch work can deadlock), each in a gloo process group bound to the loopback
interface (``GLOO_SOCKET_IFNAME=lo``: gloo otherwise binds to whatever the host name resolves
to, which on some machines is an interface the ranks cannot reach each other on). What each
rank prints, and the traceback of a crash (``faulthandler``), goes to ``rank{r}.log`` in the
test's folder, and a failed or hung run raises with the tail of every log, so a rank killed by
a signal (a C++ abort inside gloo, say) still says why.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import time
from collections.abc import Callable

import torch.distributed as dist
import torch.multiprocessing as mp

LOG_TAIL = 4000  # characters of each rank's log quoted in a failure


def run_ranks(fn: Callable[..., None], args: tuple, tmp: str, *, world: int = 2,
              timeout: float = 600.0) -> None:
    """Run ``fn(*args)`` on ``world`` gloo ranks (``dist.get_rank()`` tells each its rank);
    raise ``AssertionError`` with the ranks' logs when any fails or all have not ended after
    ``timeout`` seconds."""
    init_file = os.path.join(tmp, "pg-init")
    previous = os.environ.get("GLOO_SOCKET_IFNAME")
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # inherited by the spawned ranks
    try:
        ctx = mp.start_processes(_rank_main, args=(world, init_file, tmp, fn, args),
                                 nprocs=world, start_method="spawn", join=False)
    finally:
        if previous is None:
            del os.environ["GLOO_SOCKET_IFNAME"]
        else:
            os.environ["GLOO_SOCKET_IFNAME"] = previous
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                for proc in ctx.processes:
                    proc.kill()
                raise AssertionError(f"the {world} ranks did not end within {timeout:.0f} s"
                                     + _logs(tmp, world))
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
        raise AssertionError(f"{e}{_logs(tmp, world)}") from e


def _rank_main(rank: int, world: int, init_file: str, tmp: str, fn: Callable[..., None],
               args: tuple) -> None:
    log = open(os.path.join(tmp, f"rank{rank}.log"), "w")  # noqa: SIM115 (open until exit)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log.fileno(), 1)  # C++ output too (gloo, c10d), not only Python's
    os.dup2(log.fileno(), 2)
    faulthandler.enable(log)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    completed = False
    try:
        fn(*args)
        completed = True
    finally:
        if completed:
            dist.barrier()  # no rank tears gloo down while another still talks to it
        dist.destroy_process_group()
    # done and checked: leave without the interpreter's teardown, where gloo's background
    # threads sometimes abort the process (std::terminate, no Python frame) after the work
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _logs(tmp: str, world: int) -> str:
    out = []
    for rank in range(world):
        path = os.path.join(tmp, f"rank{rank}.log")
        try:
            with open(path, errors="replace") as f:
                text = f.read()
        except OSError as e:
            text = f"(no log: {e})"
        out.append(f"\n--- rank {rank} log (last {LOG_TAIL} characters) ---\n{text[-LOG_TAIL:]}")
    return "".join(out)

