"""Peak memory of `nf1prov predict` on one large 2-D image: an earlier commit's code against this
checkout's, and proof that both write the same bytes.

    .venv/bin/python benchmarks/bench_predict_memory.py [--size 4096] [--before REV]

In a temporary folder it makes a model folder as `nf1prov checkout` leaves one (a random UNet of
width 4, 3 input slices, 256-pixel tiles: the network's own memory is negligible, so what is
measured is nf1prov's arrays), a SIZE x SIZE uint16 image and a small one, and runs
``python -m nf1prov predict`` on each in a child process, once with the code of commit REV
(``git archive`` of nf1prov/ and models/, put first on PYTHONPATH) and once with this checkout's.
Each child's peak resident set comes from ``os.wait4`` (``ru_maxrss``). The small image gives
the floor (interpreter, torch and MLflow imports), so the large image's own share is shown too.
Then both codes predict a 4 x CHECK x CHECK stack (--check-size; not a multiple of 16, so tiles
are padded) and the SHA-256 of every output TIFF's pixels (dtype, shape, bytes) is compared:
they must be identical. (Their metadata may differ: later code records the model and the
physical pixel sizes in it.) Both write float16 probabilities (``--probabilities-dtype
float16``, the default of the code before the memory work, written page by page).
REV defaults to the commit before the one that added this file (the code before the memory
work), or HEAD while this file is not committed.

The last line is ``RESULT size=... before_mb=... after_mb=... ratio=...`` for scripts.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def default_before() -> str:
    added = subprocess.run(["git", "log", "--diff-filter=A", "--format=%H", "--",
                            "benchmarks/bench_predict_memory.py"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split()
    return f"{added[-1]}^" if added else "HEAD"


def export_code(rev: str, destination: Path) -> Path:
    """nf1prov/ and models/ of commit ``rev`` under ``destination``."""
    archive = destination / "code.tar"
    with open(archive, "wb") as handle:
        subprocess.run(["git", "archive", rev, "nf1prov", "models"], cwd=REPO, check=True,
                       stdout=handle)
    with tarfile.open(archive) as tar:
        tar.extractall(destination / "code", filter="data")
    return destination / "code"


def make_inputs(folder: Path, size: int, check_size: int) -> Path:
    """The model folder and the images; returns the model's weights folder."""
    import tifffile
    import torch
    from scipy import ndimage

    from models.unet import UNet
    from nf1prov import weights
    from nf1prov.config import defaults, to_toml

    torch.manual_seed(0)
    model = UNet(3, 3, 4).eval()
    with torch.no_grad():
        model.head.weight.mul_(30)  # probabilities that vary in space, as a trained model's
    weights.save(model, folder / "model" / "model")
    config = defaults()
    config["data"].update(crop_size=256, input_slices=3)
    config["model"]["base_width"] = 4
    (folder / "model" / "config").mkdir()
    (folder / "model" / "config" / "config.toml").write_text(to_toml(config))
    for name, shape in (("large", (size, size)), ("small", (64, 64)),
                        ("check", (4, check_size, check_size))):
        rng = np.random.default_rng(0)
        image = ndimage.gaussian_filter(rng.random(shape, np.float32), 4)
        image = (image - image.min()) / (image.max() - image.min())
        (folder / name).mkdir()
        tifffile.imwrite(folder / name / f"{name}.tif", (image * 65535).astype(np.uint16),
                         photometric="minisblack")
    return folder / "model" / "model"


def peak_rss_mb(code: Path | None, model: Path, image: Path, out: Path) -> float:
    """Peak resident set (MB) of one `nf1prov predict` child with ``code`` first on its path
    (None: this checkout's)."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(code or REPO),
                                                      os.environ.get("PYTHONPATH")]))
    proc = subprocess.Popen([sys.executable, "-m", "nf1prov", "predict", str(model), str(image),
                             "-o", str(out), "--no-progress", "--probabilities-dtype",
                             "float16"], env=env, cwd=out.parent,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        sys.exit(f"predict failed ({code or 'this checkout'}): {stderr.decode()[-2000:]}")
    return usage.ru_maxrss / 1024  # KiB on Linux


def output_hashes(folder: Path) -> dict[str, str]:
    """SHA-256 of each output TIFF's pixels: their dtype, shape and bytes."""
    import tifffile

    def digest(path: Path) -> str:
        pixels = tifffile.imread(path)
        return hashlib.sha256(f"{pixels.dtype} {pixels.shape}".encode()
                              + np.ascontiguousarray(pixels).tobytes()).hexdigest()

    return {p.name: digest(p) for p in sorted(folder.iterdir()) if p.suffix == ".tif"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--check-size", type=int, default=500,
                        help="side of the 4-slice stack whose output pixels must be identical")
    parser.add_argument("--before", default=None, help="the commit to compare against")
    args = parser.parse_args()
    before = args.before or default_before()
    with tempfile.TemporaryDirectory(prefix="nf1prov-bench-memory-") as tmp:
        tmp = Path(tmp)
        model = make_inputs(tmp, args.size, args.check_size)
        old = export_code(before, tmp)
        input_mb = args.size * args.size * 2 / 2**20
        print(f"{args.size} x {args.size} uint16 image ({input_mb:.0f} MB), width-4 UNet, "
              f"256-px tiles; before = {before}")
        peaks = {}
        for label, code in (("before", old), ("after", None)):
            floor = peak_rss_mb(code, model, tmp / "small" / "small.tif", tmp / f"{label}-s")
            peak = peak_rss_mb(code, model, tmp / "large" / "large.tif", tmp / f"{label}-l")
            peaks[label] = peak
            print(f"{label:6s}: peak RSS {peak:7.0f} MB ({peak / input_mb:4.1f}x the input); "
                  f"floor (64 x 64 image) {floor:4.0f} MB; the image's share {peak - floor:6.0f}"
                  " MB")
        hashes = {}
        for label, code in (("before", old), ("after", None)):
            out = tmp / f"{label}-check"
            peak_rss_mb(code, model, tmp / "check" / "check.tif", out)
            hashes[label] = output_hashes(out)
        same = hashes["before"] == hashes["after"]
        print(f"outputs of a 4 x {args.check_size} x {args.check_size} stack: "
              + ("identical pixels" if same else f"DIFFER: {hashes}"))
        ratio = peaks["before"] / peaks["after"]
        print(f"RESULT size={args.size} before_mb={peaks['before']:.0f} "
              f"after_mb={peaks['after']:.0f} ratio={ratio:.2f} identical={same}")
        if not same:
            sys.exit(1)


if __name__ == "__main__":
    main()
