"""The rows of tools/gpu_check.py: each a function of device, sizes and dtype that returns ``Row``s, plus the
verdict logic and the table / JSON rendering. The test suite runs the CPU-capable rows at tiny sizes
(tests/test_gpu_check.py); tools/gpu_check.py runs each group of rows in a fresh child process under the budget.

Nothing here imports torch (or anything heavy) at module level: the script must answer "no GPU" in about a second.

What the rows reuse: alignclip.training.peaks (the MFU peak table), tools/benchmarks/step_bench.py (the step
benchmark over the real trainer) and tools/bench_data.py (the data-path measurement).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

# Verdicts. Correctness rows decide the exit code; measurement rows only print figures.
PASS, FAIL, ERROR, SKIP, NOT_APPLICABLE, INFO, WARN = "PASS", "FAIL", "ERROR", "SKIP", "N/A", "INFO", "WARN"

# Largest relative difference (max |got - ref| / max |ref|) a fused loss may show against the fp32 dense reference
# on the same inputs. fp32: 10x the CPU tests' 1e-5 (GPU reductions sum in other orders, over up to 67 M logits
# for the scale's gradient); bf16: products rounded to 8 mantissa bits, as tests/test_kernels_triton.py's CUDA check.
TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2}
# Two ranks vs one process on the same global batch, fp32 (the gloo test's check, at GPU sizes).
DISTRIBUTED_TOLERANCE = 1e-5
# AlignCLIP's loss: CRsep (both cross-modal directions) + 1/2 IMSep on the image side, rescaled (Eslami & de Melo,
# ICLR 2025, arXiv 2406.17639, eq. 12-13).
IMSEP_WEIGHT = 0.5


@dataclass
class Row:
    check: str  # what was checked, e.g. "loss triton fp32 b=8192"
    verdict: str  # PASS FAIL ERROR SKIP N/A INFO WARN
    result: str  # the figures, one line
    correctness: bool = False  # a correctness row decides the exit code
    figures: dict = field(default_factory=dict)  # the same figures, structured, for --json

    def holds(self) -> bool:
        """A correctness row holds when it passed or cannot apply here (one GPU: no NCCL row); any row that
        crashed fails the run; measurement rows skipped for the budget do not."""
        if self.verdict == ERROR:
            return False
        if self.correctness:
            return self.verdict in (PASS, NOT_APPLICABLE)
        return True


def error_row(check: str, err: BaseException, correctness: bool) -> Row:
    message = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return Row(check, ERROR, f"{type(err).__name__}: {message}"[:300], correctness)


def exit_code(rows: list[Row]) -> int:
    return 0 if rows and all(row.holds() for row in rows) else 1


def render_table(rows: list[Row]) -> str:
    width = max([len(row.check) for row in rows] + [len("check")])
    head = f"{'check':<{width}}  {'verdict':<7}  result"
    lines = [head, "-" * max(len(head), 100)]
    lines += [f"{row.check:<{width}}  {row.verdict:<7}  {row.result}" for row in rows]
    failed = [row.check for row in rows if not row.holds()]
    lines.append("-" * max(len(head), 100))
    lines.append("every correctness row holds (exit 0)" if not failed else
                 f"{len(failed)} row(s) do not hold (exit 1): {', '.join(failed)}")
    return "\n".join(lines)


def rows_to_json(rows: list[Row], meta: dict) -> str:
    return json.dumps({**meta, "exit_code": exit_code(rows), "rows": [asdict(row) for row in rows]}, indent=2)


def rows_from_json(payload: list[dict]) -> list[Row]:
    return [Row(**row) for row in payload]


# ------------------------------------------------------------------------------------------------ helpers
def relative_error(actual, expected) -> float:
    """max |actual - expected| / max |expected| (the absolute difference when the reference is exactly 0)."""
    actual, expected = actual.double(), expected.double()
    diff = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    return diff / scale if scale > 0 else diff


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mib(device, run) -> Optional[float]:
    """CUDA memory allocated by ``run()`` above what existed before it (None off CUDA: not measured there)."""
    import torch

    if device.type != "cuda":
        run()
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def _ms(seconds: float) -> str:
    ms = 1e3 * seconds
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


# ------------------------------------------------------------------------------------ 1. the environment
def _nvidia_driver() -> str:
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no nvidia-smi)"


def _version(module: str) -> str:
    import importlib

    try:
        return importlib.import_module(module).__version__
    except Exception as err:  # a missing or broken package is a finding, not a crash
        return f"missing ({type(err).__name__})"


def environment_row(device: str = "cuda", peak_override: float = 0.0) -> Row:
    """GPU name and memory, driver / CUDA / torch / triton / deepspeed versions, bf16 support, and the peaks the
    MFU figures divide by. CUDA: PASS when bf16 is supported (the GPU default path trains in bf16)."""
    import torch

    from alignclip.training.peaks import device_name, peak_tflops

    dev = torch.device(device)
    figures = {"device": str(dev), "torch": torch.__version__, "cuda": torch.version.cuda,
               "triton": _version("triton"), "deepspeed": _version("deepspeed")}
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        figures.update(name=device_name(dev), gpus=torch.cuda.device_count(), memory_gib=props.total_memory / 2**30,
                       capability=f"{props.major}.{props.minor}", driver=_nvidia_driver(),
                       bf16=bool(torch.cuda.is_bf16_supported()))
    else:
        figures.update(name=device_name(dev), gpus=0, driver="-", bf16=None,
                       memory_gib=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30)
    figures["peak_tflops_bf16"] = peak_tflops(dev, "bf16", peak_override)
    figures["peak_tflops_fp32"] = peak_tflops(dev, "fp32", peak_override)
    peak = (f"peak bf16 {figures['peak_tflops_bf16']} / fp32 {figures['peak_tflops_fp32']} TFLOP/s"
            if figures["peak_tflops_bf16"] else "no peak in the table: MFU left blank (--peak-tflops sets one)")
    bf16 = {True: "bf16 yes", False: "bf16 NO", None: "bf16 n/a"}[figures["bf16"]]
    where = f"{figures['gpus']} x {figures['name']}" if dev.type == "cuda" else f"CPU {figures['name']}"
    result = (f"{where}, {figures['memory_gib']:.1f} GiB; "
              f"driver {figures['driver']}, CUDA {figures['cuda']}, torch {figures['torch']}, "
              f"triton {figures['triton']}, deepspeed {figures['deepspeed']}; {bf16}; {peak}")
    if dev.type != "cuda":
        verdict = INFO
    else:
        verdict = PASS if figures["bf16"] else FAIL
    return Row("environment", verdict, result, correctness=dev.type == "cuda", figures=figures)


# ------------------------------------------------------------------------- 2. the fused loss kernels vs dense
def contrastive_terms_fn(impl: str, chunk_size: int):
    """``contrastive_terms`` of ``loss.impl`` (dense | chunked | triton), all with dense's signature."""
    from functools import partial

    from alignclip.losses import chunked, dense

    if impl == "dense":
        return dense.contrastive_terms
    if impl == "chunked":
        return partial(chunked.contrastive_terms, chunk_size=chunk_size)
    if impl == "triton":
        from alignclip.losses import triton_kernels  # TRITON_INTERPRET=1 must be set before this on CPU

        return partial(triton_kernels.contrastive_terms, chunk_size=chunk_size)
    raise ValueError(f"impl {impl!r}: expected dense, chunked or triton")


