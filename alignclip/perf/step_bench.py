"""Steady-state training steps of a model config on whatever device exists: samples/s, MFU, memory, time split.

One step here is the trainer's step (``alignclip.training.loop._train_step``) cut at its phase boundaries:

    data       the batch to the device (synthetic: made on the device once, so this is ~0; with ``with_data``: the
               real loader of ``data.train`` plus the host-to-device copy, plus SBERT when embeddings are online)
    forward    ``engine(images, tokens)``: both towers (or the shared trunk on both modalities)
    loss       the objective of the ``loss`` section (gather, CE / IMSep terms)
    backward   ``engine.backward(total)`` (DeepSpeed's gradient reduction included)
    optimizer  ``engine.step()``: clipping, AdamW, ZeRO's partitioned update

through the same DeepSpeed engine, fast-path switches (``alignclip.perf.fast_path``) and objective the trainer
builds, on one device (world size 1). On CUDA each phase ends in a ``synchronize``, so its time is its own. The
figures are medians over the timed steps, after ``warmup`` untimed steps (which absorb torch.compile's compilation
and allocator growth). Model FLOPs per sample come from ``alignclip.perf.flops`` and the peak from
``alignclip.perf.peaks``; MFU is left blank when the device has no known peak (CPUs) unless one is given.

Peak memory: CUDA ``max_memory_allocated`` over the timed steps; CPU the resident-set high-water mark (VmHWM, reset
after the warm-up), which includes the libraries (~0.5 GiB of torch + DeepSpeed).

``run_isolated`` runs each case in a fresh child process (``python -m alignclip.perf.step_bench CASE_JSON``), so
one case's compiled graphs, allocator and thread pools cannot leak into the next; ``rounds`` > 1 interleaves the
cases and reports each case's median over rounds, for a fair side-by-side under a drifting machine load.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

from alignclip.perf.host_memory import reset_peak_rss, status_kib

PHASES = ("data", "forward", "loss", "backward", "optimizer")


@dataclass
class BenchCase:
    config: str  # a YAML path or a name under configs/
    overrides: list[str] = field(default_factory=list)
    label: str = ""
    batch: int = 8  # per device (= the global batch: the bench runs one device)
    steps: int = 5
    warmup: int = 2
    device: str = "auto"
    with_data: bool = False
    peak_tflops: float = 0.0  # > 0 overrides the table (train.peak_tflops)
    threads: int = 0  # CPU threads; 0 = torch's default


@dataclass
class BenchResult:
    label: str
    model: str
    batch: int
    device: str
    fast_path: str
    step_s: float
    phase_s: dict[str, float]
    samples_per_s: float
    gflop_per_sample: float  # model FLOPs of one training step, per sample
    tflops: float  # achieved model TFLOP/s of the device
    peak_tflops: Optional[float]
    mfu: Optional[float]
    peak_mem_gib: float
    steps: int
    loss: float
    warmup_s: float = 0.0  # the untimed first steps together: torch.compile's compilation shows here


def _reset_peak_memory(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()


def _peak_memory_gib(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        return status_kib("VmHWM") / 2**20
    except (OSError, AttributeError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _ensure_process_group(device_type: str) -> None:
    """DeepSpeed needs a process group: a one-rank group on a free local port unless a launcher made one."""
    import socket

    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    deepspeed.init_distributed(dist_backend="nccl" if device_type == "cuda" else "gloo", auto_mpi_discovery=False,
                               verbose=False)


def _synthetic_batch(config, batch: int, device, input_dtype, semantic_dim: int, needs_semantic: bool) -> dict:
    """Inputs made on the device: normalised-image-like noise, token rows ending in the end-of-text id (the
    largest id, where the text is pooled), unit sentence embeddings (the precomputed path)."""
    import torch

    gen = torch.Generator(device=device).manual_seed(0)
    v, t = config.model.vision, config.model.text
    images = torch.randn(batch, 3, v.image_size, v.image_size, device=device, generator=gen).to(input_dtype)
    tokens = torch.randint(1, t.vocab_size - 2, (batch, t.context_length), device=device, generator=gen)
    tokens[:, 0], tokens[:, -1] = t.vocab_size - 2, t.vocab_size - 1  # <start> ... <end>
    out = {"image": images, "text": tokens}
    if needs_semantic:
        out["semantic"] = torch.nn.functional.normalize(
            torch.randn(batch, semantic_dim, device=device, generator=gen), dim=-1)
    return out


def run_case(case: BenchCase) -> BenchResult:
    """Build the trainer's engine for ``case`` in this process and time its steps."""
    import torch

    from alignclip.config import load_config
    from alignclip.losses import build_objective
    from alignclip.models import build_model
    from alignclip.perf import fast_path as fp
    from alignclip.perf.flops import semantic_dim_of, step_flops
    from alignclip.perf.peaks import peak_tflops
    from alignclip.training.deepspeed_config import build_deepspeed_config, resolve_device
    from alignclip.training.engine import initialize_engine
    from alignclip.training.optim import build_optimizer

    if case.threads:
        torch.set_num_threads(case.threads)
    overrides = [*case.overrides, f"train.global_batch_size={case.batch}", "train.micro_batch_size=0"]
    if case.device != "auto":
        overrides.append(f"train.device={case.device}")
    if case.with_data and not any(o.startswith("data.train=") for o in overrides):
        overrides.append("data.train=generated")
    config = load_config(case.config, overrides)
    device_type = resolve_device(config.train.device)
    device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    _ensure_process_group(device_type)
    fast = fp.resolve_fast_path(config, device_type)

    torch.manual_seed(config.train.seed)
    model = fp.prepare_model(build_model(config.model), fast)
    engine = initialize_engine(model, build_optimizer(model, config.train, fast.adamw_impl),
                               build_deepspeed_config(config, 1, device_type))
    fp.compile_engine(engine, fast)
    objective = build_objective(config.loss).to(device)
    input_dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
    semantic_dim = semantic_dim_of(config.loss)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if case.with_data:
        from alignclip.data import build_train_loader

        def endless():
            epoch = 0
            while True:
                yield from build_train_loader(config, 0, 1, epoch)
                epoch += 1

        source, encoder = endless(), None
    else:
        fixed = _synthetic_batch(config, case.batch, device, input_dtype, semantic_dim, objective.needs_semantic)

    def one_step() -> tuple[dict[str, float], float]:
        nonlocal encoder
        marks = [time.perf_counter()]
        if case.with_data:
            host = next(source)
            batch = {"image": fp.images_to_device(host["image"], device, input_dtype, fast),
                     "text": fp.tokens_to_device(host["text"], device, fast)}
            if objective.needs_semantic:
                if host.get("semantic") is not None:
                    batch["semantic"] = host["semantic"].to(device, non_blocking=fast.non_blocking).float()
                else:  # online SBERT, as the trainer does when the shards carry no embedding
                    if encoder is None:
                        from alignclip.semantic import SemanticEncoder

                        encoder = SemanticEncoder(config.loss.semantic_model, device.type,
                                                  batch_size=config.loss.semantic_batch_size)
                    batch["semantic"] = encoder.encode(list(host["caption"])).to(device).float()
        else:
            batch = fixed
        sync()
        marks.append(time.perf_counter())
        outputs = engine(batch["image"], batch["text"])
        sync()
        marks.append(time.perf_counter())
        loss = objective(outputs["image_embeds"], outputs["text_embeds"], outputs["log_logit_scale"],
                         batch.get("semantic"))
        sync()
        marks.append(time.perf_counter())
        engine.backward(loss.total)
        sync()
        marks.append(time.perf_counter())
        engine.step()
        sync()
        marks.append(time.perf_counter())
        return {name: b - a for name, a, b in zip(PHASES, marks, marks[1:])}, float(loss.total.detach())

    started = time.perf_counter()
    for _ in range(case.warmup):
        one_step()
    warmup_s = time.perf_counter() - started
    _reset_peak_memory(device)
    timed = [one_step() for _ in range(case.steps)]
    peak_mem = _peak_memory_gib(device)

    step_s = statistics.median(sum(phases.values()) for phases, _ in timed)
    phase_s = {name: statistics.median(phases[name] for phases, _ in timed) for name in PHASES}
    flops = step_flops(config, global_batch=case.batch, semantic_dim=semantic_dim)
    samples_per_s = case.batch / step_s
    tflops = flops.total * samples_per_s / 1e12
    peak = peak_tflops(device, fast.precision, case.peak_tflops or config.train.peak_tflops)
    model_name = os.path.basename(str(case.config)).removesuffix(".yaml")
    return BenchResult(label=case.label or model_name, model=model_name, batch=case.batch,
                       device=f"{device.type}:{torch.get_num_threads()}t" if device.type == "cpu" else str(device),
                       fast_path=fast.describe(), step_s=step_s, phase_s=phase_s, samples_per_s=samples_per_s,
                       gflop_per_sample=flops.total / 1e9, tflops=tflops, peak_tflops=peak,
                       mfu=tflops / peak if peak else None, peak_mem_gib=peak_mem, steps=case.steps,
                       loss=timed[-1][1], warmup_s=warmup_s)


