"""Segment a screen on a SLURM cluster: dask-jobqueue submits Dask workers as SLURM jobs, and
`nf1prov predict --scheduler` sends them one task per stack (docs/predict.md, "A screen on a
cluster").

    pip install dask-jobqueue
    python docs/examples/predict_on_slurm.py MODEL 'screen/*/zstack_images/*/*_TRANS.tif' \\
        -o predictions/ --jobs 8 --queue short --account mylab

Run it on a node that can submit jobs (a login node), from the repository, with nf1prov
installed in a Python environment the compute nodes see at the same path (this script's
interpreter is the one the jobs start). The model, the inputs and the outputs must be on a
filesystem every node mounts at the same path. Each job is one node share of --cores CPUs running
--cores worker processes of one thread each (torch: one thread per worker, the nanny's
OMP_NUM_THREADS=1), each holding one stack at a time in --memory / --cores of memory. The
scheduler runs in this script; the workers must reach it (--interface: the compute nodes'
network, e.g. ib0). A rerun of the same command skips the stacks already done.

What is tested without SLURM (tests/test_cluster_predict.py): the job script this writes.
"""

from __future__ import annotations

import argparse
import subprocess
import sys


def slurm_cluster(*, queue: str | None, account: str | None, cores: int, memory: str,
                  walltime: str, interface: str | None = None):
    """A dask-jobqueue SLURMCluster whose jobs each run ``cores`` one-thread workers."""
    from dask_jobqueue import SLURMCluster

    return SLURMCluster(queue=queue, account=account, cores=cores, processes=cores,
                        memory=memory, walltime=walltime, interface=interface,
                        python=sys.executable, job_name="nf1prov-predict")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("inputs", nargs="+")
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--jobs", type=int, default=4, help="SLURM jobs (nodes' shares)")
    parser.add_argument("--queue", default=None, help="SLURM partition")
    parser.add_argument("--account", default=None)
    parser.add_argument("--cores", type=int, default=8, help="CPUs per job: its workers")
    parser.add_argument("--memory", default="32GB", help="memory per job")
    parser.add_argument("--walltime", default="04:00:00")
    parser.add_argument("--interface", default=None, help="network interface, e.g. ib0")
    args, predict_options = parser.parse_known_args(argv)  # the rest goes to nf1prov predict
    with slurm_cluster(queue=args.queue, account=args.account, cores=args.cores,
                       memory=args.memory, walltime=args.walltime,
                       interface=args.interface) as cluster:
        cluster.scale(jobs=args.jobs)
        print(f"Dashboard: {cluster.dashboard_link}", flush=True)
        return subprocess.call([sys.executable, "-m", "nf1prov", "predict", args.model,
                                *args.inputs, "-o", args.output,
                                "--scheduler", cluster.scheduler_address, *predict_options])


if __name__ == "__main__":
    sys.exit(main())