def loss_inputs(batch: int, dim: int, semantic_dim: int, device: str, dtype: str, seed: int = 0):
    """Unit-norm E_v, E_t, E_s of one process (made in fp32 on the CPU, so every device sees the same numbers),
    rounded to ``dtype``, and the log-scale of s = 100 (the clamp's bound: the sharpest softmax training sees)."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    image, text, semantic = (F.normalize(torch.randn(batch, width, generator=gen), dim=-1).to(device, torch_dtype)
                             for width in (dim, dim, semantic_dim))
    return image, text, semantic, torch.tensor(math.log(100.0), device=device)


def _terms_and_grads(fn, image, text, semantic, log_scale):
    """Forward of one process's AlignCLIP terms (local = global, offset 0), backward of their weighted sum."""
    image, text = image.detach().clone().requires_grad_(), text.detach().clone().requires_grad_()
    log_scale = log_scale.detach().clone().requires_grad_()
    terms = fn(image, text, image, text, semantic, semantic, log_scale, 0, cross_modal=True,
               imsep_sides=("image",), imsep_rescale=True)
    values = [terms.image_to_text, terms.text_to_image, terms.imsep_image]
    (values[0] + values[1] + IMSEP_WEIGHT * values[2]).backward()
    import torch

    return torch.stack([v.detach().float() for v in values]), image.grad, text.grad, log_scale.grad


