"""The embedded default, end to end (what ``make run`` runs): a tiny CLIP and a tiny AlignCLIP trained on the same
generated data with the same budget, then measured side by side.

    python -m alignclip.run_default                   # both models, into runs/embedded/{clip,alignclip}
    python -m alignclip.run_default --only alignclip  # one of them (clip | alignclip)
    python -m alignclip.run_default key=value ...     # config overrides for both, as for alignclip.train

Steps: render the generated shards if absent (under ``$ALIGNCLIP_CACHE/generated``, default
``~/.cache/alignclip/generated``; generator v3, whose captions name one object of each scene by its shape, so a
modality gap opens as with real image-text pairs: Schrodi et al. 2025, arXiv:2404.07983); for AlignCLIP encode every
caption once with the offline MiniLM into sidecar files next to the shards (the precomputed path, so the training
step never runs SBERT); train each model (resuming if its run directory has a checkpoint of the same model and
recipe; one of another, e.g. an earlier embedded default, is renamed aside and the model trained anew); export it, encode the
held-out split and the train split (the linear probes fit on it) once, and print the gap metrics (Eslami & de
Melo 2025, arXiv:2406.17639, Table 1), zero-shot per task, retrieval and linear probes side by side, with the paths
of the plots.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Optional

from alignclip.config import CONFIG_DIR, Config, ConfigError, load_config
from alignclip.errors import run_command

DEFAULT_CONFIG = CONFIG_DIR / "experiment" / "embedded_default.yaml"
CLIP_CONFIG = CONFIG_DIR / "experiment" / "embedded_clip.yaml"
PROG = "alignclip-run-default"
MODELS = {"clip": ("CLIP", CLIP_CONFIG), "alignclip": ("AlignCLIP", DEFAULT_CONFIG)}

# Rows of the side-by-side table: (label, where in the measurement, format).
GAP_ROWS = [("alignment (mean paired cosine, higher = smaller gap)", "alignment_score"),
            ("L2M (centroid distance, lower = smaller gap)", "centroid_distance"),
            ("RMG (relative modality gap, L2)", "rmg_l2"),
            ("linear separability (0.5 = modalities overlap)", "linear_separability"),
            ("uniformity (mean of both modalities)", "uniformity")]


def _defaults_for_a_laptop() -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the default run reaches for a hub
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from alignclip.paths import cache_dir

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(cache_dir("torch_extensions")))


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def measure(result, config: Config) -> tuple[dict, object]:
    """Export the final checkpoint, encode the generated validation split and train split (the linear probes'
    fitting set) once each, and measure: ({"gap": ..., "tasks": ...}, the validation EmbeddingSet). The same path
    as the study's."""
    from alignclip.study.measure import EvalSet, encode_with_probe, export_run, measure_set

    step = result.checkpoint.name
    exported = export_run(result.checkpoint, result.run_dir / "export" / f"{step}.safetensors")
    es, train = encode_with_probe(exported, EvalSet("generated", probe_split="train"),
                                  result.run_dir / "embeddings" / f"{step}-val")
    return measure_set(es, train=train), es


def _chance(es, task: str) -> float:
    return 1.0 / len(es.zeroshot[task].classnames)


def side_by_side(names: list[str], figures: dict[str, dict], sets: dict, walls: dict[str, float]) -> str:
    """The comparison table: gap metrics, zero-shot top-1 per task (with chance), retrieval, linear probes."""
    rows: list[tuple[str, list[str]]] = []
    for label, key in GAP_ROWS:
        rows.append((label, [f"{figures[n]['gap'][key]:.3f}" for n in names]))
    first = sets[names[0]]
    for task in first.zeroshot:
        rows.append((f"zero-shot {task} top-1 (chance {_chance(first, task):.3f})",
                     [f"{figures[n]['tasks'][f'zeroshot_{task}']['acc1']:.3f}" for n in names]))
    for direction, key in (("image->text", "text_retrieval"), ("text->image", "image_retrieval")):
        for k in (1, 5):
            rows.append((f"retrieval {direction} R@{k} ({len(first.image)} images)",
                         [f"{figures[n]['tasks']['retrieval'][f'{key}_recall@{k}']:.3f}" for n in names]))
    for task in first.zeroshot:
        if f"linear_probe_{task}" in figures[names[0]]["tasks"]:
            rows.append((f"linear probe {task} top-1",
                         [f"{figures[n]['tasks'][f'linear_probe_{task}']['acc1']:.3f}" for n in names]))
    if "arithmetic" in figures[names[0]]["tasks"]:
        rows.append(("multimodal arithmetic R@1",
                     [f"{figures[n]['tasks']['arithmetic']['arithmetic_recall@1']:.3f}" for n in names]))
    rows.append(("wall time (s: data prep, training, measuring)", [f"{walls[n]:.0f}" for n in names]))
    width = max(len(label) for label, _ in rows)
    lines = [f"{'':<{width}}  " + "  ".join(f"{n:>10}" for n in names)]
    lines += [f"{label:<{width}}  " + "  ".join(f"{v:>10}" for v in values) for label, values in rows]
    return "\n".join(lines)


