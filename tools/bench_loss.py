"""Benchmark the contrastive loss implementations: dense vs chunked (vs triton on CUDA), forward + backward.

    python tools/bench_loss.py                      # b in {1024, 4096, 8192}, d = 768, AlignCLIP's loss
    python tools/bench_loss.py --chunk-sizes 1024 512  # one chunked row per loss.chunk_size
    python tools/bench_loss.py --batch-sizes 32768 --impls chunked triton --device cuda
    python tools/bench_loss.py --saved-by-term --batch-sizes 512 8192   # what each dense term keeps for backward

The loss is the AlignCLIP objective through ``alignclip.losses.build_objective`` (CRsep + 1/2 IMSep image side,
rescaled with unit-norm sentence embeddings of width --semantic-dim), i.e. exactly what training runs for
``loss.impl=<impl>``; the features are leaf tensors, so the time and memory are the loss's alone.

How each figure is measured (every case runs in FRESH child processes, so one case's allocations cannot hide in
another's free lists):
  peak memory  CPU: the resident-set high-water mark (VmHWM) of a child, reset through /proc/self/clear_refs right
               after the inputs exist, minus the resident size at that moment, over one forward + backward. The
               child runs with MALLOC_MMAP_THRESHOLD_=65536 so glibc maps and unmaps every large buffer: resident
               memory then tracks live tensors instead of a heap that keeps freed pages. A warm-up at a tiny batch
               first initialises the libraries (thread pools, BLAS buffers) so they are not billed to the loss.
               CUDA: torch.cuda.max_memory_allocated() minus the allocation before the loss.
  time         median over --repeats of forward + backward, after one warm-up, in a second child with the default
               allocator (CUDA: synchronised).
Ratios are against dense at the same batch size.

``--saved-by-term`` measures something else: for each loss term alone (and the whole AlignCLIP objective), through
the dense reference, the bytes of the tensors autograd saves for backward (``torch.autograd.graph
.saved_tensors_hooks``, each storage counted once, the input features excluded): the b^2 memory that the fused
kernels remove.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time



def _case(impl: str, batch: int, dim: int, semantic_dim: int, chunk_size: int, device: str, seed: int):
    """Inputs and a closure running one forward + backward of the AlignCLIP loss."""
    import torch
    import torch.nn.functional as F

    from alignclip.config import LossConfig
    from alignclip.losses import build_objective

    cfg = LossConfig(impl=impl, clip_weight=0.0, crsep_weight=1.0, imsep_weight=0.5, imsep_sides="image",
                     imsep_rescale=True, chunk_size=chunk_size)
    objective = build_objective(cfg)
    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=gen), dim=-1).to(device).requires_grad_()
    text = F.normalize(torch.randn(batch, dim, generator=gen), dim=-1).to(device).requires_grad_()
    semantic = F.normalize(torch.randn(batch, semantic_dim, generator=gen), dim=-1).to(device)
    logit_scale = torch.tensor(2.659, device=device, requires_grad=True)

    def step():
        for leaf in (image, text, logit_scale):
            leaf.grad = None
        objective(image, text, logit_scale, semantic).total.backward()
        if device == "cuda":
            torch.cuda.synchronize()

    return step


# term label -> the LossConfig weights that turn on that term alone (the terms of docs/losses.md)
TERMS = {
    "clip": {"clip_weight": 1.0},
    "crsep": {"crsep_weight": 1.0},
    "imsep image": {"imsep_weight": 1.0, "imsep_sides": "image"},
    "imsep text": {"imsep_weight": 1.0, "imsep_sides": "text"},
    "imsep both": {"imsep_weight": 1.0, "imsep_sides": "both"},
    "imsep image D=1": {"imsep_weight": 1.0, "imsep_sides": "image", "imsep_rescale": False},
    "uniform": {"uniform_weight": 1.0},
    "xuniform": {"xuniform_weight": 1.0},
    "align": {"align_weight": 1.0},
    "AlignCLIP (crsep + 1/2 imsep)": {"crsep_weight": 1.0, "imsep_weight": 0.5},
}


def saved_for_backward_mib(weights: dict, batch: int, dim: int, semantic_dim: int) -> float:
    """MiB of the tensors the dense objective saves for backward (storages counted once, inputs excluded)."""
    import torch
    import torch.nn.functional as F

    from alignclip.config import LossConfig
    from alignclip.losses import build_objective

    objective = build_objective(LossConfig(impl="dense", **{"clip_weight": 0.0, **weights}))
    gen = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(batch, dim, generator=gen), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(batch, dim, generator=gen), dim=-1).requires_grad_()
    semantic = F.normalize(torch.randn(batch, semantic_dim, generator=gen), dim=-1)
    logit_scale = torch.tensor([2.659], requires_grad=True)
    inputs = {t.untyped_storage().data_ptr() for t in (image, text, semantic, logit_scale)}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in inputs:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        total = objective(image, text, logit_scale, semantic).total
    total.backward()
    return sum(saved.values()) / 2**20


def _saved_by_term_table(args) -> None:
    print(f"Saved for backward by the dense reference, per term alone; d={args.dim} k={args.semantic_dim}, fp32")
    header = f"{'term':>30} " + " ".join(f"{f'b={b} MiB':>14} {'b^2 floats':>10}" for b in args.batch_sizes)
    print(header)
    print("-" * len(header))
    for label, weights in TERMS.items():
        cells = []
        for batch in args.batch_sizes:
            mib = saved_for_backward_mib(weights, batch, args.dim, args.semantic_dim)
            cells.append(f"{mib:>14.1f} {mib * 2**20 / 4 / batch**2:>10.2f}")
        print(f"{label:>30} " + " ".join(cells), flush=True)


def _child(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    if args.measure == "memory":
        _case(args.impl, min(args.batch, 256), args.dim, args.semantic_dim, args.chunk_size, args.device, 1)()
        step = _case(args.impl, args.batch, args.dim, args.semantic_dim, args.chunk_size, args.device, 0)
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            step()
            return {"peak_mib": (torch.cuda.max_memory_allocated() - before) / 2**20}
        from benchmarks.host_memory import reset_peak_rss, status_kib

        reset_peak_rss()
        before = status_kib("VmRSS")
        step()
        return {"peak_mib": (status_kib("VmHWM") - before) / 1024}
    step = _case(args.impl, args.batch, args.dim, args.semantic_dim, args.chunk_size, args.device, 0)
    step()  # warm-up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times)}


def _run_child(args, impl: str, batch: int, measure: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--impl", impl, "--batch", str(batch), "--measure", measure,
           "--dim", str(args.dim), "--semantic-dim", str(args.semantic_dim), "--chunk-size", str(args.chunk_size),
           "--device", args.device, "--repeats", str(args.repeats), "--threads", str(args.threads)]
    env = dict(os.environ)
    if measure == "memory" and args.device == "cpu":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{impl} b={batch} {measure} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    from alignclip.config import LossConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--dim", type=int, default=768, help="embedding width d")
    parser.add_argument("--semantic-dim", type=int, default=768, help="sentence-embedding width k (mpnet: 768)")
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[LossConfig.chunk_size],
                        help="loss.chunk_size values for the chunked rows (default: the config's)")
    parser.add_argument("--chunk-size", type=int, default=LossConfig.chunk_size, help=argparse.SUPPRESS)
    parser.add_argument("--impls", nargs="+", default=None, help="default: dense chunked (+ triton on CUDA)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--saved-by-term", action="store_true",
                        help="print what each dense term saves for backward instead of the impl comparison")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--measure", choices=["memory", "time"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args)))
        return
    if args.saved_by_term:
        _saved_by_term_table(args)
        return
    impls = args.impls or (["dense", "chunked"] + (["triton"] if args.device == "cuda" else []))
    # (label, impl, chunk): one chunked row per chunk size; dense and triton do not tile by loss.chunk_size.
    cases = [(f"chunked/{c}" if impl == "chunked" else impl, impl, c)
             for impl in impls for c in (args.chunk_sizes if impl == "chunked" else args.chunk_sizes[:1])]
    print(f"AlignCLIP loss (CRsep + 1/2 IMSep image, rescaled), forward + backward; d={args.dim} "
          f"k={args.semantic_dim} device={args.device} threads={args.threads} median of {args.repeats}")
    print("GFLOP/s: dense-equivalent work (18 b^2 d + 2 b^2 k, the dense path's GEMMs) / time")
    header = (f"{'b':>6} {'impl':>13} {'peak MiB':>10} {'x dense':>8} {'time s':>8} {'x dense':>8} "
              f"{'GFLOP/s':>8}")
    print(header)
    print("-" * len(header))
    for batch in args.batch_sizes:
        rows = {}
        for label, impl, chunk in cases:
            args.chunk_size = chunk
            rows[label] = {**_run_child(args, impl, batch, "memory"), **_run_child(args, impl, batch, "time")}
        base = rows.get("dense")
        flops = 18 * batch**2 * args.dim + 2 * batch**2 * args.semantic_dim
        for label, r in rows.items():
            # a tiny case can fit in pages the process already had: no peak, no ratio
            mem_ratio = f"{r['peak_mib'] / base['peak_mib']:.3f}" if base and base["peak_mib"] > 0 else "-"
            time_ratio = f"{r['median_s'] / base['median_s']:.2f}" if base else "-"
            print(f"{batch:>6} {label:>13} {r['peak_mib']:>10.1f} {mem_ratio:>8} {r['median_s']:>8.3f} "
                  f"{time_ratio:>8} {flops / r['median_s'] / 1e9:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