def _time_forward_backward(fn, inputs, device, repeats: int) -> tuple[float, float]:
    """Median seconds of the forward and of forward + backward, after one untimed call (Triton's compilation)."""
    image, text, semantic, log_scale = inputs
    forward_s, total_s = [], []
    for i in range(repeats + 1):
        leaves = [x.detach().clone().requires_grad_() for x in (image, text, log_scale)]
        _sync(device)
        start = time.perf_counter()
        terms = fn(leaves[0], leaves[1], leaves[0], leaves[1], semantic, semantic, leaves[2], 0, cross_modal=True,
                   imsep_sides=("image",), imsep_rescale=True)
        loss = terms.image_to_text + terms.text_to_image + IMSEP_WEIGHT * terms.imsep_image
        _sync(device)
        middle = time.perf_counter()
        loss.backward()
        _sync(device)
        if i:
            forward_s.append(middle - start)
            total_s.append(time.perf_counter() - start)
    return statistics.median(forward_s), statistics.median(total_s)


def loss_row(impl: str, dtype: str, batch: int, *, dim: int = 768, semantic_dim: int = 768, device: str = "cuda",
             repeats: int = 5, chunk_size: int = 1024, tolerance: Optional[float] = None,
             dense_cache: Optional[dict] = None) -> Row:
    """``impl`` at ``dtype`` against the dense reference: the largest relative difference of the loss terms
    (forward) and of the gradients w.r.t. E_v, E_t and the scale (backward), against dense in fp32 on the same
    (rounded) inputs; time (forward, forward + backward) and peak CUDA memory as ratios to dense at ``dtype``.
    ``dense_cache`` (a dict shared by the rows of one process) keeps dense's figures per (dtype, batch)."""
    import torch

    tolerance = TOLERANCE[dtype] if tolerance is None else tolerance
    dev = torch.device(device)
    inputs = loss_inputs(batch, dim, semantic_dim, device, dtype)
    fn, dense_fn = contrastive_terms_fn(impl, chunk_size), contrastive_terms_fn("dense", chunk_size)
    fp32_inputs = [x.float() for x in inputs]
    expected = _terms_and_grads(dense_fn, *fp32_inputs)
    got = _terms_and_grads(fn, *inputs)
    finite = all(bool(torch.isfinite(g).all()) for g in got)
    loss_err = relative_error(got[0], expected[0])
    grad_err = max(relative_error(g.float(), e) for g, e in zip(got[1:], expected[1:]))
    cache = dense_cache if dense_cache is not None else {}
    key = (dtype, batch)
    if key not in cache:
        cache[key] = {"time": _time_forward_backward(dense_fn, inputs, dev, repeats),
                      "peak_mib": _peak_mib(dev, lambda: _terms_and_grads(dense_fn, *inputs))}
    dense_time, dense_mib = cache[key]["time"], cache[key]["peak_mib"]
    forward_s, total_s = _time_forward_backward(fn, inputs, dev, repeats)
    peak_mib = _peak_mib(dev, lambda: _terms_and_grads(fn, *inputs))
    figures = {"impl": impl, "dtype": dtype, "batch": batch, "dim": dim, "semantic_dim": semantic_dim,
               "loss_rel_err": loss_err, "grad_rel_err": grad_err, "tolerance": tolerance, "finite": finite,
               "forward_ms": 1e3 * forward_s, "fwd_bwd_ms": 1e3 * total_s, "dense_fwd_bwd_ms": 1e3 * dense_time[1],
               "forward_x_dense": forward_s / dense_time[0], "fwd_bwd_x_dense": total_s / dense_time[1],
               "peak_mib": peak_mib, "dense_peak_mib": dense_mib,
               "peak_x_dense": peak_mib / dense_mib if peak_mib is not None and dense_mib else None}
    verdict = PASS if finite and loss_err <= tolerance and grad_err <= tolerance else FAIL
    memory = (f"memory {peak_mib:.0f} MiB = x{figures['peak_x_dense']:.3g} dense" if peak_mib is not None
              else "memory: CUDA only")
    result = (f"loss err {loss_err:.1e}, grad err {grad_err:.1e} (tol {tolerance:.0e}"
              f"{'' if finite else ', NON-FINITE'}); fwd+bwd {_ms(total_s)} ms = x{total_s / dense_time[1]:.3g} "
              f"dense (fwd x{forward_s / dense_time[0]:.3g}); {memory}")
    return Row(f"loss {impl} {dtype} b={batch}", verdict, result, correctness=True, figures=figures)


