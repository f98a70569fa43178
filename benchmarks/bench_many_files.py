"""Outside check p6 (issue 27): the cost per file. The same pixels as 8 fields of view of
5 x 512 x 512 ("few files") and as 512 fields of 5 x 64 x 64 ("many files"), each trained for
one epoch of one batch: many files at most 2x few files.

Both datasets are synthetic organoids (`nf1prov.data.synthetic.synthesize_field`, seeded) in
the upstream layout, 8 patients, no holdout patient, so that every field is split into train,
validation and test. Each run is `nf1prov train --config configs/demo.toml --set
train.epochs=1 --set train.max_batches_per_epoch=1` in a fresh demo workspace
(`nf1prov.demo.prepare_workspace`; a fresh cache too, so every file is read, hashed, checked and
decoded as a user's first training does), timed wall and CPU (the command and every process it
waited for) as a user would see it: discovery, header checks, the split manifest's hashes,
decoding, the batch, the validation pass, instance tuning on the validation stacks, the model
and its logging. The runs alternate few, many, many, few, ...; the best of `--rounds` each.

    python benchmarks/bench_many_files.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_demo import child_env, machine_line, timed, versions  # noqa: E402

LIMIT = 2.0  # p6: many files at most this many times few files
SLICES = 5
DATASETS = {"few files": (8, 512), "many files": (512, 64)}  # fields, side in pixels


def write_dataset(root: Path, fields: int, side: int) -> None:
    """``fields`` fields of SLICES x side x side, spread over the 8 demo patients."""
    import tifffile

    from nf1prov.data.layout import IMAGE_DIR, IMAGE_SUFFIX, MASK_DIR, MASK_NAME
    from nf1prov.data.synthetic import PATIENT_NAMES, synthesize_field

    rng = np.random.default_rng(0)
    for n in range(fields):
        patient, name = PATIENT_NAMES[n % len(PATIENT_NAMES)], f"C4-{n // len(PATIENT_NAMES) + 1}"
        stack, labels = synthesize_field(rng, SLICES, side, side)
        for folder, file, array in ((IMAGE_DIR, f"{name}{IMAGE_SUFFIX}", stack),
                                    (MASK_DIR, MASK_NAME, labels)):
            path = root / patient / folder / name / file
            path.parent.mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(path, array)


def train_once(data: Path, folder: Path) -> tuple[float, float]:
    """(wall, CPU) seconds of one `nf1prov train` on ``data`` in a fresh workspace."""
    from nf1prov.demo import prepare_workspace, step_env

    workspace = prepare_workspace(folder, echo=lambda *_: None)
    command = [sys.executable, "-m", "nf1prov", "train", "--config", "configs/demo.toml",
               "--data-root", str(data), "--json", "--set", "train.epochs=1",
               "--set", "train.max_batches_per_epoch=1", "--set", "data.holdout_patients=[]"]
    result = timed(command, workspace, child_env(step_env(workspace)), folder.parent / "log")
    return result.wall, result.cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    print(machine_line())
    print(versions())
    sizes = " and ".join(f"{k}: {n} fields of {SLICES}x{s}x{s}" for k, (n, s) in DATASETS.items())
    print(f"{sizes}; one epoch of one batch (configs/demo.toml); best of {args.rounds}",
          flush=True)
    base = Path(tempfile.mkdtemp(prefix="nf1prov-bench-files-"))
    best: dict[str, tuple[float, float]] = {}
    try:
        for name, (fields, side) in DATASETS.items():
            write_dataset(base / name.replace(" ", "-"), fields, side)
        for number in range(args.rounds):
            order = list(DATASETS) if number % 2 == 0 else list(DATASETS)[::-1]
            for name in order:
                folder = base / f"run{number}-{name.replace(' ', '-')}"
                wall, cpu = train_once(base / name.replace(" ", "-"), folder)
                shutil.rmtree(folder, ignore_errors=True)
                best[name] = min(best.get(name, (wall, cpu)), (wall, cpu))
                print(f"  round {number + 1}  {name:10s} {wall:6.1f} s wall, {cpu:6.1f} CPU-s",
                      flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    (few_wall, few_cpu), (many_wall, many_cpu) = best["few files"], best["many files"]
    ratio = many_wall / few_wall
    verdict = "within" if ratio <= LIMIT else "OVER"
    print(f"\nmany files over few files: {ratio:.2f}x wall ({verdict} {LIMIT}x), "
          f"{many_cpu / few_cpu:.2f}x CPU")


if __name__ == "__main__":
    main()
