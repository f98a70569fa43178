"""`nf1prov predict` on a Dask distributed cluster: one task per stack (DESIGN 3.12).

The client (`predict_on_cluster`) sends each task a stack's path, its output folder, the
prediction options (small: instance parameters, tiling, dtype) and a model reference (a folder's
path, or a codename / run ID with its store's URI and run: `ModelReference` in
`nf1prov.provenance.models`, passed in duck-typed). Each worker process loads the model itself,
once, from that reference (`worker_model`) and keeps it for the tasks that follow: the weights
are never pickled nor sent through the scheduler, and a worker reads them as tensors only, as
the serial path does. A task runs `nf1prov.segment.files.predict_file`, the serial path's own
function, so the outputs are the same bytes when the torch threads are the same (CPU
probabilities differ in their last bit between thread counts; docs/predict.md).

Every path must be the same on the workers as here (a shared filesystem). A stack whose sidecar
says it was made the same way is skipped by its task (`done_before`). A task reports a failure
(an unreadable TIFF, a dtype the model cannot take) as its result instead of raising, so the
client lists each failed stack by name and reason; a worker that dies mid-stack has its task
rerun on another worker by the scheduler (the sidecar, written last, was never written).

`nf1prov evaluate` runs the same way (`evaluate_on_cluster`): one task per field of view, the
serial path's `nf1prov.segment.evaluate.evaluate_field`, returning its small integer counts (and
its overlay's PNG); the client adds them up in the order of the fields, as the serial loop does.

Dask is imported here only, and this module only when ``--scheduler`` or ``--workers`` is given.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from nf1prov.errors import UserError
from nf1prov.segment.files import PredictionFiles

# In a worker process: each model reference's loaded model, loaded by its first task.
_models: dict = {}
_loading = threading.Lock()  # a worker with several threads loads a model once


@dataclass(frozen=True)
class StackOutcome:
    """What one task returns: the stack's files (``skipped`` when done before) or why it
    failed."""

    path: Path
    files: PredictionFiles | None = None
    error: str | None = None


def worker_model(reference):
    """The model ``reference`` names, loaded by this process on first use (``reference.load()``)
    and kept for every later task of this worker."""
    with _loading:
        if reference not in _models:
            _models[reference] = reference.load()
        return _models[reference]


def predict_on_worker(reference, path: Path, outdir: Path, options: dict,
                      threads: int) -> StackOutcome:
    """One task: ``path``'s outputs under ``outdir`` (`predict_file` with ``options``), torch
    using ``threads`` threads (0: the worker's own OMP_NUM_THREADS, else its CPUs)."""
    from nf1prov.segment.files import predict_file
    from nf1prov.threads import use_in_this_process

    use_in_this_process(threads)  # before the first task imports torch
    try:
        loaded = worker_model(reference)
        return StackOutcome(path, predict_file(loaded, path, outdir, progress=False, **options))
    except Exception as exc:  # reported with the other stacks' results, by name
        return StackOutcome(path, error=failure_reason(exc))


def failure_reason(exc: BaseException) -> str:
    """A user error's own message; anything else as its type and message."""
    return str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"


@contextmanager
def open_client(scheduler: str | None, workers: int | None, echo: Callable[[str], None]):
    """A Dask client of the scheduler at ``scheduler``, or of a local cluster of ``workers``
    processes (one thread each: torch has its own threads) closed on leaving."""
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            client = Client(scheduler, timeout="20s")
        except OSError as exc:
            raise UserError(f"Cannot reach the Dask scheduler {scheduler} ({exc}). Start one "
                            "(`dask scheduler`) and its workers (`dask worker ADDRESS`), or "
                            "pass --workers N for a cluster on this machine.") from None
        with client:
            count = len(client.scheduler_info()["workers"])
            echo(f"Dask scheduler {scheduler}: {count} worker(s) now."
                 + ("" if count else f" The stacks wait until one connects: `dask worker "
                                     f"{scheduler}` on a machine that sees these paths."))
            yield client
        return
    import logging
    import warnings

    # Dask's own warnings would follow ours: its dashboard moving off a busy port 8787 (the
    # line below names the port it took), a nanny killing its worker on the way out.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Port .* is already in use")
        cluster = LocalCluster(n_workers=workers, processes=True, threads_per_worker=1,
                               silence_logs=logging.ERROR)
    with cluster, Client(cluster) as client:
        echo(f"Local Dask cluster: {workers} worker process(es); dashboard "
             f"{cluster.dashboard_link}{dashboard_note()}")
        yield client


def dashboard_note() -> str:
    """What the dashboard needs when it cannot be served (bokeh, not a dependency)."""
    import importlib.util

    return "" if importlib.util.find_spec("bokeh") else \
        " (served once bokeh is installed: pip install 'bokeh>=3.1')"


def predict_on_cluster(reference, jobs: list[tuple[Path, Path]], options: dict, *,
                       scheduler: str | None = None, workers: int | None = None,
                       threads: int = 0, progress: bool = True,
                       echo: Callable[[str], None] = print) -> Iterator[StackOutcome]:
    """Run every (input, output folder) of ``jobs`` as one task on the cluster; yields each
    stack's outcome as it finishes, under a progress bar over stacks. Paths go to the workers
    absolute. A task lost with its workers more often than Dask allows
    (``distributed.scheduler.allowed-failures``) is a failed stack too."""
    from distributed import as_completed
    from tqdm.auto import tqdm

    with open_client(scheduler, workers, echo) as client:
        futures = {client.submit(predict_on_worker, reference, path.resolve(), folder.resolve(),
                                 options, threads, pure=False): path
                   for path, folder in jobs}
        with tqdm(total=len(futures), unit="stack", disable=not progress) as bar:
            for future in as_completed(futures):
                if future.status == "finished":
                    outcome = future.result()
                elif future.status == "error":  # KilledWorker: it killed every worker it met
                    outcome = StackOutcome(futures[future],
                                           error=failure_reason(future.exception()))
                else:  # cancelled: the scheduler lost it (or went away)
                    outcome = StackOutcome(futures[future], error=f"task {future.status} by "
                                           "the Dask scheduler")
                bar.update()
                yield StackOutcome(futures[future], outcome.files, outcome.error)
                future.release()


# ---------------------------------------------------------------------------------------------
# nf1prov evaluate: one task per field of view
# ---------------------------------------------------------------------------------------------

def evaluate_on_worker(reference, fov, options: dict, draw: bool, threads: int):
    """One task: `nf1prov.segment.evaluate.evaluate_field` of ``fov`` with ``options``, torch
    using ``threads`` threads. Returns its counts per method and, with ``draw``, its overlay as
    (file name, PNG bytes), drawn in this worker's temporary folder: the client writes it, so
    the workers need not share the folder it goes to (a temporary one of the client's when the
    overlays are only logged). Raises what the field raised (the client stops the evaluation)."""
    import tempfile

    from nf1prov.segment.evaluate import evaluate_field
    from nf1prov.threads import use_in_this_process

    use_in_this_process(threads)
    loaded = worker_model(reference)
    if not draw:
        return evaluate_field(loaded, fov, **options)
    with tempfile.TemporaryDirectory(prefix="nf1prov-overlay-") as tmp:
        counts, overlay = evaluate_field(loaded, fov, **{**options, "overlays": Path(tmp)})
        return counts, (overlay.name, overlay.read_bytes())


def evaluate_on_cluster(reference, fields: list, options: dict, *, scheduler: str | None = None,
                        workers: int | None = None, threads: int = 0, progress: bool = True,
                        echo: Callable[[str], None] = print) -> list:
    """Each field of view's `evaluate_field` result (counts per method, overlay path or None),
    in the order of ``fields``, from one task per field on the cluster; ``options`` are
    `evaluate_field`'s, its ``overlays`` a folder here. The first field that fails stops the
    evaluation (holdout scores without it would be wrong): a `UserError` when the field raised
    one (an unreadable mask, as the serial path), else `CheckFailed`, naming the field; leaving
    the client releases the other tasks."""
    from dataclasses import replace

    from distributed import as_completed
    from tqdm.auto import tqdm

    folder = options.get("overlays")
    sent = {**options, "overlays": None}
    with open_client(scheduler, workers, echo) as client:
        futures = {client.submit(evaluate_on_worker, reference,
                                 replace(fov, image_path=Path(fov.image_path).resolve(),
                                         mask_path=Path(fov.mask_path).resolve()),
                                 sent, folder is not None, threads, pure=False): i
                   for i, fov in enumerate(fields)}
        results: list = [None] * len(fields)
        with tqdm(total=len(futures), desc="evaluate", unit="stack",
                  disable=not progress) as bar:
            for future in as_completed(futures):
                fov = fields[futures[future]]
                if future.status != "finished":
                    raise field_failure(fov, future)
                counts, overlay = future.result()
                results[futures[future]] = (counts, None if overlay is None
                                            else write_overlay(folder, *overlay))
                bar.update()
                future.release()
    return results


def write_overlay(folder: Path, name: str, png: bytes) -> Path:
    """A worker's overlay PNG as ``folder/name``."""
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)
    return path


def field_failure(fov, future) -> Exception:
    """The error that stops an evaluation at the field of ``future`` (erred or cancelled)."""
    from nf1prov.errors import CheckFailed

    exc = future.exception() if future.status == "error" else None
    reason = failure_reason(exc) if exc is not None else \
        f"task {future.status} by the Dask scheduler"
    kind = UserError if isinstance(exc, UserError) else CheckFailed
    return kind(f"Field of view {fov.fov_id} ({fov.image_path}) failed on the Dask cluster: "
                f"{reason.rstrip('.')}. The evaluation stopped and nothing was logged (holdout "
                "scores without this field would not be the model's). Fix or remove its "
                "files and rerun.")