def fused_memory_row(batch: int = 32768, *, impl: str = "triton", dim: int = 768, semantic_dim: int = 768,
                     device: str = "cuda", chunk_size: int = 1024, min_batch: int = 1024,
                     dense_bytes_per_pair: Optional[float] = None) -> Row:
    """Peak memory of the fused path alone (fp32, what the objective runs: it promotes bf16 features) at
    ``batch``, halved until it fits. ``dense_bytes_per_pair``: dense's measured peak / b^2 at a smaller batch,
    to state what dense would need at this one."""
    import torch

    dev = torch.device(device)
    fn = contrastive_terms_fn(impl, chunk_size)
    b = batch
    while True:
        try:
            inputs = loss_inputs(b, dim, semantic_dim, device, "fp32")
            peak_mib = _peak_mib(dev, lambda: _terms_and_grads(fn, *inputs))
            break
        except torch.cuda.OutOfMemoryError:
            inputs = None
            torch.cuda.empty_cache()
            if b // 2 < min_batch:
                return Row(f"memory {impl} fp32 b={batch}", FAIL, f"out of memory down to b={b}", figures={})
            b //= 2
    figures = {"impl": impl, "batch": b, "requested_batch": batch, "peak_mib": peak_mib,
               "bytes_per_sample": peak_mib * 2**20 / b if peak_mib is not None else None,
               "dense_estimate_mib": dense_bytes_per_pair * b * b / 2**20 if dense_bytes_per_pair else None}
    fitted = "" if b == batch else f" (b={batch} did not fit)"
    if peak_mib is None:
        result = f"ran fwd+bwd at b={b}; memory: CUDA only"
    else:
        result = f"peak {peak_mib:.0f} MiB at b={b}{fitted} = {figures['bytes_per_sample'] / 1024:.1f} KiB/sample"
        if figures["dense_estimate_mib"]:
            result += (f"; dense would hold ~{figures['dense_estimate_mib'] / 1024:.1f} GiB "
                       f"(x{figures['dense_estimate_mib'] / peak_mib:.0f})")
    return Row(f"memory {impl} fp32 b={b}", INFO, result, figures=figures)


def loss_group(impls: list[str], dtypes: list[str], batch_sizes: list[int], *, dim: int, semantic_dim: int,
               device: str, repeats: int, chunk_size: int, memory_batch: int, memory_impl: str) -> list[Row]:
    """Every loss row of one process (one Triton compilation cache, one dense figure per dtype and batch)."""
    rows, cache = [], {}
    for impl in impls:
        for dtype in dtypes:
            for batch in batch_sizes:
                try:
                    rows.append(loss_row(impl, dtype, batch, dim=dim, semantic_dim=semantic_dim, device=device,
                                         repeats=repeats, chunk_size=chunk_size, dense_cache=cache))
                except Exception as err:
                    rows.append(error_row(f"loss {impl} {dtype} b={batch}", err, correctness=True))
    if memory_batch:
        dense = [(b, v["peak_mib"]) for (dtype, b), v in cache.items() if dtype == "fp32" and v["peak_mib"]]
        per_pair = max(dense)[1] * 2**20 / max(dense)[0] ** 2 if dense else None
        try:
            rows.append(fused_memory_row(memory_batch, impl=memory_impl, dim=dim, semantic_dim=semantic_dim,
                                         device=device, chunk_size=chunk_size, dense_bytes_per_pair=per_pair))
        except Exception as err:
            rows.append(error_row(f"memory {memory_impl} fp32 b={memory_batch}", err, correctness=False))
    return rows


