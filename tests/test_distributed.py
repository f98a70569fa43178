"""Data-parallel training (`train --nproc N`): real rank processes on CPU (gloo), real git
repositories and sqlite stores. The ranks must train what one process trains on the same
global batch, and a rank that dies must stop them all and end the run once."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from nf1prov import git, tracking
from nf1prov.provenance.training import RANK_SPEC_ENV
from nf1prov.train import distributed
from nf1prov.train.distributed import GlobalBatchShards, Ranks
from nf1prov.train.metrics import metric_names
from tests.conftest import run_git, tiny_config
from tests.test_provenance_flow import (
    BIN,
    assert_contract,
    first_checkpoint,
    invoke,
    start_training,
    subprocess_env,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# --- the batches -------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("batches_read", [1, 3, None])
def test_the_shards_of_each_global_batch_are_the_batch_one_process_takes(world_size,
                                                                        batches_read):
    """Same batches, epoch after epoch, however far each epoch is read (early stopping at
    max_batches_per_epoch reads part of an epoch: the generator must be drawn alike)."""
    data = list(range(23))  # 4 batches of 6 and a last one of 5: uneven shards

    def epochs(loader):
        return [[b.tolist() for b in itertools.islice(loader, batches_read)] for _ in range(3)]

    single = epochs(DataLoader(data, batch_size=6, shuffle=True,
                               generator=torch.Generator().manual_seed(7)))
    per_rank = []
    for rank in range(world_size):
        generator = torch.Generator().manual_seed(7)
        shards = GlobalBatchShards(data, 6, Ranks(rank, world_size), generator)
        per_rank.append(epochs(DataLoader(data, batch_sampler=shards, generator=generator)))
    joined = [[sum((per_rank[r][e][b] for r in range(world_size)), [])
               for b in range(len(single[e]))] for e in range(3)]
    assert joined == single
    assert len({len(per_rank[r][0][0]) for r in range(world_size)}) == 1  # 6 splits evenly


def test_a_short_last_batch_leaves_some_ranks_an_empty_shard():
    shards = [list(GlobalBatchShards(list(range(5)), 4, Ranks(rank, 3))) for rank in range(3)]
    assert shards == [[[0, 1], [4]], [[2], []], [[3], []]]


# --- end to end --------------------------------------------------------------------------------


def data_parallel_config(data_root: Path, epochs: int) -> str:
    """47 of the 48 training crops per global batch: the second batch holds one crop, so one
    of two ranks trains on an empty shard and the batch norm and loss must count globally."""
    return (tiny_config(data_root, epochs=epochs, patience=1000)
            .replace("batch_size = 4", "batch_size = 47")
            .replace("max_batches_per_epoch = 2", "max_batches_per_epoch = 0"))


def metric_histories(client, run_id: str) -> dict[str, list[tuple[int, float]]]:
    names = metric_names("train") + metric_names("val")
    return {name: [(m.step, m.value) for m in client.get_metric_history(run_id, name)]
            for name in names}


def test_nproc_2_trains_one_model_with_the_metrics_of_one_process(project, tracking_uri,
                                                                 data_root):
    client = tracking.client(tracking_uri)
    (project / "configs" / "dp.toml").write_text(data_parallel_config(data_root, epochs=2))
    run_git(project, "add", "-A")
    run_git(project, "commit", "-qm", "base")
    invoke("train", "--config", "configs/dp.toml", "--no-commit")  # one process
    (single,) = tracking.search_runs_all(client)
    commits_before = run_git(project, "rev-list", "--count", "HEAD")

    result = invoke("train", "--config", "configs/dp.toml", "--nproc", "2")

    runs = tracking.model_runs(client)
    assert len(runs) == 1
    run = client.get_run(runs[0].info.run_id)
    assert run.info.status == "FINISHED", result.output
    name = assert_contract(client, project, run.info.run_id)
    assert int(run_git(project, "rev-list", "--count", "HEAD")) == int(commits_before) + 1
    assert run_git(project, "tag", "--list", "model/*").split() == [f"model/{name}"]
    tags = run.data.tags
    assert tags[distributed.WORLD_SIZE_TAG] == "2"
    assert tags[distributed.BACKEND_TAG] == "gloo"
    assert tags[distributed.DEVICES_TAG] == "cpu x 2"
    assert run.data.params["train.nproc"] == "2"
    assert "train.nproc=2" in run_git(project, "log", "-1", "--format=%B")
    assert client.get_run(single.info.run_id).data.tags[distributed.WORLD_SIZE_TAG] == "1"

    ours = metric_histories(client, run.info.run_id)
    theirs = metric_histories(client, single.info.run_id)
    for metric, values in ours.items():
        assert [step for step, _ in values] == [1, 2], metric  # one value per epoch
        expected = [value for _, value in theirs[metric]]
        assert [value for _, value in values] == pytest.approx(expected, abs=1e-3), metric
    assert run.data.metrics["best_epoch"] == 2
    assert tracking.run_logged_model(client, run.info.run_id) is not None  # the MLflow model


def rank_processes(ancestor: int, rank: int | None = None) -> list[int]:
    """PIDs of the live rank processes under process ``ancestor`` (their environment names the
    ranks' spec file)."""
    parents, environs = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[-1].split()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if fields[0] != "Z":
            parents[int(entry.name)], environs[int(entry.name)] = int(fields[1]), environ

    def descends(pid: int) -> bool:
        while pid in parents and pid != ancestor:
            pid = parents[pid]
        return pid == ancestor

    return [pid for pid, environ in environs.items()
            if descends(pid) and any(v.startswith(RANK_SPEC_ENV.encode() + b"=") for v in environ)
            and (rank is None or f"RANK={rank}".encode() in environ)]


def test_a_killed_rank_stops_every_rank_and_the_run_fails_once_then_resumes(
        project, tracking_uri, data_root):
    client = tracking.client(tracking_uri)
    (project / "configs" / "long.toml").write_text(data_parallel_config(data_root, epochs=500))
    proc = start_training(project, tracking_uri, "--config", "configs/long.toml", "--nproc", "2")
    try:
        run = first_checkpoint(client)
        ranks = rank_processes(proc.pid)
        (victim,) = rank_processes(proc.pid, rank=1)
        os.kill(victim, signal.SIGKILL)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, (out, err)
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags[tracking.FAILURE] == "rank 1 of 2 was killed by SIGKILL", err[-4000:]
    assert len(ranks) == 2
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in ranks) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(Path(f"/proc/{pid}").exists() for pid in ranks)
    name = assert_contract(client, project, run.info.run_id)

    refused = invoke("train", "--resume", name, "--nproc", "1", expect=2).output
    assert "train.nproc = 2" in refused and "--nproc 2" in refused
    done = max(step for step, _ in metric_histories(client, run.info.run_id)["val_loss"])
    invoke("train", "--resume", name, "--set", f"train.epochs={done + 1}")
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED" and tracking.FAILURE not in run.data.tags
    assert client.get_metric_history(run.info.run_id, "val_loss")[-1].step == done + 1
    assert run.data.tags[distributed.WORLD_SIZE_TAG] == "2"


