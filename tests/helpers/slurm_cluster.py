"""Throw-away Slurm clusters on this one machine, for the launch tests (what they exercise: docs/slurm.md).

* ``LocalSlurm``: munged + slurmctld + one slurmd on localhost (node name = ``hostname``).
* ``TwoNodeSlurm``: munged + slurmctld in the root namespace and two slurmds, each in its own network, UTS and
  mount namespace (``nodeN``, 10.213.0.1N on a private bridge with no default route), so a job really spans two
  "hosts" whose only link is that bridge.

Everything lives in a temporary directory with its own munge socket, ports and ``slurm.conf``; clients find it
through ``SLURM_CONF`` (``cluster.env``). ``stop()`` cancels the jobs, TERMs the daemons it started by PID, KILLs
whatever is left in its namespaces and deletes the links, namespaces and files. Needs root; when Slurm is not
installed and we are root, ``ensure_installed()`` installs Debian's packages (``apt-get update`` once, ~10 s).

Run by hand: ``python -m tests.helpers.slurm_cluster [--two-node]`` (from the repository root) starts a cluster, prints its ``SLURM_CONF`` and
stops it on Ctrl-C.
"""

from __future__ import annotations

import fcntl
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

# binary -> the Debian package that provides it
SLURM_BINARIES = {"munged": "munge", "slurmctld": "slurmctld", "slurmd": "slurmd", "sbatch": "slurm-client",
                  "srun": "slurm-client", "scontrol": "slurm-client", "squeue": "slurm-client"}
SLURM_PACKAGES = ("slurm-wlm", "slurmctld", "slurmd", "munge")
NETWORK_BINARIES = {"ip": "iproute2", "nsenter": "util-linux", "unshare": "util-linux"}
_apt_updated = False


class SlurmUnavailable(RuntimeError):
    """Slurm cannot run here (not root, no packages, no namespaces); the message says which."""


