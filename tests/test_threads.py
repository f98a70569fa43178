"""The CPUs a torch process may use and the threads it is given (`nf1prov.threads`): cgroup
quotas read from cgroup files the tests write (v2 and v1, a container's view), /proc/stat
readings, and who wins: a setting over OMP_NUM_THREADS over the machine."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from nf1prov import threads

AFFINITY = len(os.sched_getaffinity(0))


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="ascii")


def cgroup_v2(tmp_path: Path, limits: dict[str, str], own: str = "/user.slice/job") -> tuple:
    """A cgroup v2 mount under tmp_path with ``cpu.max`` per folder, and a /proc/self/cgroup
    naming ``own``; returns (mount, self file)."""
    mount = tmp_path / "cgroup"
    mount.mkdir()
    for folder, text in limits.items():
        write(mount / folder / "cpu.max", text)
    (mount / own.strip("/")).mkdir(parents=True, exist_ok=True)
    write(tmp_path / "self_cgroup", f"0::{own}\n")
    return mount, tmp_path / "self_cgroup"


def test_cgroup_v2_quota_is_the_tightest_of_the_process_and_its_ancestors(tmp_path):
    mount, own = cgroup_v2(tmp_path, {"user.slice/job": "max 100000\n",
                                      "user.slice": "150000 100000\n", ".": "max 100000\n"})
    assert threads.quota_cpus(mount, own) == 1.5
    write(mount / "user.slice/job/cpu.max", "50000 100000\n")
    assert threads.quota_cpus(mount, own) == 0.5
    assert threads.usable_cpus(mount, own) == 1  # at least one, never more than the quota


def test_no_quota_leaves_the_affinity(tmp_path):
    mount, own = cgroup_v2(tmp_path, {"user.slice/job": "max 100000\n"})
    assert threads.quota_cpus(mount, own) is None
    assert threads.usable_cpus(mount, own) == AFFINITY
    assert threads.usable_cpus(tmp_path / "no-cgroup-here", tmp_path / "no-file") == AFFINITY


def test_a_container_sees_its_own_cgroup_at_the_root(tmp_path):
    """/proc/self/cgroup names the host's path, which the container's mount lacks: the quota
    at the mount's root counts."""
    mount, own = cgroup_v2(tmp_path, {".": "100000 100000\n"})
    write(own, "0::/kubepods/burstable/pod1234/abcdef\n")
    assert threads.quota_cpus(mount, own) == 1.0
    assert threads.usable_cpus(mount, own) == 1


def test_cgroup_v1_quota(tmp_path):
    mount = tmp_path / "cgroup"
    folder = mount / "cpu,cpuacct" / "docker" / "abc"
    write(folder / "cpu.cfs_quota_us", "250000\n")
    write(folder / "cpu.cfs_period_us", "100000\n")
    write(mount / "cpu,cpuacct" / "cpu.cfs_quota_us", "-1\n")
    write(mount / "cpu,cpuacct" / "cpu.cfs_period_us", "100000\n")
    own = tmp_path / "self_cgroup"
    write(own, "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n")
    assert threads.quota_cpus(mount, own) == 2.5
    assert threads.usable_cpus(mount, own) == min(AFFINITY, 2)
    write(folder / "cpu.cfs_quota_us", "-1\n")
    assert threads.quota_cpus(mount, own) is None


def test_unreadable_quota_files_mean_no_quota(tmp_path):
    mount, own = cgroup_v2(tmp_path, {"user.slice/job": "garbage\n", "user.slice": "\n"})
    assert threads.quota_cpus(mount, own) is None


def stat_text(busy: int, idle: int) -> str:
    """/proc/stat with every CPU at ``busy`` user ticks and ``idle`` idle ticks (and some
    iowait, which is idle too)."""
    lines = [f"cpu  {busy * 64} 0 0 {idle * 64} 0 0 0 0 0 0"]
    lines += [f"cpu{n} {busy} 0 0 {idle} 7 0 0 0 0 0" for n in range(64)]
    return "\n".join(lines + ["intr 1 2 3", "ctxt 99"]) + "\n"