@pytest.mark.parametrize("stop", ["ctrl-c", "training process killed"])
def test_a_stopped_training_ends_killed_or_failed_never_finished(project, tracking_uri,
                                                                 data_root, stop):
    """Rank 0 is inside its MLflow run when it stops: nothing may end that run FINISHED (as
    MLflow's exit hook would) after the run got its true status."""
    client = tracking.client(tracking_uri)
    (project / "configs" / "long.toml").write_text(data_parallel_config(data_root, epochs=500))
    # its own session and process group, as a terminal's job: Ctrl-C reaches every process
    proc = start_training(project, tracking_uri, "--config", "configs/long.toml", "--nproc", "2",
                          start_new_session=True)
    try:
        run = first_checkpoint(client)
        ranks = rank_processes(proc.pid)
        if stop == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)
        else:  # the process that launched the ranks
            launcher = int(Path(f"/proc/{ranks[0]}/stat").read_text()
                            .rsplit(")", 1)[-1].split()[1])
            os.kill(launcher, signal.SIGKILL)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in ranks) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(Path(f"/proc/{pid}").exists() for pid in ranks)
    run = client.get_run(run.info.run_id)
    if stop == "ctrl-c":
        assert proc.returncode == 130, (out, err)
        assert run.info.status == "KILLED"
        assert run.data.tags[tracking.FAILURE] == "interrupted by Ctrl-C (SIGINT)"
        assert f"nf1prov train --resume {run.info.run_name}" in err
    else:
        assert proc.returncode == 1, (out, err)
        assert run.info.status == "FAILED"
        assert run.data.tags[tracking.FAILURE] == "the training process was killed by SIGKILL"
    assert not (project / ".nf1prov" / "ranks" / run.info.run_id).exists()


def test_refusals_before_anything_exists(project, tracking_uri):
    client = tracking.client(tracking_uri)
    search = invoke("train", "--config", "configs/tiny.toml", "--nproc", "2",
                    "--set", "train.trials=3", expect=2).output
    assert "train.search_workers" in search
    small = invoke("train", "--config", "configs/tiny.toml", "--nproc", "8",
                   "--set", "train.batch_size=4", expect=2).output
    assert "train.batch_size = 4" in small and "at least 8" in small
    assert tracking.search_runs_all(client) == []
    assert run_git(project, "tag", "--list", "model/*") == ""


# --- torchrun: several machines, simulated by two clones of one remote --------------------------


def two_machines(project: Path, tmp_path: Path) -> list[Path]:
    """``project`` and a second clone, sharing a bare remote: two machines' checkouts."""
    remote = tmp_path / "remote.git"
    run_git(tmp_path, "init", "-q", "--bare", "--initial-branch=main", str(remote))
    run_git(project, "add", "-A")
    run_git(project, "commit", "-qm", "base")
    run_git(project, "branch", "-M", "main")
    run_git(project, "remote", "add", "origin", str(remote))
    run_git(project, "push", "-q", "-u", "origin", "main")
    other = tmp_path / "machine-2"
    run_git(tmp_path, "clone", "-q", str(remote), str(other))
    return [project, other]