def _missing(binaries) -> list[str]:
    return [b for b in binaries if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def ensure_installed(binaries: dict[str, str] = SLURM_BINARIES, packages=SLURM_PACKAGES,
                     timeout_s: float = 300) -> None:
    """Install the packages when a binary is missing and we may (root + apt-get; ``apt-get update`` once)."""
    missing = _missing(binaries)
    if not missing:
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"{missing} are missing and installing them needs root")
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"{missing} are missing and there is no apt-get to install them")
    # Two pytest workers may both find Slurm missing: one installs, the other waits and finds it there (two
    # apt-get at once would fail on dpkg's lock).
    with open(Path(tempfile.gettempdir()) / "alignclip-slurm-install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _missing(binaries):
            _apt_install(binaries, packages, timeout_s)


def _apt_install(binaries, packages, timeout_s: float) -> None:
    global _apt_updated
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    commands = [] if _apt_updated else [["apt-get", "update", "-qq"]]
    for cmd in commands + [["apt-get", "install", "-y", "-qq", *packages]]:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0:
            raise SlurmUnavailable(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr[-2000:]}")
        _apt_updated = _apt_updated or cmd[1] == "update"
    if _missing(binaries):
        raise SlurmUnavailable(f"after installing {list(packages)}, still missing {_missing(binaries)}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_port_pair() -> int:
    """A port P with P+1 also free (slurmctld on P, slurmd on P+1)."""
    for _ in range(50):
        port = _free_port()
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise SlurmUnavailable("no two adjacent free TCP ports on localhost")


def _run(cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, **kw)
    if check and done.returncode != 0:
        raise SlurmUnavailable(f"`{' '.join(cmd)}` failed ({done.returncode}): {done.stderr.strip()}")
    return done


class _Cluster:
    """Shared machinery: a munged, a slurmctld, the slurm.conf, and stopping what was started."""

    cluster_name = "alignclip"

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="alignclip-slurm-"))
        self.root.chmod(0o755)  # munged insists that every directory above its socket is world-executable
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge.sock"
        self.ctld_port = _free_port_pair()
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        for var in [k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]:
            if var != "SLURM_CONF":  # a test run inside a Slurm job must not leak that job into ours
                del self.env[var]

    # ---- pieces the subclasses fill in
    def _node_lines(self) -> list[str]:
        raise NotImplementedError

    def _ctld_host(self) -> str:
        raise NotImplementedError

    def _start_slurmds(self) -> None:
        raise NotImplementedError

    def node_names(self) -> list[str]:
        raise NotImplementedError

    # ---- life cycle
    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.out", "ab")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=self.env, start_new_session=True)  # like nohup: our Ctrl-C is not theirs
        log.close()
        self.procs.append((name, proc))
        return proc

    def _write_conf(self) -> None:
        r = self.root
        lines = [
            f"ClusterName={self.cluster_name}",
            # job ids seed the trainer's master port: start them apart so two clusters' jobs do not share it
            f"FirstJobId={random.randrange(1000, 19000)}",
            f"SlurmctldHost={self._ctld_host()}",
            f"SlurmctldPort={self.ctld_port}",
            f"SlurmdPort={self.ctld_port + 1}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire also sets how long a requeued job waits before it may start again (default 120 s)
            f"AuthInfo=socket={self.munge_socket},cred_expire=5",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool-%n",
            f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/slurmctld.log",
            f"SlurmdLogFile={r}/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SlurmdParameters=config_overrides",  # nodes may declare more CPUs than this 2-core machine has
            "ReturnToService=2",
            "CommunicationParameters=NoInAddrAny",  # daemons and srun bind to the node's address, not 0.0.0.0
            "MpiDefault=none",
            "SwitchType=switch/none",
            "MailProg=/bin/true",
            "KillWait=5",
            "MinJobAge=600",  # keep finished jobs visible to scontrol (there is no accounting database)
            "InactiveLimit=0",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=30",
            "SchedulerParameters=sched_interval=1,bf_interval=1",  # schedule (and restart requeued jobs) at once
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            *self._node_lines(),
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self, timeout_s: float = 30) -> "_Cluster":
        if os.geteuid() != 0:
            raise SlurmUnavailable("starting slurmctld/slurmd as SlurmUser=root needs root")
        ensure_installed()
        try:
            self._start(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout_s: float) -> None:
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        (self.root / "state").mkdir()
        self._spawn("munged", ["munged", "-F", f"--key-file={key}", f"--socket={self.munge_socket}",
                               f"--pid-file={self.root}/munged.pid", f"--log-file={self.root}/munged.log",
                               f"--seed-file={self.root}/munged.seed"])
        self._wait(lambda: self.munge_socket.exists(), timeout_s, "munged to create its socket")
        self._write_conf()
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._start_slurmds()
        self._wait(self._all_idle, timeout_s, f"nodes {self.node_names()} to become idle")

    def _all_idle(self) -> bool:
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise SlurmUnavailable(f"{name} exited with {proc.returncode}: {self.tail(name)}")
        done = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True,
                              text=True, timeout=10)
        states = dict(line.split() for line in done.stdout.splitlines() if line.strip())
        return done.returncode == 0 and all(states.get(n) == "idle" for n in self.node_names())

    def _wait(self, ready, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if ready():
                return
            time.sleep(0.2)
        raise SlurmUnavailable(f"timed out after {timeout_s:.0f} s waiting for {what}; logs in {self.root}: "
                               + " | ".join(f"{n}: {self.tail(n)}" for n, _ in self.procs))

    def tail(self, name: str, n: int = 400) -> str:
        texts = []
        for path in sorted(self.root.glob(f"{name}*")):
            if path.suffix in (".log", ".out"):
                texts.append(path.read_text(errors="replace")[-n:])
        return " / ".join(texts)

    def cancel_all(self, timeout_s: float = 20) -> None:
        """Cancel every job and wait until the queue is empty (so no job step outlives the cluster)."""
        if not any(proc.poll() is None for name, proc in self.procs if name == "slurmctld"):
            return
        subprocess.run(["scancel", "--user=root"], env=self.env, capture_output=True, timeout=10)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            q = subprocess.run(["squeue", "-h"], env=self.env, capture_output=True, text=True, timeout=10)
            if q.returncode != 0 or not q.stdout.strip():
                return
            time.sleep(0.3)

    def stop(self) -> None:
        try:
            self.cancel_all()
        except Exception:
            pass
        # slurmds first (they talk to slurmctld on the way down), munged last
        for name, proc in sorted(self.procs, key=lambda p: ("slurmd" not in p[0], p[0] == "munged")):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
        self.procs.clear()
        self._stop_extra()
        shutil.rmtree(self.root, ignore_errors=True)

    def _stop_extra(self) -> None:
        pass

    def sbatch(self, *args: str, env: dict | None = None, cwd: str | Path | None = None) -> int:
        """Submit and return the job id (``--parsable``)."""
        done = subprocess.run(["sbatch", "--parsable", *args], env={**self.env, **(env or {})},
                              capture_output=True, text=True, timeout=30, cwd=cwd)
        if done.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {done.stderr}")
        return int(done.stdout.strip().split(";")[0])

    def job_field(self, job_id: int | str, field: str) -> str:
        """A field of ``scontrol show job`` (e.g. JobState, Restarts, ExitCode); '' once the job is gone."""
        done = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], env=self.env, capture_output=True,
                              text=True, timeout=10)
        for token in done.stdout.split():
            if token.startswith(field + "="):
                return token.split("=", 1)[1]
        return ""

    def wait_job(self, job_id: int | str, timeout_s: float, states=("COMPLETED", "FAILED", "CANCELLED",
                                                                      "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")) -> str:
        """Wait until the job reaches one of ``states``; returns the state (raises TimeoutError)."""
        deadline = time.monotonic() + timeout_s
        state = ""
        while time.monotonic() < deadline:
            state = self.job_field(job_id, "JobState")
            if state in states:
                return state
            time.sleep(0.5)
        subprocess.run(["scancel", str(job_id)], env=self.env, capture_output=True, timeout=10)
        raise TimeoutError(f"job {job_id} still {state or 'unknown'} after {timeout_s:.0f} s (cancelled it)")

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class LocalSlurm(_Cluster):
    """One slurmd on localhost; the node is this machine's ``hostname``."""

    def __init__(self, root=None, cpus: int = 4):
        super().__init__(root)
        self.hostname = socket.gethostname()
        self.cpus = cpus

    def _ctld_host(self) -> str:
        return f"{self.hostname}(127.0.0.1)"

    def _node_lines(self) -> list[str]:
        return [f"NodeName={self.hostname} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=4000 State=UNKNOWN"]

    def node_names(self) -> list[str]:
        return [self.hostname]

    def _start_slurmds(self) -> None:
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", self.hostname])