# --------------------------------------------------------------------------- 4. two ranks vs one process
def _objective_loss_and_grads(impl: str, chunk_size: int, image, text, semantic, log_scale):
    """Total, gradients (E_v, E_t slices, scale) of the AlignCLIP objective through ``build_objective``: it
    gathers across the ranks when a process group exists (alignclip.distributed.gather)."""
    from alignclip.config import LossConfig
    from alignclip.losses import build_objective

    objective = build_objective(LossConfig(impl=impl, chunk_size=chunk_size, clip_weight=0.0, crsep_weight=1.0,
                                           imsep_weight=IMSEP_WEIGHT, imsep_sides="image", imsep_rescale=True))
    image, text = image.detach().clone().requires_grad_(), text.detach().clone().requires_grad_()
    log_scale = log_scale.detach().clone().requires_grad_()
    total = objective(image, text, log_scale, semantic).total
    total.backward()
    return total.detach(), image.grad, text.grad, log_scale.grad


def distributed_rank(backend: str, batch: int, dim: int, semantic_dim: int, impls: list[str],
                     chunk_size: int = 1024) -> dict:
    """One rank of the two-process check (RANK, WORLD_SIZE, MASTER_ADDR / PORT from the environment): the
    one-process loss and gradients of the global batch first (no process group yet), then this rank's share in
    the group; the ranks' mean loss, concatenated feature gradients / world and mean scale gradient must equal
    the one-process ones (tests/test_losses_distributed.py's check, with the collectives of ``backend``)."""
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = f"cuda:{rank}" if backend == "nccl" else "cpu"
    if backend == "nccl":
        torch.cuda.set_device(rank)
    image, text, semantic, log_scale = loss_inputs(batch, dim, semantic_dim, device, "fp32", seed=1)
    single = {impl: _objective_loss_and_grads(impl, chunk_size, image, text, semantic, log_scale) for impl in impls}
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        n = batch // world
        rows = slice(rank * n, (rank + 1) * n)
        errors = {}
        for impl in impls:
            total, d_image, d_text, d_scale = _objective_loss_and_grads(
                impl, chunk_size, image[rows], text[rows], semantic[rows], log_scale)
            stats = torch.stack([total, d_scale.reshape(())])
            dist.all_reduce(stats)
            gathered = []
            for grad in (d_image, d_text):
                parts = [torch.empty_like(grad) for _ in range(world)]
                dist.all_gather(parts, grad.contiguous())
                gathered.append(torch.cat(parts) / world)
            ref_total, ref_image, ref_text, ref_scale = single[impl]
            errors[impl] = {"loss": relative_error(stats[0] / world, ref_total),
                            "grad": max(relative_error(gathered[0], ref_image), relative_error(gathered[1], ref_text),
                                        relative_error(stats[1] / world, ref_scale.reshape(())))}
        return {"rank": rank, "world": world, "errors": errors}
    finally:
        dist.destroy_process_group()


def distributed_row(rank_results: list[dict], backend: str, batch: int,
                    tolerance: float = DISTRIBUTED_TOLERANCE) -> Row:
    """The verdict of the two-process check from every rank's report (each rank compares the same all-reduced
    figures; the worst one counts)."""
    worst = {}
    for report in rank_results:
        for impl, errs in report["errors"].items():
            for key, value in errs.items():
                worst.setdefault(impl, {}).setdefault(key, 0.0)
                worst[impl][key] = max(worst[impl][key], value)
    holds = all(v <= tolerance for errs in worst.values() for v in errs.values())
    parts = [f"{impl}: loss err {e['loss']:.1e}, grad err {e['grad']:.1e}" for impl, e in worst.items()]
    result = (f"{len(rank_results)} ranks, global batch {batch}: " + "; ".join(parts) +
              f" (tol {tolerance:.0e}) vs one process")
    return Row(f"{backend} 2 ranks = 1 process", PASS if holds else FAIL, result, correctness=True,
               figures={"backend": backend, "batch": batch, "ranks": len(rank_results), "errors": worst,
                        "tolerance": tolerance})