def torchrun_everywhere(clones: list[Path], tracking_uri: str, *args: str) -> list:
    """The same torchrun command in each clone, as on each machine; their (returncode, output)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    command = [str(BIN / "python"), "-m", "torch.distributed.run", "--nnodes", str(len(clones)),
               "--nproc-per-node", "1", "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", "job",
               "-m", "nf1prov", "train", "--config", "configs/tiny.toml", *args]
    env = subprocess_env(tracking_uri)
    procs = [subprocess.Popen(command, cwd=clone, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for clone in clones]
    try:
        outputs = [proc.communicate(timeout=300)[0] for proc in procs]
        return [(proc.returncode, output) for proc, output in zip(procs, outputs, strict=True)]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()


def test_torchrun_on_two_machines_trains_one_model(project, tracking_uri, tmp_path):
    client = tracking.client(tracking_uri)
    clones = two_machines(project, tmp_path)

    results = torchrun_everywhere(clones, tracking_uri, "--push")

    outputs = "\n".join(output for _, output in results)
    assert [code for code, _ in results] == [0, 0], outputs
    (run,) = tracking.model_runs(client)
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    name = assert_contract(client, project, run.info.run_id)  # both clones hold the tag
    assert git.tag_sha(clones[1], f"model/{name}") == run.data.tags[tracking.GIT_COMMIT]
    assert run.data.tags[distributed.WORLD_SIZE_TAG] == "2"
    assert run.data.params["train.nproc"] == "2"
    assert "waiting for rank 0 to commit the model" in outputs


def test_torchrun_without_push_fails_the_run_naming_the_rank_that_lacks_the_commit(
        project, tracking_uri, tmp_path):
    client = tracking.client(tracking_uri)
    clones = two_machines(project, tmp_path)

    results = torchrun_everywhere(clones, tracking_uri)  # no --push: the commit stays put

    assert all(code != 0 for code, _ in results)
    (run,) = tracking.model_runs(client)
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FAILED"
    failure = run.data.tags[tracking.FAILURE]
    assert failure.startswith("rank 1 could not start training: model ") and "--push" in failure


def test_the_first_cause_survives_a_failure_record_cut_short(tmp_path):
    """A rank stopped while it wrote its record leaves half a file: the launcher still names the
    rank that started it (here the one killed first), never fails on the record."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from nf1prov.provenance.ranks import FAILURE_FILE, first_cause, record_failure

    killed = ProcessFailure(local_rank=1, pid=101, exitcode=-signal.SIGKILL, error_file="")
    stopped = ProcessFailure(local_rank=0, pid=100, exitcode=1, error_file="")
    stopped.timestamp = killed.timestamp + 1
    (tmp_path / FAILURE_FILE.format(rank=0)).write_text('{"reason": "failed: Runt')
    assert first_cause({0: stopped, 1: killed}, tmp_path, 2) == (
        "FAILED", "rank 1 of 2 was killed by SIGKILL")

    record_failure(tmp_path, 0, RuntimeError("Connection reset by peer"))  # gloo-like, whole
    assert [p.name for p in tmp_path.iterdir()] == [FAILURE_FILE.format(rank=0)]
    assert first_cause({0: stopped, 1: killed}, tmp_path, 2)[1] == (
        "rank 1 of 2 was killed by SIGKILL")


def test_a_rank_the_launcher_stopped_before_it_said_so_is_not_the_cause(tmp_path):
    """Rank 1 is killed; rank 0, stopped by the launcher's SIGTERM before writing its record,
    dies of it in the same second (failure times are whole seconds, ranks break the tie): the
    run still fails with rank 1's cause (seen in CI under load: the run ended KILLED)."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from nf1prov.provenance.ranks import first_cause

    killed = ProcessFailure(local_rank=1, pid=101, exitcode=-signal.SIGKILL, error_file="")
    stopped = ProcessFailure(local_rank=0, pid=100, exitcode=-signal.SIGTERM, error_file="")
    stopped.timestamp = killed.timestamp
    assert first_cause({0: stopped, 1: killed}, tmp_path, 2) == (
        "FAILED", "rank 1 of 2 was killed by SIGKILL")
    # stopped alone (the training was stopped from outside): KILLED, naming the signal
    assert first_cause({0: stopped}, tmp_path, 2) == ("KILLED", "rank 0 of 2 was killed by SIGTERM")


def test_a_collective_broken_by_a_vanished_peer_is_a_consequence_not_a_cause():
    from nf1prov.provenance.ranks import describe_failure

    gone = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
                        "[127.0.0.1]:35205: Connection reset by peer. This is typically caused "
                        "by a remote worker hanging")
    assert describe_failure(gone)[2] is True
    assert describe_failure(RuntimeError("CUDA out of memory"))[2] is False
    assert describe_failure(ValueError("Connection reset by peer"))[2] is False  # not gloo's
