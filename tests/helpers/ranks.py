"""A runner for gloo process groups: ``fn(rank, world_size, *args)`` in new processes on 127.0.0.1."""

from __future__ import annotations

import os
import pickle
import socket
import sys
import tempfile
import traceback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Ranks fork from multiprocessing's fork server, which has imported these before the first rank starts: a rank then
# begins in a fraction of a second instead of spending ~4 s of CPU on imports (the suite starts dozens of ranks). The
# server only imports, so it holds one thread and no OpenMP pool, and forking it is safe.
PRELOAD = ["torch", "torch.distributed", "deepspeed", "alignclip.training.trainer", "sentence_transformers"]


def _rank_entry(rank: int, world_size: int, port: int, fn, args, out_dir: str, environ: dict, cwd: str) -> None:
    import torch.distributed as dist

    # the fork server's environment and folder are those of its start: take the caller's, as a fresh process would
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        payload = ("ok", result)
    except BaseException:  # report the worker's traceback in the parent's failure message
        payload = ("error", traceback.format_exc())
    finally:
        try:
            dist.destroy_process_group()
        except Exception:
            pass
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(payload, f)
    # The result is on disk: leave without the interpreter's teardown, where a C++ thread still joinable in a
    # static destructor (rank 0 hosts the TCPStore) once aborted a finished rank ("terminate called without an
    # active exception", SIGABRT) and failed a test whose every assertion held. A crash before this line still fails.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_on_ranks(fn, world_size: int, *args):
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` new processes joined in a gloo group.

    ``fn`` must be defined at module level (it is pickled by name). Returns the per-rank results (picklable,
    e.g. CPU tensors); a worker's exception fails the caller with that worker's traceback.
    """
    import multiprocessing

    import torch.multiprocessing as mp

    multiprocessing.get_context("forkserver").set_forkserver_preload(PRELOAD)  # used when the server starts
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_rank_entry, args=(world_size, free_port(), fn, args, out_dir, dict(os.environ),
                                              os.getcwd()), nprocs=world_size, join=True, start_method="forkserver")
        results = []
        for rank in range(world_size):
            with open(os.path.join(out_dir, f"rank{rank}.pkl"), "rb") as f:
                status, value = pickle.load(f)
            if status != "ok":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            results.append(value)
    return results