# ---------------------------------------------------------------------------------- 3. the training step
def step_overrides(compile: bool, precision: str = "bf16", zero_stage: int = 1) -> list[str]:
    """The fast path the step rows measure, as config overrides: every switch explicit, none left to auto."""
    return [f"fast_path.precision={precision}", f"deepspeed.zero_stage={zero_stage}",
            f"fast_path.compile={'true' if compile else 'false'}", "optim.adamw_impl=fused", "fast_path.sdpa=true"]


def step_row(config: str, batch: int, *, compile: bool, precision: str = "bf16", zero_stage: int = 1,
             steps: int = 10, warmup: int = 3, device: str = "auto", peak_tflops: float = 0.0,
             threads: int = 0) -> Row:
    """Training steps of ``config`` through the trainer's engine, fast path and objective (the step benchmark) on
    synthetic inputs: samples/s, MFU, peak memory, the FLOP model's GFLOP per sample. PASS: the steps ran and the
    loss is finite."""
    from benchmarks.step_bench import BenchCase, run_case

    overrides = step_overrides(compile, precision, zero_stage)
    label = f"step {Path(str(config)).stem} {precision} compile {'on' if compile else 'off'}"
    r = run_case(BenchCase(config=config, overrides=overrides, label=label, batch=batch, steps=steps,
                           warmup=warmup, device=device, peak_tflops=peak_tflops, threads=threads))
    figures = {"config": config, "batch": r.batch, "device": r.device, "fast_path": r.fast_path,
               "samples_per_s": r.samples_per_s, "step_ms": 1e3 * r.step_s, "gflop_per_sample": r.gflop_per_sample,
               "tflops": r.tflops, "mfu": r.mfu, "peak_tflops": r.peak_tflops, "peak_mem_gib": r.peak_mem_gib,
               "warmup_s": r.warmup_s, "loss": r.loss, "steps": r.steps}
    mfu = f"MFU {100 * r.mfu:.1f} %" if r.mfu is not None else "MFU - (no peak)"
    result = (f"batch {r.batch}: {r.samples_per_s:.1f} samples/s ({1e3 * r.step_s:.1f} ms/step), "
              f"{r.gflop_per_sample:.4g} GFLOP/sample, {r.tflops:.4g} TFLOP/s, {mfu}, peak {r.peak_mem_gib:.2f} GiB, "
              f"warm-up {r.warmup_s:.1f} s, loss {r.loss:.4f}")
    return Row(label, PASS if math.isfinite(r.loss) else FAIL, result, correctness=True, figures=figures)