# ------------------------------------------------------------------------------------------ child processes
def _run_child(case: BenchCase) -> BenchResult:
    cmd = [sys.executable, "-m", "alignclip.perf.step_bench", json.dumps(asdict(case))]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"case {case.label or case.config} failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    payload = json.loads(out.stdout.strip().splitlines()[-1])
    return BenchResult(**payload)


def _median_result(results: list[BenchResult]) -> BenchResult:
    """The round whose step time is the median (its figures stay mutually consistent)."""
    ordered = sorted(results, key=lambda r: r.step_s)
    return ordered[(len(ordered) - 1) // 2]


def run_isolated(cases: list[BenchCase], rounds: int = 1, progress=None) -> list[BenchResult]:
    """Each case in a fresh child process; with ``rounds`` > 1 the cases alternate, round by round."""
    per_case: list[list[BenchResult]] = [[] for _ in cases]
    for _ in range(rounds):
        for i, case in enumerate(cases):
            per_case[i].append(_run_child(case))
            if progress:
                progress(per_case[i][-1])
    return [_median_result(results) for results in per_case]


# ------------------------------------------------------------------------------------------------- output
COLUMNS = ("case", "batch", "samples/s", "step ms", "data", "fwd", "loss", "bwd", "optim", "GFLOP/sample",
           "TFLOP/s", "MFU", "peak GiB", "warm-up s")


def format_table(results: list[BenchResult]) -> str:
    """One table: a row per case; the five phase columns are milliseconds and add up to the step; warm-up s is
    the untimed first steps together (compilation included)."""
    width = max([len(r.label) for r in results] + [4])
    head = (f"{'case':<{width}} {'batch':>5} {'samples/s':>10} {'step ms':>9} {'data':>7} {'fwd':>8} {'loss':>7} "
            f"{'bwd':>8} {'optim':>7} {'GFLOP/sample':>12} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>8} {'warm-up s':>9}")
    lines = [head, "-" * len(head)]
    for r in results:
        ms = {k: 1e3 * v for k, v in r.phase_s.items()}
        mfu = f"{100 * r.mfu:5.1f}%" if r.mfu is not None else f"{'-':>6}"
        lines.append(f"{r.label:<{width}} {r.batch:>5} {r.samples_per_s:>10.2f} {1e3 * r.step_s:>9.1f} "
                     f"{ms['data']:>7.1f} {ms['forward']:>8.1f} {ms['loss']:>7.1f} {ms['backward']:>8.1f} "
                     f"{ms['optimizer']:>7.1f} {r.gflop_per_sample:>12.4g} {r.tflops:>8.4f} {mfu} "
                     f"{r.peak_mem_gib:>8.2f} {r.warmup_s:>9.1f}")
    return "\n".join(lines)


def _child_main(argv: list[str]) -> None:
    case = BenchCase(**json.loads(argv[0]))
    print(json.dumps(asdict(run_case(case))), flush=True)


if __name__ == "__main__":
    _child_main(sys.argv[1:])
