"""GPU readiness: every GPU path of the project in one command, within a time budget, as one table of verdicts.

    python tools/gpu_check.py                          # one or more CUDA GPUs; 8 minutes on one H100-class GPU
    python tools/gpu_check.py --budget-min 15 --json gpu_check.json
    python tools/gpu_check.py --cpu-smoke              # the CPU-capable rows at tiny sizes (what the tests run)

Rows (docs/performance.md, "GPU readiness check"):
  environment       GPU, memory, driver / CUDA / torch / triton / deepspeed, bf16, the peaks MFU divides by
  loss IMPL DT b=B  Triton and chunked CLIP + IMSep vs the dense reference, fp32 and bf16, forward and backward,
                    b in {1024, 8192}: largest relative difference, time and peak memory as ratios to dense
  memory triton     peak memory of the fused path alone at b = 32768 (or the largest that fits)
  nccl 2 ranks      two processes, one per GPU: the global-batch loss and gradients equal one process's
  step ...          ViT-B/16 AlignCLIP training steps (bf16, ZeRO-1, fused AdamW, SDPA), compile off and on:
                    samples/s, MFU, peak memory, GFLOP per sample
  data path         decoded samples/s per loader worker, and the workers a GPU needs at the measured step rate
  data decode gpu   data.decode=gpu: nvJPEG decode + crop samples/s, memory, pixels vs the CPU path, workers a GPU
                    needs when they only read, check and tokenise

Exit code: 0 when every correctness row holds, 1 otherwise, 2 without a GPU (or on bad arguments). Each group of
rows runs in a fresh child process (its own CUDA context, allocator and compile caches) with a timeout taken from
the budget: a group's share, plus whatever the groups before it left unused.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import gpu_check_rows as rows_lib
from gpu_check_rows import ERROR, NOT_APPLICABLE, SKIP, Row

HERE = Path(__file__).resolve()
CHILD_MARKER = "GPU_CHECK_ROWS "
# A device node the NVIDIA driver creates (WSL2: /dev/dxg). Without any, CUDA cannot work: answer before torch's
# import (seconds on a busy machine); with one, torch decides.
DEVICE_NODES = ("/dev/nvidiactl", "/dev/dxg")
# Share of the budget each group may use (a group also gets what the groups before it left unused). Not measured
# yet: sized from what each does (Triton compiling ~20 kernel variants, two ViT-B/16 engine set-ups, inductor
# compiling the ViT-B/16 step, 512 photo-like JPEGs written and decoded). Revise after the first GPU run.
SHARES = {"environment": 0.04, "loss": 0.20, "distributed": 0.08, "step_eager": 0.22, "step_compiled": 0.36,
          "data": 0.10}


def no_gpu_reason(device_nodes=DEVICE_NODES) -> str | None:
    """Why this machine cannot run the GPU check, or None when torch sees a CUDA GPU."""
    if sys.platform.startswith("linux") and not any(os.path.exists(node) for node in device_nodes):
        return f"no NVIDIA GPU on this machine (none of {', '.join(device_nodes)} exists)"
    import torch

    if not torch.cuda.is_available():
        built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA (a CPU-only build)"
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        return (f"torch {torch.__version__} (built with {built}) sees no CUDA GPU"
                + (f"; CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else ""))
    return None


# ------------------------------------------------------------------------------------------ the row groups
def run_group(name: str, kwargs: dict) -> list[Row]:
    """One group of rows, in this process (the child's side)."""
    if name == "environment":
        return [rows_lib.environment_row(**kwargs)]
    if name == "loss":
        return rows_lib.loss_group(**kwargs)
    if name in ("step_eager", "step_compiled"):
        return [rows_lib.step_row(**kwargs)]
    if name == "data":  # the loader's workers; with device_decode also data.decode=gpu's device side
        device_decode = kwargs.pop("device_decode", False)
        return [rows_lib.data_row(**kwargs)] + ([rows_lib.device_decode_row(**kwargs)] if device_decode else [])
    raise ValueError(f"unknown group {name!r}")


def _start(args: list[str], env: dict) -> subprocess.Popen:
    """This script as a child in a session of its own, so that a timeout ends it together with what it started
    (DataLoader workers, inductor's compile workers)."""
    return subprocess.Popen([sys.executable, str(HERE), *args], env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)


def _wait(proc: subprocess.Popen, timeout_s: float) -> tuple[str, str]:
    """(stdout, stderr) of a finished child; on a timeout (or Ctrl-C here, which a child in its own session does
    not receive) the child's process group is killed first and the exception passes on."""
    try:
        return proc.communicate(timeout=max(1.0, timeout_s))
    except BaseException:
        _stop(proc)
        raise


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:  # still ours: not reaped, so its id (= its group's) cannot have been reused
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.communicate()


def distributed_group(backend: str, world: int, batch: int, dim: int, semantic_dim: int, impls: list[str],
                      chunk_size: int, timeout_s: float, env: dict) -> Row:
    """Start ``world`` rank processes (this script with --rank), wait for their reports, judge them."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = json.dumps({"backend": backend, "batch": batch, "dim": dim, "semantic_dim": semantic_dim,
                       "impls": impls, "chunk_size": chunk_size})
    procs = [_start(["--rank", spec], {**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                                       "MASTER_PORT": str(port)})
             for rank in range(world)]
    reports, deadline = [], time.monotonic() + timeout_s
    try:
        for rank, proc in enumerate(procs):
            out, err = _wait(proc, deadline - time.monotonic())
            if proc.returncode != 0:
                raise RuntimeError(f"rank {rank} exited {proc.returncode}: {_last_lines(err)}")
            reports.append(_parse_child(out))
    finally:
        for proc in procs:  # a rank left waiting for its peer
            _stop(proc)
    return rows_lib.distributed_row(reports, backend, batch)


def _last_lines(text: str, n: int = 3) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-n:])


def _parse_child(stdout: str):
    for line in reversed(stdout.splitlines()):
        if line.startswith(CHILD_MARKER):
            return json.loads(line[len(CHILD_MARKER):])
    raise RuntimeError("the child printed no result line")


def _group_check_name(name: str, kwargs: dict) -> str:
    return {"environment": "environment", "loss": "loss kernels", "distributed": f"{kwargs.get('backend')} 2 ranks",
            "data": "data path"}.get(name, f"step compile {'on' if kwargs.get('compile') else 'off'}")


# Groups whose rows are correctness rows (a group that does not finish leaves them unchecked).
CORRECTNESS_GROUPS = {"environment", "loss", "distributed", "step_eager", "step_compiled"}


def run_group_isolated(name: str, kwargs: dict, timeout_s: float, env: dict) -> list[Row]:
    """The group in fresh processes, ended after ``timeout_s``: a ``--child`` of this script, or (distributed)
    the rank processes themselves. A timeout is a SKIP row, a crash an ERROR row."""
    check, correctness = _group_check_name(name, kwargs), name in CORRECTNESS_GROUPS
    try:
        if name == "distributed":
            return [distributed_group(**kwargs, timeout_s=timeout_s, env=env)]
        proc = _start(["--child", json.dumps({"group": name, "kwargs": kwargs})], env)
        out, err = _wait(proc, timeout_s)
    except subprocess.TimeoutExpired:
        return [Row(check, SKIP, f"not finished within its {timeout_s:.0f} s of the budget (raise --budget-min)",
                    correctness)]
    except Exception as err:
        return [rows_lib.error_row(check, err, correctness)]
    if proc.returncode != 0:
        return [Row(check, ERROR, f"child exited {proc.returncode}: {_last_lines(err)}"[:400], correctness)]
    return rows_lib.rows_from_json(_parse_child(out))


# ---------------------------------------------------------------------------------------------- the plan
def plan(args, gpus: int) -> list[tuple[str, dict]]:
    """(group, kwargs) in running order; the data group's step rate is filled in from the step rows."""
    if args.cpu_smoke:  # tiny sizes, fp32 Triton under the interpreter, gloo, the tiny model, no compile
        return [
            ("environment", {"device": "cpu", "peak_override": args.peak_tflops}),
            ("loss", {"impls": ["triton", "chunked"], "dtypes": ["fp32"], "batch_sizes": [16, 40], "dim": 32,
                      "semantic_dim": 16, "device": "cpu", "repeats": 1, "chunk_size": 16, "memory_batch": 48,
                      "memory_impl": "triton"}),
            ("distributed", {"backend": "gloo", "world": 2, "batch": 16, "dim": 16, "semantic_dim": 8,
                             "impls": ["dense", "chunked"], "chunk_size": 4}),
            ("step_eager", {"config": "model/alignclip_tiny", "batch": 8, "compile": False, "precision": "bf16",
                            "steps": 2, "warmup": 1, "device": "cpu", "peak_tflops": args.peak_tflops,
                            "threads": 1}),
            ("data", {"gpus": 1, "samples": 32, "shards": 1, "source_size": 48, "image_size": 32, "batch": 8,
                      "workers": 1}),
        ]
    steps = [("step_eager", False), ("step_compiled", True)]
    groups = [
        ("environment", {"device": "cuda", "peak_override": args.peak_tflops}),
        ("loss", {"impls": ["triton", "chunked"], "dtypes": ["fp32", "bf16"], "batch_sizes": args.loss_batch_sizes,
                  "dim": 768, "semantic_dim": 768, "device": "cuda", "repeats": 5, "chunk_size": 1024,
                  "memory_batch": args.memory_batch, "memory_impl": "triton"}),
        ("distributed", {"backend": "nccl", "world": 2, "batch": 2048, "dim": 768, "semantic_dim": 768,
                         "impls": ["dense", "triton"], "chunk_size": 1024}),
        *[(name, {"config": args.step_config, "batch": args.step_batch, "compile": compiled, "precision": "bf16",
                  "steps": args.step_steps, "warmup": args.step_warmup, "device": "cuda",
                  "peak_tflops": args.peak_tflops}) for name, compiled in steps],
        ("data", {"gpus": gpus, "samples": 512, "shards": 4, "source_size": 256, "image_size": 224, "batch": 64,
                  "workers": 1, "device_decode": True}),
    ]
    return groups


def step_rate(rows: list[Row]) -> float | None:
    """samples/s of the fastest step row that passed (compiled, when compile works): what the loader must feed."""
    rates = [row.figures["samples_per_s"] for row in rows if row.check.startswith("step ") and row.verdict == "PASS"]
    return max(rates) if rates else None


def run_plan(groups: list[tuple[str, dict]], budget_s: float, gpus: int, child_env: dict,
             progress=lambda message: None) -> list[Row]:
    deadline, rows = time.monotonic() + budget_s, []
    for i, (name, kwargs) in enumerate(groups):
        later = sum(SHARES[later_name] for later_name, _ in groups[i + 1:])
        timeout_s = deadline - time.monotonic() - later * budget_s
        if name == "distributed" and kwargs["backend"] == "nccl" and gpus < 2:
            rows.append(Row("nccl 2 ranks = 1 process", NOT_APPLICABLE, f"{gpus} GPU: needs two on this node",
                            correctness=True))
            continue
        if name == "data":
            kwargs = {**kwargs, "step_samples_per_s": step_rate(rows)}
        started = time.monotonic()
        progress(f"{name}: up to {max(timeout_s, 1.0):.0f} s")
        group_rows = run_group_isolated(name, kwargs, timeout_s, {**os.environ, **child_env})
        seconds = time.monotonic() - started
        for row in group_rows:
            row.figures["group_s"] = seconds
        rows += group_rows
        progress(f"{name}: {len(group_rows)} row(s) in {seconds:.0f} s")
    return rows


# --------------------------------------------------------------------------------------------------- main
class _OneLineErrors(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block: what was wrong and the flag that takes it
        self.exit(2, f"gpu_check: {message} (see --help)\n")


def parse_args(argv):
    parser = _OneLineErrors(description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--budget-min", type=float, default=8.0,
                        help="time budget in minutes (default 8: one H100-class GPU)")
    parser.add_argument("--json", metavar="PATH", help="also write the table (every row's figures) as JSON here")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="run the CPU-capable rows at tiny sizes (no GPU needed): checks the script itself")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="device peak for MFU (default: the table)")
    parser.add_argument("--step-config", default="model/alignclip_vit_b16", help="model config of the step rows")
    parser.add_argument("--step-batch", type=int, default=256, help="samples per step on one GPU")
    parser.add_argument("--step-steps", type=int, default=10, help="timed steps per step row (median)")
    parser.add_argument("--step-warmup", type=int, default=3, help="untimed steps first (compilation)")
    parser.add_argument("--loss-batch-sizes", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--memory-batch", type=int, default=32768, help="batch of the fused-memory row")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--rank", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.budget_min <= 0:
        parser.error(f"--budget-min must be > 0, got {args.budget_min}")
    for name in ("step_batch", "step_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.step_warmup < 0 or args.memory_batch < 0 or min(args.loss_batch_sizes) < 1:
        parser.error("--step-warmup and --memory-batch must be >= 0 and every --loss-batch-sizes >= 1")
    if args.json and not os.access(Path(args.json).resolve().parent, os.W_OK):  # not after minutes of rows
        parser.error(f"--json {args.json}: its folder {Path(args.json).resolve().parent} is not a writable folder")
    return args


def config_problem(groups: list[tuple[str, dict]]) -> str | None:
    """The step rows' config, loaded now (no torch): a typo fails before minutes of other rows, not after."""
    from alignclip.config import ConfigError, load_config

    for name, kwargs in groups:
        if name.startswith("step_"):
            try:
                load_config(kwargs["config"], [*rows_lib.step_overrides(kwargs["compile"], kwargs["precision"]),
                                               f"train.global_batch_size={kwargs['batch']}"])
            except ConfigError as err:
                return f"--step-config {kwargs['config']}: {err}"
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child or args.rank:  # the child side: one group, or one rank of the distributed check
        spec = json.loads(args.child or args.rank)
        if args.rank:
            result = rows_lib.distributed_rank(**spec)
        else:
            result = [vars(row) for row in run_group(spec["group"], spec["kwargs"])]
        print(CHILD_MARKER + json.dumps(result), flush=True)
        return 0
    started = time.monotonic()
    child_env = {}
    if args.cpu_smoke:
        gpus, where = 0, "CPU smoke (tiny sizes, Triton interpreted in fp32, gloo)"
        # Triton's interpreter is read when triton is first imported; DeepSpeed needs its CPU accelerator
        child_env = {"TRITON_INTERPRET": "1", "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    else:
        reason = no_gpu_reason()
        if reason:
            print(f"gpu_check: {reason}. This check needs a CUDA GPU; `python tools/gpu_check.py --cpu-smoke` "
                  f"runs its CPU-capable rows at tiny sizes.", file=sys.stderr)
            return 2
        import torch

        gpus = torch.cuda.device_count()  # no CUDA context here: the children own the GPUs
        where = f"{gpus} GPU(s)"
    groups = plan(args, gpus)
    problem = config_problem(groups)
    if problem:
        print(f"gpu_check: {problem}", file=sys.stderr)
        return 2
    budget_s = 60 * args.budget_min
    print(f"GPU readiness check: {where}; budget {args.budget_min:g} min", file=sys.stderr, flush=True)
    rows = run_plan(groups, budget_s, gpus, child_env,
                    progress=lambda m: print(f"  ... {m}", file=sys.stderr, flush=True))
    took_min = (time.monotonic() - started) / 60
    if gpus and rows[0].figures.get("name"):
        where = f"{gpus} x {rows[0].figures['name']}"
    print(f"GPU readiness check: {where}; budget {args.budget_min:g} min, took {took_min:.1f} min")
    print(rows_lib.render_table(rows))
    if args.json:
        meta = {"where": where, "gpus": gpus, "budget_min": args.budget_min, "took_min": took_min,
                "cpu_smoke": args.cpu_smoke}
        Path(args.json).write_text(rows_lib.rows_to_json(rows, meta) + "\n")
    return rows_lib.exit_code(rows)


if __name__ == "__main__":
    raise SystemExit(main())
