"""Run a study: train the grid through the submitit launcher, then measure every run, resumably.

Each (variant, seed) run has a stable folder ``<study>/runs/<variant>/seed<k>``. A run that finished carries a
marker (``study_done.json``, written by the job itself after the trainer exits 0); a rerun of the study skips it.
Any other run is (re)submitted: the trainer resumes from its latest checkpoint, so a run killed halfway loses at
most the steps since its last checkpoint. The local executor trains one run after another (the machine's cores are
shared by the run's ranks and loader workers); Slurm gets the unfinished runs as one job array.

Measuring is cached per run and checkpoint (``<run>/study/``): the export, each evaluation set's embeddings, and
the figures; a rerun reads them back.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from alignclip.fs import atomic_write
from alignclip.launch import TrainJob, make_executor, make_run, wait_slurm
from alignclip.study.prepare import prepare_data
from alignclip.study.spec import StudySpec, last_wins, run_overrides, write_variant_config

DONE_FILE = "study_done.json"


@dataclass
class RunState:
    variant: str
    seed: int
    run_dir: Path
    status: str  # "skipped" (finished before), "trained", "failed", "pending" (not submitted: --no-train)
    detail: str = ""


class StudyJob(TrainJob):
    """TrainJob that marks its run finished (rank 0, after the trainer exited 0), so a rerun skips it."""

    def __call__(self) -> str:
        run_dir = Path(super().__call__())
        if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0:
            mark_done(run_dir)
        return str(run_dir)


def mark_done(run_dir: Path) -> None:
    from alignclip.checkpoints import find_latest

    latest = find_latest(run_dir)
    record = {"checkpoint": latest.name if latest else None, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write(run_dir / DONE_FILE, json.dumps(record) + "\n")


def is_done(run_dir: Path) -> bool:
    return (run_dir / DONE_FILE).is_file()


def final_checkpoint(run_dir: Path) -> Path:
    record = json.loads((run_dir / DONE_FILE).read_text())
    return run_dir / "checkpoints" / record["checkpoint"]


def train_grid(spec: StudySpec, log: Callable[[str], None] = print, executor: Optional[str] = None,
               train: bool = True) -> list[RunState]:
    """Submit every unfinished run; wait for them; return each run's state. Pretraining runs go first; fine-tunes
    start from their source's final checkpoint, so they go in a second wave (a fine-tune whose source run failed
    is recorded as failed without training). ``train=False``: submit nothing, unfinished runs are "pending"
    (a report of what has finished, e.g. while a Slurm array still runs)."""
    states = _train_wave(spec, [v for v in spec.variants if v.kind == "pretrain"], log, executor, train)
    tuned = [v for v in spec.variants if v.kind == "finetune"]
    if tuned:
        states += _train_wave(spec, tuned, log, executor, train)
    return states


def _train_wave(spec: StudySpec, variants: list, log: Callable[[str], None], executor: Optional[str],
                train: bool) -> list[RunState]:
    kind = executor or spec.executor
    pending, states = [], []
    for variant in variants:
        config_path = write_variant_config(spec, variant)
        for seed in spec.seeds:
            run_dir = spec.run_dir(variant.name, seed)
            if is_done(run_dir):
                states.append(RunState(variant.name, seed, run_dir, "skipped", "finished before"))
                continue
            if not train:
                states.append(RunState(variant.name, seed, run_dir, "pending", "not trained (--no-train)"))
                continue
            if variant.finetune is not None and not is_done(spec.run_dir(variant.finetune.source, seed)):
                states.append(RunState(variant.name, seed, run_dir, "failed",
                                       f"its source {variant.finetune.source} seed {seed} did not finish"))
                continue
            # a fine-tune starts from its source's final checkpoint, exported (safetensors: nothing unpickled)
            start = (str(exported_model(spec.run_dir(variant.finetune.source, seed)))
                     if variant.finetune is not None else "")
            overrides = run_overrides(spec, variant, seed, start)
            run = make_run(config_path, overrides, run_dir=run_dir)
            # generated shards + caption embeddings, once for all runs
            prepared = prepare_data(run.config, spec.study_dir / "semantic")
            if prepared.data.semantic_dir != run.config.data.semantic_dir:
                run = make_run(config_path, last_wins(overrides + [f"data.semantic_dir={prepared.data.semantic_dir}"]),
                               run_dir=run_dir)
            pending.append(run)
    done = sum(s.status == "skipped" for s in states)
    log(f"study {spec.name}: {done} run(s) finished before, {len(pending)} to train ({kind} executor)"
        + (f", {len(states) - done} not trained" if len(states) > done else ""))
    if kind == "local":
        for run in pending:  # one at a time: a 2-core workstation trains one run well, two runs badly
            log(f"  training {run.config.name} seed {run.config.train.seed} in {run.run_dir}")
            ex = make_executor(run.config, run.run_dir / "submitit", "local", job_name=run.config.name)
            job = ex.submit(StudyJob(run.config_path, run.overrides, run.config.launch.max_requeues))
            states.append(_outcome(run, job.result))
    elif pending:
        ex = make_executor(pending[0].config, spec.study_dir / "submitit", "slurm", job_name=spec.name)
        with ex.batch():
            jobs = [ex.submit(StudyJob(r.config_path, r.overrides, r.config.launch.max_requeues)) for r in pending]
        log(f"  submitted job array {jobs[0].job_id.split('_')[0]} ({len(jobs)} runs); waiting")
        wait_slurm([j.job_id for j in jobs], timeout_s=float("inf"))
        states += [_outcome(r, None) for r in pending]
    return states


def _outcome(run, result: Optional[Callable]) -> RunState:
    detail = ""
    if result is not None:
        try:
            result()
        except Exception as err:  # the job's own failure, recorded; the study goes on with the other runs
            detail = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
    status = "trained" if is_done(run.run_dir) else "failed"
    return RunState(run.config.name, run.config.train.seed, run.run_dir, status,
                    detail or ("" if status == "trained" else f"no {DONE_FILE}: see {run.run_dir}/submitit"))


def exported_model(run_dir: Path) -> Path:
    """The run's final checkpoint as one safetensors file (``<run>/study/<checkpoint>.safetensors``, made once)."""
    from alignclip.study.measure import export_run

    checkpoint = final_checkpoint(run_dir)
    return export_run(checkpoint, run_dir / "study" / f"{checkpoint.name}.safetensors")