def set_aside_if_other(run_dir: Path, config: Config) -> Optional[Path]:
    """A run directory that another model or recipe trained (an earlier embedded default, other overrides) is
    renamed to ``<name>.earlier-<time>`` and the path returned, so that this command trains anew instead of
    refusing the resume; nothing is deleted. None when there is nothing to resume or the same run continues."""
    from alignclip.config import from_yaml_text
    from alignclip.fs import move_durably
    from alignclip.training.plan import CONFIG_FILE, config_changes

    saved = run_dir / CONFIG_FILE
    if not saved.is_file():
        return None
    changed = [c for c in config_changes(from_yaml_text(saved.read_text()), config) if c.kind != "free"]
    if not changed:
        return None
    stamp = f"{run_dir.name}.earlier-{time.strftime('%Y%m%d-%H%M%S')}"
    aside, n = run_dir.with_name(stamp), 1
    while aside.exists():  # set aside twice within a second
        n += 1
        aside = run_dir.with_name(f"{stamp}-{n}")
    aside = move_durably(run_dir, aside)
    print(f"{run_dir} was trained with other values ({'; '.join(c.describe() for c in changed[:4])}"
          f"{'; ...' if len(changed) > 4 else ''}): kept as {aside}, training anew", flush=True)
    return aside


def run_one(config_path: Path, overrides: list[str], run_dir: Path) -> tuple[object, Config]:
    from alignclip.study.prepare import prepare_data
    from alignclip.training.trainer import train

    config = prepare_data(load_config(config_path, overrides + [f"run_dir={run_dir}"]))
    set_aside_if_other(run_dir, config)  # compared as resolved, the data's real paths included
    return train(config), config


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=list(MODELS), help="train and measure one model only")
    parser.add_argument("--out", default="runs/embedded", help="folder of the runs and plots (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides (both models)")
    args = parser.parse_args(argv)
    out = Path(args.out).absolute()
    chosen = [args.only] if args.only else list(MODELS)

    def check_configs() -> None:  # every config before anything is imported or trained: a typo exits 2 at once
        for key in chosen:
            load_config(MODELS[key][1], args.overrides)

    if run_command(PROG, check_configs, errors=(ConfigError,)):
        return 2
    _defaults_for_a_laptop()
    names, figures, sets, walls, exit_code = [], {}, {}, {}, 0
    for key in chosen:
        name, path = MODELS[key]
        started = time.perf_counter()
        print(f"== {name}: {path.name}", flush=True)
        result, config = run_one(path, list(args.overrides), out / key)
        if result.exit_code != 0:
            exit_code = result.exit_code
            print(f"{name}: training stopped with exit code {result.exit_code}; resume with the same command",
                  flush=True)
            continue
        if int(os.environ.get("RANK", "0")) != 0 or result.checkpoint is None:
            continue
        figures[name], sets[name] = measure(result, config)
        walls[name] = time.perf_counter() - started
        names.append(name)
        print(f"{name}: {result.step} steps in {walls[name]:.0f} s; run directory {result.run_dir} "
              f"(checkpoints, tb/, train.log)", flush=True)
    if names:
        from alignclip.study.measure import gap_plots

        plots = gap_plots({n: sets[n] for n in names}, out / "gap", title="Embedded default: modality gap")
        print("\n" + side_by_side(names, figures, sets, walls))
        print(f"\nplots: {plots / 'cosine_cdf.png'}\n       {plots / 'pca_projection.png'}\n"
              f"       {plots / 'explained_variance.png'}\nreport: {plots / 'gap_report.md'}")
        for key in chosen:
            if MODELS[key][0] in names:
                print(f"TensorBoard ({MODELS[key][0]}): tensorboard --logdir {out / key / 'tb'}")
    return exit_code


if __name__ == "__main__":
    raise SystemExit(main())
