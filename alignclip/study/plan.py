"""What a study will cost before anything is submitted: runs x GPU-hours from the FLOP model.

Per trained variant: model FLOPs per sample of one training step (alignclip.training.flops, the PaLM appendix B
convention MFU is defined with) x samples per epoch x epochs (or x global batch x ``train.max_steps``) = the run's
FLOPs; divided by the GPU's dense peak x the assumed MFU = GPU-seconds. Wall time per run = GPU-hours / (nodes x
GPUs per node). Post-hoc variants train nothing and cost no GPU-hours here. The MFU is an assumption the user
states (``plan.mfu``; docs/performance.md measures what the trainer reaches), so the plan says it next to every
figure.
"""

from __future__ import annotations

from dataclasses import dataclass

from alignclip.study.spec import StudySpec, run_overrides, write_variant_config


@dataclass(frozen=True)
class RunCost:
    variant: str
    steps: int
    flops_per_sample: float  # model FLOPs of one training step, per sample
    run_flops: float
    gpu_hours: float  # per run
    wall_hours: float  # per run, on plan.nodes x plan.gpus_per_node GPUs


def plan_study(spec: StudySpec, samples: int) -> list[RunCost]:
    """One RunCost per trained variant (every seed costs the same), for an epoch of ``samples`` samples."""
    import tempfile
    from pathlib import Path

    from alignclip.config import load_config
    from alignclip.training.flops import step_flops

    p = spec.plan
    gpus = p.nodes * p.gpus_per_node
    costs = []
    with tempfile.TemporaryDirectory(prefix="alignclip_plan_") as scratch:
        for variant in spec.variants:
            if not variant.trains:
                continue
            config = load_config(write_variant_config(spec, variant, Path(scratch)),
                                 run_overrides(spec, variant, 0))
            batch = config.train.global_batch_size
            if variant.finetune is not None:
                steps = variant.finetune.steps
            elif config.train.max_steps:
                steps = config.train.max_steps
            else:
                steps = config.train.epochs * (samples // batch)
            per_sample = step_flops(config).total
            run_flops = per_sample * batch * steps
            gpu_hours = run_flops / (p.peak_tflops * 1e12 * p.mfu) / 3600
            costs.append(RunCost(variant.name, steps, per_sample, run_flops, gpu_hours, gpu_hours / gpus))
    return costs


def _num(x: float) -> str:
    """Thousands separators from 10 up, two significant digits below (a CPU-sized study's hours are tiny)."""
    return f"{x:,.0f}" if x >= 10 else f"{x:.2g}"


def plan_table(spec: StudySpec, samples: int) -> str:
    """The plan as Markdown: one row per variant (x seeds), the totals, and the assumptions."""
    p = spec.plan
    costs = plan_study(spec, samples)
    seeds = len(spec.seeds)
    lines = [f"Cost plan for study {spec.name}: {samples:,} samples per epoch, {p.gpu} at {p.peak_tflops:g} dense "
             f"TFLOP/s, assumed MFU {p.mfu:.0%}, {p.nodes} node(s) x {p.gpus_per_node} GPUs per run", "",
             "| variant | runs | steps | GFLOP / sample / step | PFLOP per run | GPU-hours per run | wall time per run "
             "| GPU-hours (all seeds) |",
             "|---|---|---|---|---|---|---|---|"]
    for c in costs:
        lines.append(f"| {c.variant} | {seeds} | {c.steps:,} | {_num(c.flops_per_sample / 1e9)} | "
                     f"{_num(c.run_flops / 1e15)} | {_num(c.gpu_hours)} | {_num(c.wall_hours)} h | "
                     f"{_num(c.gpu_hours * seeds)} |")
    total = sum(c.gpu_hours for c in costs) * seeds
    lines += [f"| **total** | {seeds * len(costs)} | | | | | | **{_num(total)}** |", ""]
    skipped = [v.name for v in spec.variants if not v.trains]
    if skipped:
        lines += [f"Post-hoc variants ({', '.join(skipped)}) train nothing: their cost is one encoding pass.", ""]
    return "\n".join(lines)
