"""The Triton kernels equal the dense oracle, run on CPU under Triton's interpreter (fp32, small sizes).

TRITON_INTERPRET must be set before ``triton`` is first imported: ``triton.jit`` reads it when it decorates, and
that includes triton.language's own helpers (tl.zeros ...), which something in a pytest session may already have
imported. So the checks run in ONE child process started with TRITON_INTERPRET=1 (this file run as a script);
each test below reports its check's outcome from that run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback

import pytest
import torch

from alignclip.config import LossConfig
from alignclip.losses import build_objective, dense
from tests.helpers import REPO_ROOT
from tests.helpers.kernels import REL_TOL, assert_matches_dense, make_batch, relative_error, run_terms

pytest.importorskip("triton")
pytestmark = pytest.mark.heavy  # one child process runs every check under the Triton interpreter


def triton_impl(*args, **kwargs):
    from alignclip.losses import triton_kernels  # imported in the interpreted child only

    return triton_kernels.contrastive_terms(*args, **kwargs)


# ----------------------------------------------------------------- checks (run in the interpreted child process)
def check_single_process_b1_scale1():
    image, text, semantic = make_batch(1, d=40, k=24, seed=1)
    assert_matches_dense(triton_impl, image, text, semantic, 1.0)


def check_single_process_b7_scale14():
    image, text, semantic = make_batch(7, d=40, k=24, seed=7)  # d = 40: a ragged last feature chunk
    assert_matches_dense(triton_impl, image, text, semantic, 14.3)


def check_single_process_b33_scale100():
    image, text, semantic = make_batch(33, d=40, k=24, seed=33)  # 33 rows: 3 row blocks, the last ragged
    assert_matches_dense(triton_impl, image, text, semantic, 100.0)


def check_gathered_rows():
    image, text, semantic = make_batch(40, d=40, k=24, seed=2)
    assert_matches_dense(triton_impl, image, text, semantic, 100.0, offset=20, n_local=20, shared=False)


def check_anti_aligned_rows_stay_finite():
    image, text, semantic = make_batch(24, d=32, k=16, seed=3, anti_aligned=True)
    assert (image @ text.T).max() < -0.99
    assert_matches_dense(triton_impl, image, text, semantic, 100.0)


def check_negative_semantic_similarities_and_no_rescaling():
    image, text, semantic = make_batch(24, d=32, k=16, seed=5)
    semantic = torch.nn.functional.normalize(torch.cat([semantic[:12], -semantic[:12] + 0.05 * semantic[12:]]),
                                             dim=-1)
    assert (semantic @ semantic.T).min() < -0.9
    assert_matches_dense(triton_impl, image, text, semantic, 100.0)
    assert_matches_dense(triton_impl, image, text, semantic, 14.3, sides=("image",), rescale=False)


def check_objective_triton_impl():
    image, text, semantic = make_batch(20, d=32, k=16, seed=11)
    results = {}
    for impl in ("dense", "triton"):
        cfg = LossConfig(impl=impl, clip_weight=0.0, crsep_weight=1.0, imsep_weight=0.5, imsep_sides="image")
        v, t = image.clone().requires_grad_(), text.clone().requires_grad_()
        logit_scale = torch.tensor(2.659, requires_grad=True)
        out = build_objective(cfg)(v, t, logit_scale, semantic)
        out.total.backward()
        results[impl] = (out.total.detach(), v.grad, t.grad, logit_scale.grad)
    for a, e in zip(results["triton"], results["dense"]):
        assert relative_error(a, e) <= REL_TOL


CHECKS = {name[len("check_"):]: fn for name, fn in list(globals().items()) if name.startswith("check_")}


def _run_checks() -> dict:
    outcomes = {}
    for name, check in CHECKS.items():
        try:
            check()
            outcomes[name] = None
        except Exception:
            outcomes[name] = traceback.format_exc()
    return outcomes


# ------------------------------------------------------------------------------------------- the pytest side
@pytest.fixture(scope="module")
def interpreted_outcomes():
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])  # tests.helpers, alignclip
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("check", list(CHECKS))
def test_triton_interpreted_matches_dense(interpreted_outcomes, check):
    failure = interpreted_outcomes[check]
    assert failure is None, failure


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 Triton check needs a CUDA GPU (the interpreter's "
                    "bf16 dot is wrong, so it cannot run on CPU)")
def test_triton_bf16_on_cuda_close_to_fp32_dense():
    image, text, semantic = make_batch(1000, d=768, k=768, seed=4)
    expected = run_terms(dense.contrastive_terms, image, text, semantic, 100.0)
    actual = run_terms(triton_impl, image.cuda().bfloat16(), text.cuda().bfloat16(), semantic.cuda().bfloat16(),
                       100.0)
    for a, e in zip(actual, expected):
        assert relative_error(a.float().cpu(), e) <= 2e-2


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1 (see the module docstring)"
    torch.set_num_threads(1)
    print(json.dumps(_run_checks()))
