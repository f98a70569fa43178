"""`nf1prov train` started by torchrun, on one machine or several: rank 0 leads, the rest follow.

    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \\
        --rdzv-id JOB -m nf1prov train --config configs/x.toml --push

torchrun starts ``nf1prov train`` once per rank, on every machine. Global rank 0 does what a lone
``nf1prov train`` does (preflight, the run, the commit, the tag, ``--push``), with
``train.nproc`` set to the world size so that the run and the commit record it, then starts
its training process as rank 0 of torchrun's process group. It hands the others the plan (run,
commit, resolved config) through torchrun's own key-value store, or why it refused. Each other
rank waits for the plan, fetches the model's tag from its clone's remotes when the commit is
missing, checks its own copy of the data, and trains its shards from a snapshot of that commit;
it never touches MLflow. torchrun stops every rank when one fails; rank 0 ends the run.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from datetime import timedelta

from nf1prov.errors import UserError

PLAN_KEY = "nf1prov/train-plan"
STATUS_KEY = "nf1prov/rank-status"
POLL_S = 0.5
WAIT_ENV = "NF1PROV_RANK0_WAIT_S"  # how long the other ranks wait for rank 0's commit
DEFAULT_WAIT_S = 3600


class RankCouldNotStart(UserError):
    """Another rank said why it cannot train (its message names it)."""


@dataclass(frozen=True)
class World:
    rank: int
    size: int


def world() -> World | None:
    """This `nf1prov train`'s place among torchrun's processes; None when torchrun did not
    start it (or started it alone)."""
    from nf1prov.provenance.training import RANK_SPEC_ENV

    if RANK_SPEC_ENV in os.environ or "MASTER_ADDR" not in os.environ:
        return None
    size = int(os.environ.get("WORLD_SIZE", 1))
    return World(int(os.environ.get("RANK", 0)), size) if size > 1 else None


def _store():
    from torch.distributed import TCPStore

    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        raise UserError("nf1prov train found WORLD_SIZE and MASTER_ADDR but no torchrun agent "
                        "store: start it with `torchrun ... -m nf1prov train` (or "
                        "`python -m torch.distributed.run`), or use `nf1prov train --nproc N` "
                        "on one machine.")
    wait = float(os.environ.get(WAIT_ENV, DEFAULT_WAIT_S))
    return TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                    timeout=timedelta(seconds=wait))


def publish(plan: dict) -> None:
    """Rank 0: hand the other ranks the plan, or ``{"error": why}``."""
    _store().set(PLAN_KEY, json.dumps(plan))


def report(rank: int, error: str | None) -> None:
    """A rank other than 0: ready to train (``error`` None), or why it cannot."""
    _store().set(f"{STATUS_KEY}/{rank}", json.dumps({"error": error}))


def _wait_for(store, key: str, what: str) -> dict:
    """The JSON under ``key``, polled (a blocking get would hold Ctrl-C back until it ends)."""
    wait = float(os.environ.get(WAIT_ENV, DEFAULT_WAIT_S))
    deadline = time.monotonic() + wait
    while not store.check([key]):
        if time.monotonic() > deadline:
            raise UserError(f"no word from {what} within ${WAIT_ENV} ({wait:g} s): see its "
                            "output (on its machine).")
        time.sleep(POLL_S)
    return json.loads(store.get(key))


def receive() -> dict:
    return _wait_for(_store(), PLAN_KEY, "rank 0's `nf1prov train`")


def await_ranks(size: int) -> None:
    """Rank 0's training process, before it joins the process group: every other rank got the
    commit and its data checks out, or the first one that did not says why (else rank 0
    would wait in the process group for a rank that never comes)."""
    store = _store()
    for rank in range(1, size):
        status = _wait_for(store, f"{STATUS_KEY}/{rank}", f"rank {rank}")
        if status["error"]:
            raise RankCouldNotStart(f"rank {rank} could not start training: {status['error']}")


def follow(rank: int, data_root: str | None) -> int:
    """A rank other than 0: wait for rank 0's model commit, then train this rank's shards from
    a snapshot of it. Returns the exit code of its training process."""
    from nf1prov import git
    from nf1prov.provenance import code_snapshot, preflight, run_end, training

    root = git.repo_root(".")
    print(f"nf1prov: rank {rank}: waiting for rank 0 to commit the model...", file=sys.stderr)
    plan = receive()
    if "error" in plan:
        raise UserError(f"rank 0 did not start the training: {plan['error']}")
    sha, codename = plan["sha"], plan["codename"]
    config = plan["config"]
    try:
        if not git.commit_exists(root, sha):
            git.fetch_model_tag(root, codename)
        if not git.commit_exists(root, sha):
            raise UserError(f"model {codename}'s commit {sha[:12]} is not in {root}, and no "
                            f"remote of it holds the tag model/{codename}: start `nf1prov "
                            "train` with --push, from clones that share that remote.")
        data_path = preflight.resolve_data_root(root, config, data_root)
        preflight.check_data(config, data_path)
    except Exception as exc:
        report(rank, str(exc))
        raise
    report(rank, None)
    print(f"nf1prov: rank {rank}: training model {codename} (run {plan['run_id']}) from commit "
          f"{sha[:12]}, data {data_path}", file=sys.stderr)
    with code_snapshot.snapshot(root, sha) as code_root:
        spec = training.Spec(run_id=plan["run_id"], tracking_uri="", config=config,
                           data_root=str(data_path), cache_dir=str(root / preflight.CACHE_DIR),
                           code_root=str(code_root), argv=sys.argv[1:], parent_pid=os.getpid())
        returncode = training.launch(spec, None)
    if returncode == 0:
        print(f"nf1prov: rank {rank}: done; rank 0 logs model {codename}.", file=sys.stderr)
    if returncode < 0:  # killed by a signal: report it the way a shell would
        return 128 - returncode
    if returncode in run_end.INTERRUPT_EXITS or returncode == 0:
        return returncode
    return 1


def blame_follower(client, run_id: str | None, size: int) -> None:
    """Rank 0 was stopped (torchrun stops every rank when one exits): when another rank said it
    could not start, that is the cause the run should name, not the SIGTERM rank 0 got."""
    import contextlib

    from nf1prov.provenance import run_end

    if run_id is None:
        return
    with contextlib.suppress(Exception):  # the agent's store may be gone already
        store = _store()
        for rank in range(1, size):
            key = f"{STATUS_KEY}/{rank}"
            error = json.loads(store.get(key))["error"] if store.check([key]) else None
            if error:
                run_end.end_run_or_warn(client, run_id, "FAILED",
                                        f"rank {rank} could not start training: {error}")
                return


def describe(progress, config: dict) -> dict:
    """The plan rank 0 hands the others once the model commit exists."""
    return {"run_id": progress.run_id, "codename": progress.codename, "sha": progress.sha,
            "config": config}

