"""`nf1prov predict` and `nf1prov evaluate` on Dask (DESIGN 3.12): a real `dask scheduler` and
`dask worker` processes on localhost, as a lab's cluster runs them; tiny untrained models and
stacks, CPU.

The serial reference runs with one torch thread: CPU probabilities differ in their last bit
between thread counts, and each `dask worker` here has one (its nanny sets OMP_NUM_THREADS=1)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from nf1prov.cli import cli
from tests.test_inference import save_local_model, smooth_stack

DASK = Path(sys.executable).with_name("dask")
OUTPUTS = ("probabilities.ome.tif", "classes.ome.tif", "labels.ome.tif")
N_STACKS = 6


def start(args: list[str], log: Path) -> subprocess.Popen:
    """A dask process in its own session (its nanny's worker dies with it), logging to ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen([str(DASK), *args], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop(process: subprocess.Popen, sig=signal.SIGTERM) -> None:
    """End a process started by `start` and its children (its whole process group)."""
    if process.poll() is None:
        os.killpg(process.pid, sig)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def wait_for_workers(address: str, n: int, timeout: float = 60) -> None:
    from distributed import Client

    with Client(address, timeout="20s") as client:
        client.wait_for_workers(n, timeout=timeout)


class Cluster:
    """A scheduler and its workers, each a real `dask` command."""

    def __init__(self, folder: Path):
        self.folder = folder
        file = folder / "scheduler.json"
        self.scheduler = start(["scheduler", "--port", "0", "--no-dashboard", "--scheduler-file",
                                str(file)], folder / "scheduler.log")
        deadline = time.monotonic() + 60
        while not file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.address = json.loads(file.read_text())["address"]
        self.workers: list[subprocess.Popen] = []

    def add_worker(self, name: str) -> subprocess.Popen:
        worker = start(["worker", self.address, "--nthreads", "1", "--no-dashboard",
                        "--name", name], self.folder / f"{name}.log")
        self.workers.append(worker)
        return worker

    def close(self) -> None:
        for worker in self.workers:
            stop(worker)
        stop(self.scheduler)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dask")
    running = Cluster(folder)
    try:
        for name in ("w1", "w2"):
            running.add_worker(name)
        wait_for_workers(running.address, 2)
        yield running
    finally:
        running.close()


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    """A model folder, stacks under two patients, and their serial predictions (one thread,
    in a fresh process that must not import Dask)."""
    root = tmp_path_factory.mktemp("screen")
    model_dir, _ = save_local_model(root)
    for i in range(N_STACKS):
        folder = root / "in" / f"P{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(folder / f"s{i}.tif", smooth_stack((3, 48, 56), seed=i))
    script = ("import sys\nfrom nf1prov.cli import main\n"
              "try:\n    main(sys.argv[1:])\nexcept SystemExit as end:\n    assert not end.code\n"
              "assert not [m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed')]\n")
    subprocess.run([sys.executable, "-c", script, "predict", str(model_dir), str(root / "in"),
                    "-o", str(root / "serial"), "--threads", "1", "--min-size", "0",
                    "--no-progress"], check=True)
    return model_dir, root / "in", root / "serial"


def predict(model_dir, inputs, out, *options):
    return CliRunner().invoke(cli, ["predict", str(model_dir), *map(str, inputs), "-o", str(out),
                                    "--min-size", "0", "--no-progress", *map(str, options)])


def stacks(folder: Path) -> list[str]:
    """Each stack's output path stem under ``folder`` (patient/stem)."""
    return sorted(str(p.relative_to(folder))[:-len("_nf1prov.json")]
                  for p in folder.rglob("*_nf1prov.json"))


def assert_same_as_serial(out: Path, serial: Path) -> None:
    assert stacks(out) == stacks(serial) and len(stacks(serial)) == N_STACKS
    for stem in stacks(serial):
        for ending in OUTPUTS:
            assert (out / f"{stem}_{ending}").read_bytes() == \
                (serial / f"{stem}_{ending}").read_bytes(), (stem, ending)
        made, expected = (json.loads((folder / f"{stem}_nf1prov.json").read_text())
                          for folder in (out, serial))
        assert {**made, "written": None} == {**expected, "written": None}
    assert max(int(tifffile.imread(p).max()) for p in serial.rglob("*_labels.ome.tif")) >= 2


def file_states(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in folder.rglob("*") if p.is_file()}


def test_a_cluster_makes_the_serial_bytes_and_a_rerun_redoes_only_unfinished_stacks(
        cluster, screen, tmp_path):
    model_dir, inputs, serial = screen
    out = tmp_path / "out"
    first = predict(model_dir, [inputs], out, "--scheduler", cluster.address)
    assert first.exit_code == 0, first.output
    assert f"Wrote predictions of {N_STACKS} stack(s)" in first.output
    assert_same_as_serial(out, serial)

    before = file_states(out)
    redo = "P1/s3"
    (out / f"{redo}_nf1prov.json").unlink()
    again = predict(model_dir, [inputs], out, "--scheduler", cluster.address)
    assert again.exit_code == 0, again.output
    assert f"Wrote predictions of 1 stack(s) to {out}; skipped {N_STACKS - 1} done before" \
        in again.output
    after = file_states(out)
    changed = {name for name in before if after[name][0] != before[name][0]}
    assert changed == {f"{redo}_{ending}" for ending in (*OUTPUTS, "nf1prov.json")}
    assert {name: state[1] for name, state in before.items() if name not in changed} == \
        {name: state[1] for name, state in after.items() if name not in changed}
    assert_same_as_serial(out, serial)

    everything = predict(model_dir, [inputs], out, "--scheduler", cluster.address, "--overwrite")
    assert everything.exit_code == 0, everything.output
    assert f"Wrote predictions of {N_STACKS} stack(s) to {out}." in everything.output
    redone = file_states(out)
    assert all(redone[name][0] != after[name][0] for name in after)
    assert_same_as_serial(out, serial)


def test_a_serial_rerun_skips_stacks_made_the_same_way_only(screen, tmp_path, one_thread):
    model_dir, inputs, _ = screen
    scan = tmp_path / "scan.tif"
    scan.write_bytes(sorted(inputs.rglob("*.tif"))[0].read_bytes())
    out = tmp_path / "out"
    assert predict(model_dir, [scan], out).exit_code == 0
    before = file_states(out)
    again = predict(model_dir, [scan], out)
    assert "skipped 1 done before" in again.output and file_states(out) == before
    # other instance parameters, another output dtype, back, a changed input: made again
    for options in (["--seed-threshold", "0.6"], ["--probabilities-dtype", "float16"], []):
        other = predict(model_dir, [scan], out, *options)
        assert other.exit_code == 0 and "Wrote predictions of 1 stack(s)" in other.output
        assert "skipped" not in other.output
    assert "skipped 1 done before" in predict(model_dir, [scan], out).output
    tifffile.imwrite(scan, smooth_stack((3, 48, 56), seed=99))
    assert "skipped" not in predict(model_dir, [scan], out).output


def test_a_bad_stack_is_reported_by_name_and_the_others_are_done(cluster, screen, tmp_path):
    model_dir, inputs, serial = screen
    scans = tmp_path / "scans"
    scans.mkdir()
    good = sorted(inputs.rglob("*.tif"))[:2]
    for path in good:
        (scans / path.name).write_bytes(path.read_bytes())
    tifffile.imwrite(scans / "floats.tif", np.zeros((3, 32, 32), np.float32))
    (scans / "broken.tif").write_bytes(b"not a TIFF at all")
    out = tmp_path / "out"
    result = predict(model_dir, [scans], out, "--scheduler", cluster.address)
    assert result.exit_code == 1, result.output
    assert "2 stack(s) failed; the others are done" in result.output
    assert f"{scans / 'floats.tif'}: " in result.output and "dtype float32" in result.output
    assert f"{scans / 'broken.tif'}: Cannot read" in result.output
    assert sorted(p.name for p in out.glob("*_nf1prov.json")) == sorted(
        f"{p.stem}_nf1prov.json" for p in good)
    for path in good:
        stem = path.relative_to(inputs).with_suffix("")
        assert (out / f"{path.stem}_labels.ome.tif").read_bytes() == \
            (serial / f"{stem}_labels.ome.tif").read_bytes()


def test_a_worker_killed_mid_run_leaves_a_complete_and_equal_result(cluster, screen, tmp_path):
    from distributed import Client

    model_dir, inputs, serial = screen
    victim = cluster.add_worker("victim")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "nf1prov", "predict", str(model_dir), str(inputs), "-o",
               str(out), "--min-size", "0", "--no-progress", "--scheduler", cluster.address]
    with Client(cluster.address, timeout="20s") as watcher:
        watcher.wait_for_workers(3, timeout=60)
        [address] = [a for a, w in watcher.scheduler_info()["workers"].items()
                     if w["name"] == "victim"]
        run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while not watcher.processing(workers=[address])[address] and run.poll() is None:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            killed_mid_task = bool(watcher.processing(workers=[address])[address])
            stop(victim, signal.SIGKILL)
            output = run.communicate(timeout=300)[0].decode()
        finally:
            if run.poll() is None:
                run.kill()
    assert killed_mid_task and run.returncode == 0, output
    assert f"Wrote predictions of {N_STACKS} stack(s)" in output
    assert_same_as_serial(out, serial)


