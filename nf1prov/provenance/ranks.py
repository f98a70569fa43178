"""Data-parallel training processes: one training process starts N ranks and speaks for them.

With ``train.nproc`` = N > 1 the training process (`worker`) does not train itself: it starts N
rank processes through torch.distributed's elastic launcher (what `torchrun` runs; gloo on CPU,
NCCL on CUDA) and waits. Each rank runs `rank_main`: rank 0 trains inside the run exactly as a
single training process does (records the environment, logs every metric and artifact, ends the
run FINISHED); the other ranks train their shard and never touch git or MLflow.

When any rank fails or is killed, the launcher stops the others (SIGTERM) and this process ends
the run once, FAILED or KILLED, with the first cause as `nf1prov.failure` ("rank 1 of 2 was
killed by SIGKILL"), not the errors the other ranks saw as their peers vanished. Each rank writes
why it stopped to ``<rank dir>/rank-<r>.json``; a rank killed outright writes nothing and the
launcher's exit record says which signal. Ctrl-C or SIGTERM to this process reaches every rank.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import sys
import time
import traceback
import uuid
from dataclasses import asdict
from pathlib import Path

OUTCOME_FILE = "outcome.json"  # rank 0: {"finished": bool}
FAILURE_FILE = "rank-{rank}.json"  # {"reason", "time", "secondary"}
SECONDARY_ERRORS = ("DistError", "DistBackendError", "DistNetworkError", "DistStoreError")
# gloo also reports a peer that vanished as a plain RuntimeError from its TCP transport
PEER_GONE = re.compile(r"gloo.*(Connection reset by peer|Connection closed by peer|Broken pipe)",
                       re.DOTALL)


def run_rank(spec=None) -> None:
    """`rank_main`, then the end of the process without the interpreter's exit hooks, whatever
    happens: MLflow's would end rank 0's active run FINISHED, and a rank that stopped early must
    leave the run's end to whoever knows the first cause (the launcher, or `nf1prov train`)."""
    code = 1
    try:
        code = rank_main(spec)
    except BaseException:  # noqa: BLE001 - e.g. an interrupt while recording the failure
        traceback.print_exc(file=sys.stderr)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def launch(spec, client) -> int:
    """In the training process: run ``spec``'s ranks and wait. Returns 0 (trained), the
    worker's LOGGING_PENDING_EXIT, 1 (a rank failed) or 128 + signal (interrupted); the run
    has ended (or waits in the outbox) either way."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from nf1prov.provenance import run_end, signals, training

    nproc = spec.config["train"]["nproc"]
    folder = training.rank_folder(spec)
    shutil.rmtree(folder, ignore_errors=True)  # a resumed run's records from before
    folder.mkdir(parents=True, mode=0o700)  # the spec names the store
    # The ranks say why they stopped (and the run says it once): torchrun's per-rank warnings
    # and error tables would only repeat it.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)
    try:
        spec_file = folder / "spec.json"
        spec_file.write_text(json.dumps(asdict(spec)), encoding="utf-8")
        os.environ[training.RANK_SPEC_ENV] = str(spec_file)
        # each rank's share of the CPUs (`nf1prov train` has put it here already)
        os.environ.update(training.training_threads(spec.config, os.environ).environment())
        config = LaunchConfig(
            min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
            rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
            monitor_interval=0.1, logs_specs=DefaultLogsSpecs(log_dir=str(folder / "logs"),
                                                              tee=Std.NONE))
        try:
            elastic_launch(config, sys.executable)("-m", "nf1prov.provenance.worker")
        except ChildFailedError as exc:
            status, reason = first_cause(exc.failures, folder, nproc)
            run_end.end_run_or_warn(client, spec.run_id, status, reason)
            return 1
        except (SignalException, KeyboardInterrupt, signals.Interrupted) as exc:
            signum = getattr(exc, "sigval", None)
            if isinstance(exc, KeyboardInterrupt) or signum == signal.SIGINT:
                code, reason = 130, "interrupted by Ctrl-C (SIGINT)"
            else:
                code, reason = 128 + signal.SIGTERM, signals.sigterm_reason()
            if client.get_run(spec.run_id).info.status == "RUNNING":
                run_end.end_run_or_warn(client, spec.run_id, "KILLED", reason)
            return code
        outcome = folder / OUTCOME_FILE
        if outcome.is_file() and not json.loads(outcome.read_text())["finished"]:
            return training.LOGGING_PENDING_EXIT
        return 0
    finally:
        os.environ.pop(training.RANK_SPEC_ENV, None)
        shutil.rmtree(folder, ignore_errors=True)


def first_cause(failures: dict, folder: Path, nproc: int) -> tuple[str, str]:
    """(status, reason) of the rank failure that started it: the earliest failure that is not
    a consequence of another (a rank stopped by the launcher, or a collective broken by a peer
    that vanished); among those only, the earliest."""
    causes = []
    for rank, failure in failures.items():
        written = read_failure(folder / FAILURE_FILE.format(rank=rank))
        if written is not None:
            causes.append((written["secondary"], written["time"], rank, written["reason"],
                           written["status"]))
            continue
        # SIGTERM is how the launcher stops the others once one failed: a rank that died of
        # it (or of Ctrl-C) before it could say so is a consequence, as when it says so.
        # Failure times are whole seconds, so this, not the time, keeps it from being named.
        stopped = failure.signal_name() in ("SIGINT", "SIGTERM")
        if failure.signal_name() != "<N/A>":
            reason = f"was killed by {failure.signal_name()}"
        else:
            reason = f"exited with code {failure.exitcode}"
        causes.append((stopped, float(failure.timestamp), rank, reason,
                       "KILLED" if stopped else "FAILED"))
    _, _, rank, reason, status = min(causes)
    return status, f"rank {rank} of {nproc} {reason}"


def read_failure(path: Path) -> dict | None:
    """A rank's failure record, or None when there is none or it cannot be read (a rank killed
    while it wrote it): the launcher then goes by how the process ended."""
    try:
        written = json.loads(path.read_text(encoding="utf-8"))
        return {"secondary": bool(written["secondary"]), "time": float(written["time"]),
                "reason": str(written["reason"]), "status": written.get("status", "FAILED")}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def describe_failure(exc: BaseException) -> tuple[str, str, bool]:
    """(reason, status, secondary) of the exception that stopped a rank. Secondary: it was
    stopped (SIGTERM from the launcher) or a collective broke as a peer vanished."""
    from nf1prov.provenance import signals

    if isinstance(exc, KeyboardInterrupt):
        return "was interrupted by Ctrl-C (SIGINT)", "KILLED", True
    if isinstance(exc, signals.Interrupted):
        return f"was stopped: {exc.reason}", "KILLED", True
    from nf1prov.errors import Nf1provError

    if isinstance(exc, Nf1provError):  # its message says what and where
        return f"failed: {exc}", "FAILED", False
    secondary = (any(cls.__name__ in SECONDARY_ERRORS for cls in type(exc).__mro__)
                 or bool(PEER_GONE.search(str(exc))))
    return f"failed: {type(exc).__name__}: {exc}", "FAILED", secondary


def record_failure(folder: Path, rank: int, exc: BaseException) -> None:
    """Say why this rank stopped, for the launcher (see `first_cause`)."""
    reason, status, secondary = describe_failure(exc)
    record = {"reason": reason, "time": time.time(), "secondary": secondary, "status": status}
    path = folder / FAILURE_FILE.format(rank=rank)
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps(record), encoding="utf-8")
    os.replace(partial, path)  # whole or absent, even if this rank is killed meanwhile


def end_run_as_rank_0(spec, exc: BaseException) -> None:
    """Under torchrun there is no launcher of ours to end the run: rank 0 ends it, saying when
    the cause is likely another rank (whose own output, on its machine, says why)."""
    from nf1prov import tracking
    from nf1prov.provenance import launched, run_end

    reason, status, secondary = describe_failure(exc)
    reason = f"rank 0 {reason}"
    if isinstance(exc, launched.RankCouldNotStart):
        reason = str(exc)
    elif secondary:
        reason += (" (torchrun stops every rank when one fails: the output of the failing rank "
                   "says why)")
    try:
        client = tracking.client(spec.tracking_uri)
    except Exception:  # noqa: BLE001 - the parent ends the run if the store is back
        return
    run_end.end_run_or_warn(client, spec.run_id, status, reason)


def rank_main(spec=None) -> int:
    """The body of one rank process: one that `launch` started (``spec`` None: it is read from
    the `training.RANK_SPEC_ENV` file), or a training process started under torchrun (``spec``
    given)."""
    from nf1prov.provenance import signals, training
    from nf1prov.train import distributed

    folder = None  # where our launcher reads why a rank stopped
    if spec is None:
        spec_file = Path(os.environ[training.RANK_SPEC_ENV])
        spec = training.Spec(**json.loads(spec_file.read_text(encoding="utf-8")))
        folder = spec_file.parent
        training.watch_parent(os.getppid())  # the launcher: if it dies, so do the ranks
    rank = distributed.environment_world()[0]
    try:
        with signals.sigterm_as_exception():
            from nf1prov.train.trainer import resolve_device

            if folder is None and rank == 0:  # under torchrun: are the others coming?
                from nf1prov.provenance import launched

                launched.await_ranks(distributed.environment_world()[1])
            distributed.init_from_environment(resolve_device(spec.config["train"]["device"]).type)
            try:
                if rank == 0:
                    finished = training.train_in_run(spec, end_on_failure=False)
                    if folder is not None:
                        (folder / OUTCOME_FILE).write_text(json.dumps({"finished": finished}))
                    elif not finished:
                        return training.LOGGING_PENDING_EXIT
                else:
                    train_shard(spec)
            finally:
                distributed.shutdown()
    except BaseException as exc:  # noqa: BLE001 - recorded, then an exit code
        # The launcher's SIGTERM (it stops every rank once one failed) may not end this rank
        # before it has said why it stopped.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if folder is not None:
            with contextlib.suppress(OSError):  # gone when the launcher was killed
                record_failure(folder, rank, exc)
        elif rank == 0:
            end_run_as_rank_0(spec, exc)
        if isinstance(exc, Exception) and describe_failure(exc)[2]:  # a peer vanished
            print(f"nf1prov: rank {rank} stopped: {type(exc).__name__} (another rank "
                  "stopped first)", file=sys.stderr)
            return 1
        return training.exit_code(exc, f"nf1prov: error (rank {rank})")
    return 0


def train_shard(spec) -> None:
    """A rank other than 0: train its shard of every batch; nothing is logged."""
    from nf1prov.provenance import code_snapshot
    from nf1prov.train.run import train_model

    code_snapshot.check_modules_from(Path(spec.code_root))
    train_model(spec.config, Path(spec.data_root), cache_dir=Path(spec.cache_dir),
                resume_from=Path(spec.resume_from) if spec.resume_from else None)
