"""A real single-node SLURM cluster on localhost, for tests (and for trying job scripts by hand).

Everything lives in one temporary directory (config, munge key and socket, state, spool, logs,
PID files), the daemons listen on free non-default ports and run in the foreground as children
of this process, and ``stop()`` ends exactly those PIDs. Nothing under /etc or /run is touched,
so it can run beside a real SLURM installation. The recipe was measured on this kind of machine:
Debian's slurm-wlm 22.05 + munge 0.5, as root, without systemd or cgroups.

By hand::

    python tests/slurm_cluster.py [DIR]   # starts it, prints `export SLURM_CONF=...`,
                                          # Ctrl-C stops it (DIR: kept; default: a temp dir)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "scontrol", "sinfo", "scancel")


def unavailable_reason() -> str | None:
    """Why a local cluster cannot start here (``None`` when it can): the test's skip message."""
    if not sys.platform.startswith("linux"):
        return f"a local SLURM cluster needs Linux (this is {sys.platform})"
    missing = [
        name for name in DAEMONS + CLIENTS if shutil.which(name) is None and not Path("/usr/sbin", name).exists()
    ]
    if missing:
        how = "run `make slurm-deps` as root" if os.geteuid() == 0 else "install slurm-wlm and munge as root"
        return f"SLURM/munge programs not found ({', '.join(missing)}): {how}"
    if os.geteuid() != 0:
        return "the local SLURM cluster runs slurmd as root (SlurmUser=root); tests are not root"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class LocalSlurmCluster:
    """munged + slurmctld + slurmd for ``NodeName=localhost``, all state under ``root``.

    ``env`` is the environment clients need (``SLURM_CONF``); pass it to ``subprocess`` calls.
    """

    def __init__(self, root: str | os.PathLike | None = None, cpus: int | None = None, memory_mb: int = 8000) -> None:
        # munged needs every folder above its socket traversable by all (pytest's tmp_path is
        # 0700), hence a fresh /tmp directory by default, removed again by stop().
        self._owns_root = root is None
        self.root = Path(root or tempfile.mkdtemp(prefix="merino-slurm.")).resolve()
        self.cpus = cpus or max(2, os.cpu_count() or 2)
        self.memory_mb = memory_mb
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge-run" / "munge.socket"
        self.logs = self.root / "log"
        self._procs: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    # -- set-up ---------------------------------------------------------------------------
    def _make_dirs(self) -> None:
        # munged checks permissions: the socket's folder 755, the key's 700, parents not
        # writable by others (the temp root is made 755 for that reason).
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        for name, mode in (
            ("munge-run", 0o755),
            ("munge-key", 0o700),
            ("log", 0o755),
            ("state", 0o755),
            ("spool", 0o755),
            ("run", 0o755),
        ):
            (self.root / name).mkdir(exist_ok=True)
            (self.root / name).chmod(mode)

    def _write_conf(self) -> None:
        r = self.root
        lines = {
            "ClusterName": "merinotest",
            "SlurmctldHost": "localhost",
            "SlurmctldPort": _free_port(),
            "SlurmdPort": _free_port(),
            "SlurmUser": "root",
            "SlurmdUser": "root",
            "AuthType": "auth/munge",
            "CredType": "cred/munge",
            # cred_expire also sets how long a requeued job waits before it may start again
            # (default 120 s); 10 s keeps the requeue test short.
            "AuthInfo": f"socket={self.munge_socket},cred_expire=10",
            "StateSaveLocation": r / "state",
            "SlurmdSpoolDir": r / "spool",
            "SlurmctldPidFile": r / "run" / "slurmctld.pid",
            "SlurmdPidFile": r / "run" / "slurmd.pid",
            "SlurmctldLogFile": self.logs / "slurmctld.log",
            "SlurmdLogFile": self.logs / "slurmd.log",
            "ProctrackType": "proctrack/linuxproc",  # no cgroups in this VM
            "TaskPlugin": "task/none",
            "JobAcctGatherType": "jobacct_gather/none",
            "AccountingStorageType": "accounting_storage/none",
            "JobCompType": "jobcomp/none",
            "MpiDefault": "none",
            "SwitchType": "switch/none",
            "SelectType": "select/cons_tres",
            "SelectTypeParameters": "CR_Core",
            "ReturnToService": 2,
            "JobRequeue": 1,  # Lightning's auto-requeue calls `scontrol requeue`
            "KillWait": 5,  # SIGTERM -> SIGKILL grace; Lightning ignores SIGTERM under SLURM
            "SchedulerParameters": "sched_interval=2",  # requeued jobs start within seconds
            "MinJobAge": 600,  # keep finished jobs visible to `scontrol show job`
            "MailProg": "/bin/true",
        }
        text = "".join(f"{k}={v}\n" for k, v in lines.items())
        text += (
            f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} "
            f"RealMemory={self.memory_mb} State=UNKNOWN\n"
            "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP\n"
        )
        self.conf.write_text(text)

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.logs / f"{name}.stdout", "ab")
        self._procs[name] = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        log.close()

    def start(self, timeout: float = 60.0) -> LocalSlurmCluster:
        """Start munged, slurmctld and slurmd; return once the node is idle (or raise)."""
        self._make_dirs()
        self._write_conf()
        key = self.root / "munge-key" / "munge.key"
        if not key.exists():
            subprocess.run([_binary("mungekey"), "-c", "-k", str(key)], check=True, capture_output=True)
        try:
            self._spawn(
                "munged",
                [
                    _binary("munged"),
                    "-F",
                    f"--socket={self.munge_socket}",
                    f"--key-file={key}",
                    f"--log-file={self.logs / 'munged.log'}",
                    f"--pid-file={self.root / 'run' / 'munged.pid'}",
                    f"--seed-file={self.root / 'munge-key' / 'munged.seed'}",
                ],
            )
            self._wait(lambda: self.munge_socket.exists(), timeout, "munged socket")
            self._spawn("slurmctld", [_binary("slurmctld"), "-D", "-i", "-f", str(self.conf)])
            self._spawn("slurmd", [_binary("slurmd"), "-D", "-N", "localhost", "-f", str(self.conf)])
            self._wait(self._node_idle, timeout, "node localhost idle")
        except BaseException:
            self.stop()
            raise
        return self

    def _node_idle(self) -> bool:
        out = subprocess.run([_binary("sinfo"), "-h", "-N", "-o", "%T"], env=self.env, capture_output=True, text=True)
        return out.returncode == 0 and out.stdout.strip().rstrip("*") == "idle"

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [n for n, p in self._procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited while waiting for {what}:\n{self.log_tail()}")
            if ready():
                return
            time.sleep(0.3)
        raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of every daemon log, for failure messages."""
        out = []
        for path in sorted(self.logs.glob("*")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(out)

    # -- tear-down ------------------------------------------------------------------------
    def stop(self) -> None:
        """Cancel this cluster's jobs, then SIGTERM each daemon we started (by PID, slurmd
        first) and SIGKILL what is left after 10 s."""
        self._cancel_jobs()
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self._procs.get(name)
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self._procs.pop(name, None)
            if proc is None:
                continue
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def _cancel_jobs(self, timeout: float = 20.0) -> None:
        # slurmstepd and the job's tasks outlive slurmd by design: end them through SLURM first
        # (a test that failed mid-job would otherwise leave training processes behind).
        ctld = self._procs.get("slurmctld")
        if ctld is None or ctld.poll() is not None:
            return
        squeue = [_binary("squeue"), "-h", "-o", "%i", "-t", "PENDING,RUNNING,SUSPENDED,COMPLETING,REQUEUED"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            jobs = subprocess.run(squeue, env=self.env, capture_output=True, text=True).stdout.split()
            if not jobs:
                return
            subprocess.run([_binary("scancel"), *jobs], env=self.env, capture_output=True)
            time.sleep(0.5)

    def __enter__(self) -> LocalSlurmCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _main() -> None:
    if reason := unavailable_reason():
        sys.exit(reason)

    def _stop(signum, frame):  # `kill PID` (a background job ignores Ctrl-C) also stops the daemons
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    with LocalSlurmCluster(sys.argv[1] if len(sys.argv) > 1 else None) as cluster:
        print(f"export SLURM_CONF={cluster.conf}   # Ctrl-C or `kill {os.getpid()}` stops the cluster", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    _main()
