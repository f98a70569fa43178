"""How many CPU threads a torch process uses, and how its OpenMP threads wait.

Torch's own choice (one thread per core of the machine, OpenMP threads that spin about 3 ms
before they sleep) is the fastest on an idle machine and collapses beside other work: a thread
that spins while its peer is descheduled burns the CPU the peer needs. This module reads what
this process may use (its CPU affinity and its cgroup's CPU quota) and how busy those CPUs
are, and gives the thread count and OpenMP settings a torch process starts with.

The user's word wins: a setting (``train.threads``, ``--threads``) over ``OMP_NUM_THREADS``
over the machine; ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` in the environment over the wait
setting chosen here. The OpenMP runtime reads its variables once, when torch is first
imported: they go into a child's environment (`child_environment`), or into this process's
before torch is imported (`use_in_this_process`).
"""

from __future__ import annotations

import math
import os
import resource
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
SELF_CGROUP = Path("/proc/self/cgroup")
PROC_STAT = Path("/proc/stat")
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
OPENMP_VARIABLES = ("OMP_NUM_THREADS", *WAIT_VARIABLES)


# --- what this process may use ----------------------------------------------------------------


def affinity_cpus() -> set[int]:
    """The CPUs this process may run on (all of them where the OS does not say)."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return set(range(os.cpu_count() or 1))


def quota_cpus(cgroup_root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> float | None:
    """CPUs' worth of time the cgroup CPU quota allows (quota / period): the tightest of this
    process's cgroup and its ancestors, cgroup v2 (``cpu.max``) or v1
    (``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``); None when there is no quota."""
    limits = [limit for folder in cgroup_folders(cgroup_root, self_cgroup)
              if (limit := folder_quota(folder)) is not None]
    return min(limits, default=None)


def cgroup_folders(cgroup_root: Path, self_cgroup: Path) -> list[Path]:
    """The folders of this process's CPU cgroup, from its own up to the hierarchy's root.

    A container usually sees its own cgroup as the root of the mount while /proc/self/cgroup
    names the host's path: folders that do not exist are skipped, the root always counts."""
    try:
        lines = self_cgroup.read_text(encoding="utf-8").splitlines()
    except OSError:
        lines = []
    folders = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":  # v2: one unified hierarchy at the root
            base = cgroup_root
        elif "cpu" in controllers.split(","):  # v1: the cpu controller's own mount
            base = next((cgroup_root / name for name in (controllers, "cpu", "cpu,cpuacct")
                         if (cgroup_root / name).is_dir()), None)
            if base is None:
                continue
        else:
            continue
        parts = [part for part in path.strip().split("/") if part]
        folders += [base.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]
    if not folders:  # no /proc/self/cgroup: the mount's root, either version
        folders = [cgroup_root, cgroup_root / "cpu", cgroup_root / "cpu,cpuacct"]
    return [folder for folder in dict.fromkeys(folders) if folder.is_dir()]


def folder_quota(folder: Path) -> float | None:
    """The quota one cgroup folder sets, in CPUs, or None (none, or unreadable)."""
    try:
        if (folder / "cpu.max").is_file():  # v2: "max 100000" or "200000 100000"
            quota, _, period = (folder / "cpu.max").read_text(encoding="ascii").partition(" ")
        elif (folder / "cpu.cfs_quota_us").is_file():  # v1: -1 means none
            quota = (folder / "cpu.cfs_quota_us").read_text(encoding="ascii")
            period = (folder / "cpu.cfs_period_us").read_text(encoding="ascii")
        else:
            return None
        quota_us, period_us = int(quota.strip()), int(period.strip())
    except (OSError, ValueError):  # "max", or a file that vanished
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def usable_cpus(cgroup_root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> int:
    """Whole CPUs this process may keep busy: its affinity, capped by the cgroup quota (rounded
    down: threads beyond the quota are throttled together, at least one)."""
    cpus = len(affinity_cpus())
    quota = quota_cpus(cgroup_root, self_cgroup)
    return max(1, min(cpus, math.floor(quota))) if quota is not None else max(1, cpus)


# --- how busy they are --------------------------------------------------------------------------


def cpu_jiffies(cpus: set[int], stat: Path = PROC_STAT) -> int | None:
    """Busy clock ticks so far of ``cpus`` (every field of /proc/stat but idle and iowait), or
    None where /proc/stat cannot be read."""
    try:
        lines = stat.read_text(encoding="ascii").splitlines()
    except OSError:
        return None
    busy = 0
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            ticks = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
            busy += sum(ticks) - ticks[3] - ticks[4]
    return busy


def own_cpu_seconds() -> float:
    """CPU seconds this process (all its threads) and the children it waited for (git) have
    used."""
    return sum(usage.ru_utime + usage.ru_stime for usage in (
        resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)))


class OthersLoad:
    """CPUs' worth of work other processes did on this process's CPUs between two readings:
    the busy time of those CPUs less this process's own."""

    def __init__(self, cpus: set[int] | None = None, stat: Path = PROC_STAT):
        self.cpus = affinity_cpus() if cpus is None else cpus
        self.stat = stat
        self.last = self.reading()

    def reading(self) -> tuple[float, int | None, float]:
        return time.monotonic(), cpu_jiffies(self.cpus, self.stat), own_cpu_seconds()

    def since_last(self) -> float | None:
        """Busy CPUs of other processes since the last call (or creation); None when unknown."""
        (wall0, busy0, own0), (wall1, busy1, own1) = self.last, self.reading()
        self.last = (wall1, busy1, own1)
        if busy0 is None or busy1 is None or wall1 <= wall0:
            return None
        ticks = os.sysconf("SC_CLK_TCK")
        return max(0.0, ((busy1 - busy0) / ticks - (own1 - own0)) / (wall1 - wall0))

    def idle(self, usable: int) -> int:
        """Whole CPUs of ``usable`` that other processes left idle since the last call (at
        least one; all of them where the load cannot be read)."""
        busy = self.since_last()
        return usable if busy is None else max(1, min(usable, round(usable - busy)))


