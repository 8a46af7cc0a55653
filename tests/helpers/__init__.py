"""Helpers shared by the test modules (no test module imports another one; they all import from here).

* ``ranks``: gloo process groups in spawned processes (``run_on_ranks``, ``free_port``)
* ``tiny``: the one ``tiny_overrides`` (a toy-sized run), toy shards, an untrained export, TensorBoard
  read-back
* ``kernels``: loss-kernel batches and the comparison against the dense oracle
* ``tools``: a command's ``main`` (``alignclip.commands``) or a benchmark script of ``tools/``
* ``launch``: what the launch tests submit and read back; ``slurm_cluster``: throw-away Slurm clusters
"""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]  # the tests run from a checkout (the wheel test builds from it)