def test_busy_ticks_of_this_process_cpus(tmp_path):
    stat = tmp_path / "stat"
    write(stat, stat_text(busy=100, idle=50))
    assert threads.cpu_jiffies({0, 1}, stat) == 200
    assert threads.cpu_jiffies({3}, stat) == 100
    assert threads.cpu_jiffies({0}, tmp_path / "missing") is None


def test_idle_cpus_from_what_other_processes_did(tmp_path):
    stat = tmp_path / "stat"
    write(stat, stat_text(busy=100, idle=50))
    load = threads.OthersLoad({0, 1}, stat)
    time.sleep(0.2)
    assert load.idle(2) == 2  # nothing else ran on them
    time.sleep(0.2)
    write(stat, stat_text(busy=100 + os.sysconf("SC_CLK_TCK"), idle=50))  # a second each
    assert load.since_last() > 2  # two CPUs' worth in at most ~0.2 s (and this test's own)
    write(stat, stat_text(busy=100 + 50 * os.sysconf("SC_CLK_TCK"), idle=50))
    assert load.idle(2) == 1  # never none
    write(tmp_path / "stat", "")
    assert load.idle(2) == 2  # cannot tell: all of them


def test_threads_for_the_cpus_other_processes_left_idle_during_the_preflight(tmp_path):
    """`nf1prov train` watches the load from its start (`watch_from_now`) and the training
    process gets the CPUs other processes left idle meanwhile, once, for the whole training."""
    assert threads.choose(0, {}, cpus=2, busy=1.6).threads == 1  # two busy loops, or a peer
    assert threads.choose(0, {}, cpus=2, busy=0.3).threads == 2  # a browser
    assert threads.choose(0, {}, cpus=2, busy=5.0).threads == 1  # never none
    assert threads.choose(0, {}, cpus=8, busy=3.2, processes=2).threads == 2  # 5 idle, shared
    assert threads.choose(0, {"OMP_NUM_THREADS": "2"}, cpus=2, busy=1.9).threads == 2  # user's
    assert threads.choose(3, {}, cpus=2, busy=1.9).threads == 3

    stat = tmp_path / "stat"
    cpus = threads.affinity_cpus()
    clock = os.sysconf("SC_CLK_TCK")
    (stat).write_text("".join(f"cpu{c} 100 0 0 50 0 0 0 0\n" for c in sorted(cpus)))
    start = time.monotonic()
    threads.watch_from_now(stat)
    assert threads.watched_load() is None  # too short a window to say
    time.sleep(threads.MIN_WINDOW_S + 0.1)
    # two CPUs' worth of other work over the window so far (a hair more: never less)
    ticks = round(2 * (time.monotonic() - start + 0.02) * clock / len(cpus))
    stat.write_text("".join(f"cpu{c} {100 + ticks} 0 0 50 0 0 0 0\n" for c in sorted(cpus)))
    chosen = threads.choose(0, {})
    assert chosen.threads == max(1, threads.usable_cpus() - 2), chosen
    assert "kept busy by other processes" in chosen.source
    stat.write_text("")  # the answer is kept: every process of the training gets the same
    assert threads.choose(0, {}).threads == chosen.threads
    threads.watch_from_now(tmp_path / "missing")  # unreadable: all usable CPUs
    time.sleep(threads.MIN_WINDOW_S + 0.1)
    assert threads.choose(0, {}).threads == threads.usable_cpus()


# --- who wins -------------------------------------------------------------------------------------