class TwoNodeSlurm(_Cluster):
    """Two slurmds in their own network + UTS + mount namespaces, joined by a bridge on a private subnet.

    The bridge holds 10.213.0.1 in the root namespace (where munged and slurmctld run); node1/node2 are
    10.213.0.11/.12 behind veth pairs, with no default route, so their traffic stays on this subnet. Each slurmd
    starts through ``nsenter --net`` + ``unshare --uts --mount`` (not ``ip netns exec``, which remounts /sys and
    hides the cgroup filesystem), sets its hostname and bind-mounts a private hosts file listing the nodes.
    The interface inside each namespace is ``IFNAME`` (for GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME).
    """

    cluster_name = "alignclip2"
    SUBNET = "10.213.0"
    BRIDGE = "alclipbr0"
    IFNAME = "eth0"

    def __init__(self, root=None, cpus_per_node: int = 2):
        super().__init__(root)
        self.hostname = socket.gethostname()
        self.cpus = cpus_per_node
        self.nodes = {"node1": f"{self.SUBNET}.11", "node2": f"{self.SUBNET}.12"}
        self.netns = {n: f"alclip-{n}" for n in self.nodes}

    def node_names(self) -> list[str]:
        return list(self.nodes)

    def _ctld_host(self) -> str:
        return f"{self.hostname}({self.SUBNET}.1)"

    def _node_lines(self) -> list[str]:
        return [f"NodeName={n} NodeAddr={a} NodeHostname={n} CPUs={self.cpus} RealMemory=4000 State=UNKNOWN"
                for n, a in self.nodes.items()]

    def _start(self, timeout_s: float) -> None:
        ensure_installed(NETWORK_BINARIES, sorted(set(NETWORK_BINARIES.values())))
        self._remove_network()  # leftovers of a killed run would make `ip link add` fail
        _run(["ip", "link", "add", self.BRIDGE, "type", "bridge"])
        _run(["ip", "addr", "add", f"{self.SUBNET}.1/24", "dev", self.BRIDGE])
        _run(["ip", "link", "set", self.BRIDGE, "up"])
        for i, (node, addr) in enumerate(self.nodes.items(), start=1):
            ns, host_end = self.netns[node], f"alclipv{i}"
            _run(["ip", "netns", "add", ns])
            _run(["ip", "link", "add", host_end, "type", "veth", "peer", "name", self.IFNAME, "netns", ns])
            _run(["ip", "link", "set", host_end, "master", self.BRIDGE, "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", self.IFNAME])
            _run(["ip", "-n", ns, "link", "set", self.IFNAME, "up"])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        hosts = self.root / "hosts"
        hosts.write_text("127.0.0.1 localhost\n" + f"{self.SUBNET}.1 {self.hostname}\n"
                         + "".join(f"{a} {n}\n" for n, a in self.nodes.items()))
        super()._start(timeout_s)

    def _start_slurmds(self) -> None:
        for node in self.nodes:
            inner = (f"hostname {node} && mount --bind {self.root}/hosts /etc/hosts && "
                     f"exec slurmd -D -f {self.conf} -N {node}")
            self._spawn(f"slurmd-{node}", ["nsenter", f"--net=/run/netns/{self.netns[node]}", "unshare", "--uts",
                                           "--mount", "--propagation", "private", "sh", "-c", inner])

    def _stop_extra(self) -> None:
        self._remove_network()

    def _remove_network(self) -> None:
        for ns in self.netns.values():
            if not Path("/run/netns", ns).exists():
                continue
            pids = _run(["ip", "netns", "pids", ns], check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            _run(["ip", "netns", "del", ns], check=False)  # takes the veth pair with it
        if Path("/sys/class/net", self.BRIDGE).exists():
            _run(["ip", "link", "del", self.BRIDGE], check=False)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--two-node", action="store_true")
    args = parser.parse_args()
    cluster = TwoNodeSlurm() if args.two_node else LocalSlurm()
    with cluster:
        print(f"export SLURM_CONF={cluster.conf}   # Ctrl-C stops the cluster", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