# -------------------------------------------------------------------------------------- 5. the data path
def data_row(step_samples_per_s: Optional[float], *, gpus: int = 1, samples: int = 512, shards: int = 4,
             source_size: int = 256, image_size: int = 224, batch: int = 64, workers: int = 1) -> Row:
    """Decoded + augmented + tokenised samples/s of the real loader with ``workers`` workers on photo-like JPEG
    shards written here (tools/bench_data.py), per worker, and the workers one GPU needs at the step rate.
    WARN when ``gpus`` x that exceeds the cores this process may use."""
    import bench_data  # tools/bench_data.py: the data benchmark's shard writer and loader measurement

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_shard = max(1, samples // shards)
    with tempfile.TemporaryDirectory(prefix="gpu_check_data_") as tmp:
        bench_data.write_bench_shards(Path(tmp), shards, per_shard, source_size)
        spec = str(Path(tmp) / f"{{00000..{shards - 1:05d}}}.tar")
        measured = bench_data.run_case("ours", spec, workers, per_shard * shards, batch, image_size)
    rate, first_batch_s, cpu_ms = measured["rate"], measured["startup"], measured["cpu_ms"]
    per_worker = rate / max(workers, 1)
    needed = math.ceil(step_samples_per_s / per_worker) if step_samples_per_s else None
    figures = {"workers": workers, "samples_per_s": rate, "samples_per_s_per_worker": per_worker,
               "cpu_ms_per_sample": cpu_ms, "first_batch_s": first_batch_s, "cores": cores, "gpus": gpus,
               "image_size": image_size, "source_size": source_size, "step_samples_per_s": step_samples_per_s,
               "workers_per_gpu": needed}
    result = (f"{per_worker:.0f} samples/s per worker ({cpu_ms:.2f} CPU ms/sample, {source_size}-px JPEG -> "
              f"{image_size}); ")
    if needed is None:
        verdict, result = INFO, result + "no step rate measured: workers per GPU unknown"
    else:
        verdict = WARN if needed * gpus > cores else INFO
        result += (f"{step_samples_per_s:.0f} samples/s per GPU needs {needed} worker(s) per GPU: {needed * gpus} "
                   f"for {gpus} GPU(s) on {cores} cores")
    return Row(f"data path, {workers} worker(s)", verdict, result, figures=figures)


# Device-decoded pixels (nvJPEG) against the workers' libjpeg-turbo ones, in 0..255 levels: nvJPEG's IDCT and
# chroma upsampling differ from libjpeg's islow IDCT and fancy upsampling by a level or two; more means a decoder
# or crop mismatch.
DEVICE_DECODE_MEAN_LEVELS = 1.0


def device_decode_row(step_samples_per_s: Optional[float], *, gpus: int = 1, samples: int = 512, shards: int = 4,
                      source_size: int = 256, image_size: int = 224, batch: int = 64, workers: int = 1,
                      device: str = "cuda") -> Row:
    """``data.decode: gpu``: samples/s of the device's batched decode + crop + resize (alignclip.data.device_decode,
    nvJPEG on CUDA), its peak memory, its pixels against the CPU path's on the same batches, and the workers a GPU
    needs when they only read, check and tokenise (the plan table's gpu column, docs/data.md)."""
    import torch

    import bench_data
    from alignclip.config import load_config
    from alignclip.data import build_train_loader
    from alignclip.data.device_decode import device_images

    dev = torch.device(device)
    per_shard = max(1, samples // shards)
    with tempfile.TemporaryDirectory(prefix="gpu_check_decode_") as tmp:
        bench_data.write_bench_shards(Path(tmp), shards, per_shard, source_size)
        spec = str(Path(tmp) / f"{{00000..{shards - 1:05d}}}.tar")
        overrides = [f"data.train={spec}", "data.workers=0", f"data.samples_per_epoch={per_shard * shards}",
                     f"train.global_batch_size={batch}", f"model.vision.image_size={image_size}"]
        cpu = list(build_train_loader(load_config(None, overrides), 0, 1, 0))
        gpu = list(build_train_loader(load_config(None, overrides + ["data.decode=gpu"]), 0, 1, 0))
        workers_side = bench_data.run_case("ours", spec, workers, per_shard * shards, batch, image_size, "gpu")
    device_images(gpu[0], dev)  # warm-up: nvJPEG handles, kernels
    _sync(dev)
    start = time.perf_counter()
    peak = _peak_mib(dev, lambda: [device_images(b, dev) for b in gpu])
    seconds = time.perf_counter() - start
    rate = sum(len(b["key"]) for b in gpu) / seconds
    diffs = [(device_images(g, dev).cpu().int() - c["image"].int()).abs() for g, c in zip(gpu, cpu)]
    mean_diff = float(torch.cat([d.flatten() for d in diffs]).float().mean())
    max_diff = int(max(int(d.max()) for d in diffs))
    per_worker = workers_side["rate"] / max(workers, 1)
    needed = math.ceil(step_samples_per_s / per_worker) if step_samples_per_s else None
    figures = {"device_samples_per_s": rate, "peak_mib": peak, "mean_abs_diff": mean_diff, "max_abs_diff": max_diff,
               "worker_samples_per_s": per_worker, "worker_cpu_ms_per_sample": workers_side["cpu_ms"],
               "workers_per_gpu": needed, "step_samples_per_s": step_samples_per_s, "gpus": gpus,
               "source_size": source_size, "image_size": image_size, "batch": batch}
    result = (f"device decode + crop {rate:.0f} samples/s, peak {peak or 0:.0f} MiB; vs CPU path mean "
              f"{mean_diff:.2f} / max {max_diff} levels; workers {per_worker:.0f} samples/s each "
              f"({workers_side['cpu_ms']:.2f} CPU ms/sample)")
    if needed is not None:
        result += f"; {step_samples_per_s:.0f} samples/s per GPU needs {needed} worker(s) per GPU"
    verdict = WARN if mean_diff > DEVICE_DECODE_MEAN_LEVELS else INFO
    return Row("data decode gpu", verdict, result, figures=figures)
