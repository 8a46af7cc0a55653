"""Steady-state training steps of a model config on whatever device exists: samples/s, MFU, memory, time split.

One step here is the trainer's step (``alignclip.training.trainer.Trainer.train_step``) cut at its phase boundaries:

    data       the batch to the device (synthetic: made on the device once, so this is ~0; with ``with_data``: the
               real loader of ``data.train`` plus the host-to-device copy, plus SBERT when embeddings are online)
    forward    ``engine(images, tokens)``: both towers (or the shared trunk on both modalities)
    loss       the objective of the ``loss`` section (gather, CE / IMSep terms)
    backward   ``engine.backward(total)`` (DeepSpeed's gradient reduction included)
    optimizer  ``engine.step()``: clipping, AdamW, ZeRO's partitioned update

through the same DeepSpeed engine, fast-path switches and objective the trainer builds
(``alignclip.training.components.build_components``), on one device (world size 1). On CUDA each phase ends in a ``synchronize``, so its time is its own. The
figures are medians over the timed steps, after ``warmup`` untimed steps (which absorb torch.compile's compilation
and allocator growth). Model FLOPs per sample come from ``alignclip.training.flops`` and the peak from
``alignclip.training.peaks``; MFU is left blank when the device has no known peak (CPUs) unless one is given.

Peak memory: CUDA ``max_memory_allocated`` over the timed steps; CPU the resident-set high-water mark (VmHWM, reset
after the warm-up), which includes the libraries (~0.5 GiB of torch + DeepSpeed).

``run_isolated`` runs each case in a fresh child process (``python -m benchmarks.step_bench CASE_JSON``,
with ``tools/`` on the path), so
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
from pathlib import Path
from typing import Optional

from benchmarks.host_memory import reset_peak_rss, status_kib

TOOLS_DIR = str(Path(__file__).resolve().parent.parent)  # holds this package (benchmarks)
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
    peak_tflops: float = 0.0  # > 0 overrides the table (fast_path.peak_tflops)
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
    from alignclip.distributed.env import setup_distributed_env
    from alignclip.training.components import build_components
    from alignclip.training.flops import semantic_dim_of, step_flops
    from alignclip.training.plan import plan_semantic, plan_step
    from alignclip.training.peaks import peak_tflops

    if case.threads:
        torch.set_num_threads(case.threads)
    overrides = [*case.overrides, f"train.global_batch_size={case.batch}", "train.micro_batch_size=0"]
    if case.device != "auto":
        overrides.append(f"train.device={case.device}")
    if case.with_data and not any(o.startswith("data.train=") for o in overrides):
        overrides.append("data.train=generated")
    config = load_config(case.config, overrides)
    env = setup_distributed_env()
    if env.world_size != 1:
        raise ValueError(f"the step benchmark runs one device; this process is rank {env.rank} of {env.world_size}")
    plan = plan_step(config, env)  # the trainer's device, batch layout and fast path
    parts = build_components(plan)  # the trainer's engine and objective
    engine, objective, device, fast = parts.engine, parts.objective, parts.device, parts.fast
    input_dtype = parts.input_dtype
    data = None
    if case.with_data:
        from alignclip.data.pipeline import plan_train_data

        data = plan_train_data(config, plan.layout)
    semantic = plan_semantic(config, data)  # E_s's width from the shards, the sidecar or the encoder
    semantic_dim = semantic.width or semantic_dim_of(config.loss)
    if case.with_data:
        from alignclip.semantic import CaptionEmbeddings

        captions = CaptionEmbeddings(semantic.source, device, encoder=config.loss.semantic_model,
                                     batch_size=config.loss.semantic_batch_size, non_blocking=fast.non_blocking)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if case.with_data:
        from alignclip.data import build_train_loader

        def endless():
            epoch = 0
            while True:
                yield from build_train_loader(config, 0, 1, epoch, data=data, pin_memory=fast.pin_memory)
                epoch += 1

        source = endless()
    else:
        fixed = _synthetic_batch(config, case.batch, device, input_dtype, semantic_dim, objective.needs_semantic)

    def one_step() -> tuple[dict[str, float], float]:
        marks = [time.perf_counter()]
        if case.with_data:
            host = next(source)
            images, tokens = parts.to_device(host)
            batch = {"image": images, "text": tokens}
            if objective.needs_semantic:  # from the plan's source, as the trainer reads them
                batch["semantic"] = captions(host)
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
    peak = peak_tflops(device, fast.precision, case.peak_tflops or config.fast_path.peak_tflops)
    model_name = os.path.basename(str(case.config)).removesuffix(".yaml")
    return BenchResult(label=case.label or model_name, model=model_name, batch=case.batch,
                       device=f"{device.type}:{torch.get_num_threads()}t" if device.type == "cpu" else str(device),
                       fast_path=fast.describe(), step_s=step_s, phase_s=phase_s, samples_per_s=samples_per_s,
                       gflop_per_sample=flops.total / 1e9, tflops=tflops, peak_tflops=peak,
                       mfu=tflops / peak if peak else None, peak_mem_gib=peak_mem, steps=case.steps,
                       loss=timed[-1][1], warmup_s=warmup_s)


# ------------------------------------------------------------------------------------------ child processes
def _run_child(case: BenchCase) -> BenchResult:
    cmd = [sys.executable, "-m", "benchmarks.step_bench", json.dumps(asdict(case))]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [TOOLS_DIR, os.environ.get("PYTHONPATH")])))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
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