MEASURE_VERSION = 2  # bump when a measurement gains fields: older caches are measured again (embeddings are kept)


def measure_run(spec: StudySpec, run_dir: Path, seed: int) -> dict:
    """eval set -> {"gap", "tasks", "counts"} for the run's final checkpoint (cached in ``<run>/study``)."""
    from alignclip.study.measure import encode_with_probe, measure_set

    checkpoint = final_checkpoint(run_dir)
    folder = run_dir / "study"
    cached = folder / f"measure-v{MEASURE_VERSION}-{checkpoint.name}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    model = exported_model(run_dir)
    out = {}
    for eval_set in spec.eval_sets:
        es, train = encode_with_probe(model, eval_set, folder / "embeddings" / f"{checkpoint.name}-{eval_set.name}")
        # the metric's own split seed: the same for every run
        out[eval_set.name] = measure_set(es, seed=0, train=train)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(cached, json.dumps(out, indent=1) + "\n")
    return out


def measure_posthoc(spec: StudySpec, variant, seed: int) -> dict | None:
    """eval set -> {"gap", "tasks", "counts"} of a post-hoc map fitted on the source run's fit-set embeddings and
    applied to its evaluation sets (and to the linear probes' train set); None when the source run did not finish.
    The map and the figures are cached in ``<study>/runs/<variant>/seed<k>``."""
    from alignclip.study.measure import encode_set, encode_with_probe, measure_set
    from alignclip.study.posthoc import fit_map, load_map, save_map

    source = spec.run_dir(variant.posthoc.source, seed)
    if not is_done(source):
        return None
    checkpoint = final_checkpoint(source)
    folder = spec.run_dir(variant.name, seed)
    cached = folder / f"measure-v{MEASURE_VERSION}-{variant.posthoc.source}-{checkpoint.name}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    model = exported_model(source)
    embeddings = source / "study" / "embeddings"
    map_path = folder / f"map-{variant.posthoc.map}-{variant.posthoc.fit}-{checkpoint.name}"
    method = load_map(map_path)
    if method is None:
        fit_set = spec.fit_set(variant.posthoc.fit)
        fit = encode_set(model, fit_set, embeddings / f"{checkpoint.name}-fit-{fit_set.name}")
        method = save_map(fit_map(variant.posthoc.map, fit, seed), map_path)
    out = {}
    for eval_set in spec.eval_sets:
        es, train = encode_with_probe(model, eval_set, embeddings / f"{checkpoint.name}-{eval_set.name}")
        mapped = es.mapped(method.map_image, method.map_text, variant.posthoc.map)
        train = train.mapped(method.map_image, method.map_text, variant.posthoc.map) if train is not None else None
        out[eval_set.name] = measure_set(mapped, seed=0, train=train)
    folder.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(out, indent=1) + "\n")
    return out


def embeddings_of(spec: StudySpec, variant, seed: int, eval_set_name: str):
    """The EmbeddingSet of one measured variant and seed (for the plots): a run's cache, or for a post-hoc
    variant its source's cache through the fitted map."""
    from alignclip.study.measure import load_set
    from alignclip.study.posthoc import load_map

    run_dir = spec.run_dir(variant.posthoc.source if variant.posthoc else variant.name, seed)
    checkpoint = final_checkpoint(run_dir)
    es = load_set(run_dir / "study" / "embeddings" / f"{checkpoint.name}-{eval_set_name}")
    if variant.posthoc is None:
        return es
    method = load_map(spec.run_dir(variant.name, seed) /
                      f"map-{variant.posthoc.map}-{variant.posthoc.fit}-{checkpoint.name}")
    return es.mapped(method.map_image, method.map_text, variant.posthoc.map)
