"""A single-machine Slurm cluster (Debian's ``slurm-wlm`` and ``munge``): slurmctld and
one slurmd on loopback, in a folder of their own, for spokes whose ``[execution] engine``
is ``slurm`` and for their tests. Its ``slurm.conf`` is what the spoke's
``[execution.slurm] slurm_conf`` names. munge is started if it does not answer yet (a
system one is used as it is)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

from tributary.services.settings import ServiceSettings
from tributary.services.system import (
    ServiceError,
    ensure_commands,
    free_port,
    one_starter,
    read_pid,
    start_daemon,
    stop_daemon,
    wait_for,
)

#: The one partition of the local cluster.
PARTITION = "spoke"
MUNGE_KEY = Path("/etc/munge/munge.key")


def folder(settings: ServiceSettings) -> Path:
    return settings.path("slurm", "x").parent


def conf_path(settings: ServiceSettings) -> Path:
    return folder(settings) / "slurm.conf"


def environment(settings: ServiceSettings) -> dict[str, str]:
    """What Slurm's commands need to reach this cluster."""
    return {"SLURM_CONF": str(conf_path(settings))}


def _munge_answers() -> bool:
    if shutil.which("munge") is None:
        return False
    try:
        token = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        if token.returncode != 0:
            return False
        return subprocess.run(["unmunge"], input=token.stdout, capture_output=True,
                              timeout=10).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def ensure_munge(settings: ServiceSettings) -> str:
    """munge authenticates Slurm's daemons and commands to each other."""
    if _munge_answers():
        return "running"
    ensure_commands({"munged": "munge", "munge": "munge"})
    if not MUNGE_KEY.exists():
        raise ServiceError(f"{MUNGE_KEY} is missing; reinstall the munge package")
    run = Path("/run/munge")
    run.mkdir(parents=True, exist_ok=True)
    shutil.chown(run, "munge", "munge")
    log = settings.path("slurm", "munged.log")
    start_daemon(["setpriv", "--reuid=munge", "--regid=munge", "--init-groups",
                  "/usr/sbin/munged", "--foreground"], settings.path("slurm", "munged.pid"),
                 log, cwd=log.parent)
    wait_for(_munge_answers, 30, "munge", log)
    return "started"


def _memory_mb() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 1024


def _write_conf(settings: ServiceSettings) -> Path:
    base = folder(settings)
    for sub in ("state", "spool"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    host = socket.gethostname().split(".")[0]
    lines = [
        "ClusterName=tributary", f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
        "AuthType=auth/munge", "CredType=cred/munge", "SlurmUser=root", "SlurmdUser=root",
        f"StateSaveLocation={base / 'state'}", f"SlurmdSpoolDir={base / 'spool'}",
        f"SlurmctldPidFile={base / 'slurmctld.daemon.pid'}",
        f"SlurmdPidFile={base / 'slurmd.daemon.pid'}",
        f"SlurmctldLogFile={base / 'slurmctld.log'}", f"SlurmdLogFile={base / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core_Memory",
        "ReturnToService=2", "MpiDefault=none", "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none", "SwitchType=switch/none",
        # Finished jobs stay visible long enough for a spoke that was down meanwhile to
        # see how they ended.
        "MinJobAge=600",
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count() or 1} "
        f"RealMemory={max(256, int(_memory_mb() * 0.8))} State=UNKNOWN",
        f"PartitionName={PARTITION} Nodes={host} Default=YES MaxTime=INFINITE State=UP", "",
    ]
    conf = conf_path(settings)
    conf.write_text("\n".join(lines))
    return conf


def _node_ready(settings: ServiceSettings) -> bool:
    try:
        done = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True,
                              text=True, timeout=10, env={**os.environ, **environment(settings)})
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0 and done.stdout.strip() in ("idle", "mix", "alloc")


@one_starter("slurm")
def ensure_running(settings: ServiceSettings | None = None) -> str:
    """Install Slurm and munge if missing and start slurmctld and slurmd unless ours run;
    returns the path of the cluster's ``slurm.conf``."""
    settings = settings or ServiceSettings()
    ctld_pid = settings.path("slurm", "slurmctld.pid")
    slurmd_pid = settings.path("slurm", "slurmd.pid")
    if (read_pid(ctld_pid) is not None and read_pid(slurmd_pid) is not None
            and _node_ready(settings)):
        return str(conf_path(settings))
    stop_daemon(slurmd_pid)
    stop_daemon(ctld_pid)
    ensure_commands({"slurmctld": "slurm-wlm", "slurmd": "slurm-wlm", "sbatch": "slurm-wlm"})
    ensure_munge(settings)
    conf = _write_conf(settings)
    env = {**os.environ, **environment(settings)}
    log = settings.path("slurm", "slurmctld.log")
    start_daemon(["slurmctld", "-D", "-f", str(conf)], ctld_pid,
                 settings.path("slurm", "slurmctld.out"), cwd=log.parent, env=env)
    start_daemon(["slurmd", "-D", "-f", str(conf)], slurmd_pid,
                 settings.path("slurm", "slurmd.out"), cwd=log.parent, env=env)
    try:
        wait_for(lambda: _node_ready(settings), 60, "the Slurm node", log)
    except ServiceError:
        stop(settings)
        raise
    return str(conf)


def stop(settings: ServiceSettings | None = None) -> bool:
    settings = settings or ServiceSettings()
    slurmd = stop_daemon(settings.path("slurm", "slurmd.pid"))
    return stop_daemon(settings.path("slurm", "slurmctld.pid")) or slurmd


def describe(settings: ServiceSettings) -> tuple[bool, str]:
    if read_pid(settings.path("slurm", "slurmctld.pid")) is not None and _node_ready(settings):
        return True, f"partition {PARTITION}, SLURM_CONF={conf_path(settings)}"
    return False, "not running (`tributary services slurm`)"