def test_a_local_cluster_of_two_workers(screen, tmp_path):
    model_dir, inputs, serial = screen
    out = tmp_path / "out"
    result = predict(model_dir, [inputs], out, "--workers", "2", "--threads", "1")
    assert result.exit_code == 0, result.output
    assert "Local Dask cluster: 2 worker process(es); dashboard http" in result.output
    assert_same_as_serial(out, serial)


def test_scheduler_and_workers_together_is_a_usage_error(screen, tmp_path):
    model_dir, inputs, _ = screen
    result = predict(model_dir, [inputs], tmp_path / "out", "--workers", "2", "--scheduler",
                     "tcp://127.0.0.1:1")
    assert result.exit_code == 2 and "not both" in result.output


def test_the_slurm_example_writes_a_job_script_of_one_thread_workers():
    """docs/examples/predict_on_slurm.py as far as it runs without SLURM: dask-jobqueue's job
    script (submitting it and the run are not tested here)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "docs" / "examples" / "predict_on_slurm.py"
    spec = importlib.util.spec_from_file_location("predict_on_slurm", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    ctrl_c = signal.getsignal(signal.SIGINT)  # dask-jobqueue sets its own, to cancel jobs
    try:
        with example.slurm_cluster(queue="short", account="mylab", cores=4, memory="16GB",
                                   walltime="02:00:00") as slurm:
            script = slurm.job_script()
            address = slurm.scheduler_address
    finally:
        signal.signal(signal.SIGINT, ctrl_c)
    for line in ("#SBATCH -p short", "#SBATCH -A mylab", "#SBATCH --cpus-per-task=4",
                 "#SBATCH -t 02:00:00", "#SBATCH -J nf1prov-predict"):
        assert line in script.splitlines(), script
    worker = next(line for line in script.splitlines() if "dask_worker" in line).split()
    assert worker[0] == sys.executable and address in worker
    assert worker[worker.index("--nthreads") + 1] == "1"
    assert worker[worker.index("--nworkers") + 1] == "4"


# --- nf1prov evaluate on the same cluster ------------------------------------------------------

def holdout_data(root: Path) -> Path:
    """Three fields of view of two holdout patients (`tests.test_evaluate.write_field`)."""
    from tests.test_evaluate import write_field

    write_field(root, "NF0014_T1", "C4-2", 1)
    write_field(root, "NF0014_T1", "D5-1", 2)
    write_field(root, "NF0016", "C4-2", 3)
    return root


def evaluate(data: Path, *options):
    return CliRunner().invoke(cli, ["evaluate", "tiny-eel-1", "--data-root", str(data),
                                    "--baseline", "--no-progress", "--min-size", "5",
                                    "--threads", "1", *map(str, options)])


def printed(result, overlays: Path) -> str:
    """What evaluate printed, less the cluster's own line and with the overlays folder named
    the same."""
    return "\n".join(line for line in result.output.replace(str(overlays), "OVERLAYS").splitlines()
                     if not line.startswith("Dask scheduler"))


def test_evaluate_on_a_cluster_prints_and_logs_what_a_serial_one_does(
        cluster, tracking_uri, tmp_path, one_thread):
    import mlflow

    from tests.test_evaluate import log_tiny_model

    run_id = log_tiny_model(holdout=("NF0014", "NF0016"))
    data = holdout_data(tmp_path / "data")
    store = mlflow.MlflowClient()

    def logged(name: str) -> tuple[dict, bytes]:
        csv = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="evaluation/holdout_metrics.csv",
            dst_path=str(tmp_path / name))
        return store.get_run(run_id).data.metrics, Path(csv).read_bytes()

    serial = evaluate(data, "--overlays", tmp_path / "serial")
    assert serial.exit_code == 0, serial.output
    assert "NF0014_T1 (2 stacks)" in serial.output and "NF0016 (1 stack)" in serial.output
    metrics, csv = logged("serial-csv")
    on_cluster = evaluate(data, "--overlays", tmp_path / "cluster", "--scheduler",
                          cluster.address)
    assert on_cluster.exit_code == 0, on_cluster.output
    assert f"Dask scheduler {cluster.address}:" in on_cluster.output
    assert printed(on_cluster, tmp_path / "cluster") == printed(serial, tmp_path / "serial")
    assert logged("cluster-csv") == (metrics, csv)
    for name, value in metrics.items():  # logged twice, the same value
        assert [m.value for m in store.get_metric_history(run_id, name)] == [value, value], name
    overlays = sorted(p.name for p in (tmp_path / "serial").iterdir())
    assert len(overlays) == 3 and sorted(p.name for p in (tmp_path / "cluster").iterdir()) \
        == overlays
    for name in overlays:
        assert (tmp_path / "cluster" / name).read_bytes() == \
            (tmp_path / "serial" / name).read_bytes(), name
    logged_overlays = store.list_artifacts(run_id, "evaluation/overlays")
    assert sorted(Path(a.path).name for a in logged_overlays) == overlays
    # (--workers N differs only in `open_client`, tested by predict's local cluster test: an
    # evaluation on one more local cluster would add ~10 s)


def test_a_field_failing_on_the_cluster_stops_evaluate_by_name_and_logs_nothing(
        cluster, tracking_uri, tmp_path):
    import mlflow

    from nf1prov import tracking
    from tests.test_evaluate import log_tiny_model

    run_id = log_tiny_model(holdout=("NF0014", "NF0016"))
    data = holdout_data(tmp_path / "data")
    broken = data / "NF0016" / "segmentation_masks" / "C4-2" / "cell_mask.tiff"
    broken.write_bytes(b"not a TIFF at all")
    result = evaluate(data, "--scheduler", cluster.address)
    assert result.exit_code == 2, result.output
    assert "Field of view NF0016/C4-2 (" in result.output
    assert "failed on the Dask cluster: Cannot read the instance mask" in result.output
    assert str(broken) in result.output and "nothing was logged" in result.output
    run = mlflow.MlflowClient().get_run(run_id)
    assert run.data.metrics == {}
    assert tracking.EVALUATED_PATIENTS not in run.data.tags
    assert mlflow.MlflowClient().list_artifacts(run_id, "evaluation") == []


def test_evaluate_refuses_scheduler_and_workers_together(tmp_path):
    result = CliRunner().invoke(cli, ["evaluate", "tiny-eel-1", "--data-root", str(tmp_path),
                                      "--workers", "2", "--scheduler", "tcp://127.0.0.1:1"])
    assert result.exit_code == 2 and "not both" in result.output
