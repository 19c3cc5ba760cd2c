"""A real single-host SLURM cluster for the tests: slurmctld and two slurmd daemons (virtual nodes sp1, sp2) with
their state under a temporary directory, started by hand (no systemd, no cgroups, no accounting).

`LocalSlurm.start(tmp)` installs Debian's packages if they are missing and the machine allows it (root, apt), or
raises `Unavailable` with the reason (the tests then skip, saying so); a daemon that fails to start on a machine
that allows it is an error, not a skip. `stop()` ends only the daemons it started. Jobs are submitted with
`--parsable` and followed with `scontrol show job` (`sbatch --wait` notices the end of a job late).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
NODES = ("sp1", "sp2")
FIRST_PORT = 17100  # slurmctld, then one port per node; moved up while any of them is taken


class Unavailable(RuntimeError):
    """This machine cannot run the test cluster (the message says why)."""


def _ensure_packages() -> None:
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise Unavailable("SLURM is not installed and installing it needs root and apt-get")
    proc = subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES],
                          env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0:
        raise Unavailable(f"apt-get install {' '.join(PACKAGES)} failed: {proc.stderr.strip().splitlines()[-1:]}")


def _free_ports(count: int) -> int:
    """The first of `count` consecutive free TCP ports from FIRST_PORT on (another test cluster, or a daemon left
    by an interrupted run, may hold the usual ones)."""
    for base in range(FIRST_PORT, FIRST_PORT + 900, count):
        try:
            with contextlib.ExitStack() as stack:
                for port in range(base, base + count):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise Unavailable(f"no {count} consecutive free ports from {FIRST_PORT}")


def _conf(d: Path, cpus: int, port: int) -> str:
    nodes = "\n".join(f"NodeName={n} NodeAddr=127.0.0.1 NodeHostname={n} Port={port + 1 + i} CPUs={cpus} "
                      "State=UNKNOWN" for i, n in enumerate(NODES))
    return f"""ClusterName=seqpartest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire + 1 s (120 s by default) so that no node still holds its revoked credential.
AuthInfo=cred_expire=5
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool-%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
MailProg=/bin/true
SchedulerParameters=batch_sched_delay=0
MinJobAge=300
KillWait=30
ReturnToService=2
{nodes}
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
"""


class LocalSlurm:
    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._procs: list[int] = []

    @classmethod
    def start(cls, root: Path) -> LocalSlurm:
        if os.geteuid() != 0:
            raise Unavailable("the test cluster's daemons run as root")
        _ensure_packages()
        self = cls(root)
        (root / "state").mkdir(parents=True, exist_ok=True)
        self.conf.write_text(_conf(root, os.cpu_count() or 2, _free_ports(1 + len(NODES))))
        try:
            self._start_munge()
            self._daemon(["slurmctld", "-f", str(self.conf), "-i"], "slurmctld.pid")
            for n in NODES:
                self._daemon(["slurmd", "-f", str(self.conf), "-N", n], f"slurmd-{n}.pid")
            self.wait_idle(60)
        except BaseException:
            self.stop()  # no daemon of a failed start outlives it
            raise
        return self

    def _start_munge(self) -> None:
        if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
            return  # a munged is already running
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            key.parent.mkdir(parents=True, exist_ok=True)
            key.write_bytes(os.urandom(1024))
            os.chmod(key, 0o400)
        for d in ("/run/munge", "/var/lib/munge", "/var/log/munge"):
            Path(d).mkdir(parents=True, exist_ok=True)
        subprocess.run(["munged", "--force", "--pid-file", str(self.root / "munged.pid")], check=True,
                       capture_output=True, timeout=30)
        self._procs.append(int((self.root / "munged.pid").read_text()))

    def _daemon(self, cmd: list[str], pidfile: str) -> None:
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"{cmd[0]} did not start: {proc.stderr.strip()[-300:]}")
        pid_path = self.root / pidfile
        for _ in range(100):
            if pid_path.exists() and pid_path.read_text().strip():
                self._procs.append(int(pid_path.read_text()))
                return
            time.sleep(0.1)
        raise RuntimeError(f"{cmd[0]} wrote no pid file; see its log in {self.root}")

    def run(self, *cmd: str, check: bool = True) -> str:
        proc = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip()}")
        return proc.stdout

    def wait_idle(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
            states = dict(line.split() for line in out.splitlines() if line.strip())
            if set(states) == set(NODES) and all(s == "idle" for s in states.values()):
                return
            time.sleep(0.3)
        raise RuntimeError(f"the test nodes did not come up: {self.run('sinfo', check=False)}")

    def sbatch(self, *args: str, cwd: Path, env: dict | None = None) -> str:
        proc = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env={**self.env, **(env or {})},
                              capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch failed: {proc.stderr.strip()}")
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: str, timeout: float, until=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                                         "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE")) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            info = self.job(job_id)
            if info.get("JobState") in until:
                return info
            time.sleep(0.5)
        self.run("scancel", job_id, check=False)
        raise TimeoutError(f"job {job_id} did not finish in {timeout:.0f} s: {self.job(job_id)}")

    def stop(self) -> None:
        # End every job first (a submitit sweep returns when the results are written, while its jobs still wind
        # down); job scripts and sruns left without their daemons would wait forever.
        self.run("scancel", "--full", "--user=root", check=False)
        end = time.monotonic() + 30
        while self.run("squeue", "-h", check=False).strip() and time.monotonic() < end:
            time.sleep(0.3)
        # Job step daemons of our slurmd outlive it; they belong to this cluster's jobs only.
        subprocess.run(["pkill", "-f", "^slurmstepd"], capture_output=True)
        for pid in reversed(self._procs):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        end = time.monotonic() + 10
        for pid in self._procs:
            while time.monotonic() < end:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