def test_a_setting_wins_over_omp_num_threads_over_the_machine():
    env = {"OMP_NUM_THREADS": "5"}
    chosen = threads.choose(3, env, cpus=8)
    assert (chosen.threads, chosen.source) == (3, "train.threads")
    assert threads.choose(3, env, cpus=8, setting_name="--threads").source == "--threads"
    assert (threads.choose(0, env, cpus=8).threads,
            threads.choose(0, env, cpus=8).source) == (5, "OMP_NUM_THREADS")
    assert threads.choose(0, {"OMP_NUM_THREADS": "4,2"}, cpus=8).threads == 4  # nested levels
    for ignored in ("0", "", "many", "-2"):  # OpenMP ignores them: the machine decides
        assert threads.choose(0, {"OMP_NUM_THREADS": ignored}, cpus=8).threads == 8
    assert threads.choose(0, {}, cpus=8).threads == 8
    assert threads.choose(0, {}, cpus=8, processes=3).threads == 2  # shared out
    assert threads.choose(0, {}, cpus=2, processes=4).threads == 1  # at least one each


def test_the_machine_is_what_the_quota_allows(tmp_path):
    mount, own = cgroup_v2(tmp_path, {".": "100000 100000\n"})
    chosen = threads.choose(0, {}, cpus=threads.usable_cpus(mount, own))
    assert chosen.threads == 1 and chosen.source == "1 usable CPU(s)"


def test_waiting_is_chosen_unless_the_user_set_it():
    chosen = threads.choose(0, {}, cpus=2)
    assert chosen.wait == threads.WAIT_SETTING
    assert chosen.environment() == {"OMP_NUM_THREADS": "2", **threads.WAIT_SETTING}
    for name, value in (("OMP_WAIT_POLICY", "ACTIVE"), ("GOMP_SPINCOUNT", "300000")):
        user = threads.choose(0, {name: value, "OMP_NUM_THREADS": "1"}, cpus=2)
        assert user.wait == {} and user.environment() == {"OMP_NUM_THREADS": "1"}
    assert threads.openmp_settings({"OMP_NUM_THREADS": "1", "GOMP_SPINCOUNT": "10",
                                    "PATH": "/bin"}) == "OMP_NUM_THREADS=1 GOMP_SPINCOUNT=10"
    assert threads.openmp_settings({}) == "none"


def test_the_training_process_gets_its_share():
    """The training process's environment (`training.training_threads`): per process where it
    runs several, the setting first."""
    from nf1prov.config import defaults
    from nf1prov.provenance.training import training_threads

    config, usable = defaults(), threads.usable_cpus()
    assert training_threads(config, {}).threads == usable
    config["train"]["nproc"] = 2
    assert training_threads(config, {}).threads == max(1, usable // 2)
    assert training_threads(config, {"LOCAL_WORLD_SIZE": "64"}).threads == 1  # torchrun's
    assert training_threads(config, {"OMP_NUM_THREADS": "3"}).threads == 3
    config["train"].update(nproc=1, trials=4, search_workers=64)
    assert training_threads(config, {}).threads == 1
    config["train"]["threads"] = 2
    assert training_threads(config, {"OMP_NUM_THREADS": "3"}).threads == 2


def test_a_predicting_process_sets_openmp_before_torch():
    """`use_in_this_process` in a fresh interpreter (what `predict` and `evaluate` do first):
    torch starts with the chosen threads (the setting over OMP_NUM_THREADS), and the user's
    own wait policy stays."""
    import subprocess
    import sys

    code = ("import os; from nf1prov import threads; threads.use_in_this_process(1); "
            "import torch; print(torch.get_num_threads(), threads.openmp_settings(os.environ))")
    env = {k: v for k, v in os.environ.items() if k not in threads.OPENMP_VARIABLES}
    env |= {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "ACTIVE"}
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                          env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "1 OMP_NUM_THREADS=1 OMP_WAIT_POLICY=ACTIVE"


@pytest.mark.parametrize("verb", ["predict", "evaluate", "train"])
def test_verbs_take_threads(verb):
    from click.testing import CliRunner

    from nf1prov.cli import cli

    result = CliRunner().invoke(cli, [verb, "--help"])
    assert result.exit_code == 0 and "--threads N" in result.output
