"""Rank set-up: the ONE function that turns a launcher's environment into rank / world size / rendezvous.

Sources, first match wins:

1. torchrun (or any launcher that sets them): ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
   ``GROUP_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``.
2. submitit's local executor: ``SUBMITIT_LOCAL_GLOBALID``, ``SUBMITIT_LOCAL_NTASKS``, ``SUBMITIT_LOCAL_LOCALID``,
   ``SUBMITIT_LOCAL_NODEID``, ``SUBMITIT_LOCAL_JOB_ID``. (submitit's Slurm executor runs under ``srun`` and is
   covered by 3.)
3. Slurm, inside an ``srun`` step: ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``, ``SLURM_NODEID``,
   ``SLURM_TASKS_PER_NODE``, ``SLURM_JOB_NODELIST`` (the master is its first host), ``SLURM_JOB_ID`` (seeds the
   port, so concurrent jobs on one node do not collide). In a batch script's own shell (no ``SLURM_STEP_ID``)
   the process is alone, whatever ``SLURM_NTASKS`` says: only ``srun`` starts the other ranks.
4. Otherwise a single process on 127.0.0.1 (on a free port unless ``MASTER_PORT`` is set).

``MASTER_ADDR`` / ``MASTER_PORT`` already in the environment always win over derived values. The result is also
exported as the torchrun variables, which is what ``torch.distributed`` and ``deepspeed.initialize`` read.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, replace
from typing import Mapping, MutableMapping, Optional

# Ports 20000-39999 lie below Linux's default ephemeral range (32768+ only partly overlaps; jobs rarely get there).
_PORT_BASE = 20000
_PORT_SPAN = 20000
DEFAULT_PORT = 29500


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    node_rank: int
    source: str = "single"  # torchrun | submitit | slurm | single

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list to host names, by Slurm itself (``scontrol show hostnames``; inside a job
    scontrol has its configuration) or, where scontrol is missing or refuses the list (Slurm 22.05 does not parse
    suffixed ranges such as ``node-[001-002]-ib``, which newer Slurm writes), by ``parse_hostlist``."""
    import shutil
    import subprocess

    if not nodelist:
        return []
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=30)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.split()
        except (OSError, subprocess.TimeoutExpired):
            pass
    return parse_hostlist(nodelist)


def parse_hostlist(hostlist: str) -> list[str]:
    """Slurm's host-list syntax: names separated by top-level commas, each with any number of bracket groups of
    numbers and zero-padded ranges (``a[1-2]-ib``, ``r[1,3]n[01-02]``); several groups expand as a product."""
    names: list[str] = []
    for entry in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", hostlist):
        expanded = [""]
        for literal, group in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", entry):
            choices = [literal]
            if group:
                choices = []
                for part in group.split(","):
                    low, _, high = part.partition("-")
                    if not low.isdigit() or (high and not high.isdigit()):
                        raise ValueError(f"cannot parse the host list {hostlist!r}: bad range {part!r}")
                    width = len(low)
                    choices += [f"{literal}{i:0{width}d}" for i in range(int(low), int(high or low) + 1)]
            expanded = [head + tail for head in expanded for tail in choices]
        names += expanded
    return names


def tasks_on_node(tasks_per_node: str, node: int) -> int:
    """Tasks on node ``node`` from ``SLURM_TASKS_PER_NODE`` (``4(x2),3`` = 4, 4, 3)."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise ValueError(f"cannot parse SLURM_TASKS_PER_NODE={tasks_per_node!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[node]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_for_job(job_id: str) -> int:
    digits = re.sub(r"\D", "", job_id) or "0"
    return _PORT_BASE + int(digits) % _PORT_SPAN


def _int(env: Mapping[str, str], key: str, default: Optional[int] = None) -> int:
    value = env.get(key)
    if value is None or value == "":
        if default is None:
            raise KeyError(f"environment variable {key} is required by this launcher but is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {key}={value!r} is not an integer") from None


def detect(env: Mapping[str, str]) -> DistEnv:
    """Read a DistEnv out of ``env`` without changing anything (pure, so every launcher is unit-testable)."""
    addr = env.get("MASTER_ADDR")
    port = env.get("MASTER_PORT")
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE")
        local_world = _int(env, "LOCAL_WORLD_SIZE", world)
        return DistEnv(rank=_int(env, "RANK"), local_rank=_int(env, "LOCAL_RANK", 0), world_size=world,
                       local_world_size=local_world, master_addr=addr or "127.0.0.1",
                       master_port=int(port or DEFAULT_PORT), node_rank=_int(env, "GROUP_RANK", 0),
                       source="torchrun")
    if "SUBMITIT_LOCAL_GLOBALID" in env:
        world = _int(env, "SUBMITIT_LOCAL_NTASKS")
        job = env.get("SUBMITIT_LOCAL_JOB_ID", "0")
        return DistEnv(rank=_int(env, "SUBMITIT_LOCAL_GLOBALID"), local_rank=_int(env, "SUBMITIT_LOCAL_LOCALID", 0),
                       world_size=world, local_world_size=world, master_addr=addr or "127.0.0.1",
                       master_port=int(port or port_for_job(job)), node_rank=_int(env, "SUBMITIT_LOCAL_NODEID", 0),
                       source="submitit")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and ("SLURM_STEP_ID" in env or env["SLURM_NTASKS"] == "1"):
        node = _int(env, "SLURM_NODEID", 0)
        world = _int(env, "SLURM_NTASKS")
        local_world = (tasks_on_node(env["SLURM_TASKS_PER_NODE"], node) if env.get("SLURM_TASKS_PER_NODE")
                       else _int(env, "SLURM_NTASKS_PER_NODE", world))
        hosts = expand_nodelist(env.get("SLURM_JOB_NODELIST", "") or env.get("SLURM_NODELIST", ""))
        return DistEnv(rank=_int(env, "SLURM_PROCID"), local_rank=_int(env, "SLURM_LOCALID", 0), world_size=world,
                       local_world_size=local_world, master_addr=addr or (hosts[0] if hosts else "127.0.0.1"),
                       master_port=int(port or port_for_job(env.get("SLURM_JOB_ID", "0"))), node_rank=node,
                       source="slurm")
    return DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, master_addr=addr or "127.0.0.1",
                   master_port=int(port or DEFAULT_PORT), node_rank=0, source="single")


def setup_distributed_env(environ: Optional[MutableMapping[str, str]] = None) -> DistEnv:
    """Detect the launcher, export the torchrun variables into ``environ`` (default ``os.environ``), return them."""
    environ = os.environ if environ is None else environ
    dist_env = detect(environ)
    if dist_env.source == "single" and not environ.get("MASTER_PORT"):
        # alone: any free port will do, and a fixed one collides with other jobs on the same machine
        dist_env = replace(dist_env, master_port=_free_port())
    if not 0 <= dist_env.rank < dist_env.world_size:
        raise ValueError(f"rank {dist_env.rank} is outside world size {dist_env.world_size} "
                         f"(launcher variables from {dist_env.source})")
    environ.update(RANK=str(dist_env.rank), LOCAL_RANK=str(dist_env.local_rank),
                   WORLD_SIZE=str(dist_env.world_size), LOCAL_WORLD_SIZE=str(dist_env.local_world_size),
                   GROUP_RANK=str(dist_env.node_rank), MASTER_ADDR=dist_env.master_addr,
                   MASTER_PORT=str(dist_env.master_port))
    return dist_env