# Other processes' load, measured from `watch_from_now` until `choose` asks (then kept: every
# process started after that gets the same answer).
_watched: OthersLoad | None = None
_watched_load: float | None = None
MIN_WINDOW_S = 0.5  # a shorter window says too little about the load to act on


def watch_from_now(stat: Path = PROC_STAT) -> None:
    """Start measuring the work other processes do on this process's CPUs: `choose` then gives
    threads only to the CPUs they left idle meanwhile. `nf1prov train` calls it as it starts, so
    its preflight (seconds of git, data checks and imports) is the window: a training started
    beside two busy processes, or beside another training starting, takes one thread, where
    two threads would wait on each other's descheduled turns."""
    global _watched, _watched_load
    _watched, _watched_load = OthersLoad(stat=stat), None


def watched_load() -> float | None:
    """CPUs' worth of other processes' work from `watch_from_now` to the first call (None: not
    watched, or the window too short or unreadable)."""
    global _watched, _watched_load
    if _watched is not None and time.monotonic() - _watched.last[0] >= MIN_WINDOW_S:
        _watched, _watched_load = None, _watched.since_last()
    return _watched_load


def idle_cpus(usable: int, interval_s: float = 0.25, stat: Path = PROC_STAT) -> int:
    """Whole CPUs of ``usable`` that other processes leave idle over the next ``interval_s``."""
    load = OthersLoad(stat=stat)
    time.sleep(interval_s)
    return load.idle(usable)


# --- the choice ---------------------------------------------------------------------------------

# How OpenMP threads wait when the user has not said (see docs/training.md, CPU threads on a
# shared machine, for the figures that chose it).
WAIT_SETTING = {"GOMP_SPINCOUNT": "10000"}


@dataclass(frozen=True)
class Choice:
    """The torch threads of one process, where that number came from, and the OpenMP wait
    variables to set (none where the user set their own)."""

    threads: int
    source: str
    wait: dict[str, str]

    def environment(self) -> dict[str, str]:
        """The variables a torch process must start with."""
        return {"OMP_NUM_THREADS": str(self.threads), **self.wait}


def openmp_settings(env: Mapping[str, str]) -> str:
    """The OpenMP variables of ``env`` as "NAME=value" words ("none" without any)."""
    return " ".join(f"{name}={env[name]}" for name in OPENMP_VARIABLES if name in env) or "none"


def omp_threads(value: str | None) -> int | None:
    """OMP_NUM_THREADS as OpenMP reads it (a list's first level: "4,2" is 4); None when unset
    or not a positive number (OpenMP ignores it then)."""
    first = (value or "").split(",")[0].strip()
    return int(first) if first.isdigit() and int(first) > 0 else None


def choose(setting: int = 0, env: Mapping[str, str] | None = None, *, processes: int = 1,
           setting_name: str = "train.threads", cpus: int | None = None,
           busy: float | None = None) -> Choice:
    """The threads of each of ``processes`` torch processes sharing this machine: ``setting``
    when > 0, else ``OMP_NUM_THREADS`` from ``env`` (default: this process's environment), else
    the usable CPUs (``cpus``, default `usable_cpus`) that other processes leave idle (``busy``
    CPUs' worth of their work, default `watched_load`, rounded) shared out, at least one each.
    The wait variables are `WAIT_SETTING` unless ``env`` sets one of `WAIT_VARIABLES` itself.

    The count is fixed for the process (CPU results depend on it: a run records it and
    `reproduce` reuses it), never changed while it trains."""
    env = os.environ if env is None else env
    wait = {} if any(env.get(name) for name in WAIT_VARIABLES) else dict(WAIT_SETTING)
    from_env = omp_threads(env.get("OMP_NUM_THREADS"))
    if setting > 0:
        return Choice(setting, setting_name, wait)
    if from_env is not None:
        return Choice(from_env, "OMP_NUM_THREADS", wait)
    usable = usable_cpus() if cpus is None else cpus
    busy = watched_load() if busy is None and cpus is None else busy
    free = usable if busy is None else max(1, min(usable, round(usable - busy)))
    share = max(1, free // max(1, processes))
    source = f"{usable} usable CPU(s)"
    if busy is not None:
        source += f", {busy:.1f} kept busy by other processes"
    return Choice(share, source + (f" / {processes} processes" if processes > 1 else ""), wait)


def use_in_this_process(setting: int = 0, setting_name: str = "--threads") -> Choice:
    """Choose for this process before it imports torch: the variables go into its environment,
    where the OpenMP runtime reads them as torch starts. Where torch is already imported (a
    library caller, the tests) only an explicit ``setting`` applies, through
    torch.set_num_threads."""
    choice = choose(setting, setting_name=setting_name)
    if "torch" not in sys.modules:
        os.environ.update(choice.environment())
    elif setting > 0:
        import torch

        torch.set_num_threads(choice.threads)
    return choice
