"""What preflight's secret scan costs on this repository, against detect-secrets on the same files.

Scans every file git tracks in this repository as if each were new (the most a model commit can
ask of the scan): ours is `nf1prov.provenance.secret_scan.find_secrets`, in this process; the
peer is detect-secrets' `SecretsCollection.scan_file` on each file with its default plugins,
also in this process, when it is installed (`pip install detect-secrets`; it is not a dependency of
nf1prov). Each is timed in CPU seconds (best of --repeats), and the findings of each are
counted: ours must find none here (tests/test_secrets.py asserts it), the peer's are listed by
file and kind (its false positives).

    .venv/bin/python benchmarks/bench_secret_scan.py [--repeats 3]

The last line is ``RESULT files=... ours_s=... peer_s=... ratio=... peer_findings=...``.
"""

from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True,
                         text=True).stdout
    return [path for path in out.split("\0") if path and (REPO / path).is_file()]


def best_cpu(action, repeats: int):
    """(least CPU seconds of ``repeats`` calls of ``action``, its last result)."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.process_time()
        result = action()
        best = min(best, time.process_time() - start)
    return best, result


def ours(files: list[str]):
    from nf1prov.provenance.secret_scan import find_secrets

    return find_secrets(REPO, files, [])


def peer(files: list[str]):
    from detect_secrets import SecretsCollection
    from detect_secrets.settings import default_settings

    with default_settings():
        secrets = SecretsCollection(root=str(REPO))
        for path in files:  # one by one here: its scan_files runs a process pool, whose CPU
            secrets.scan_file(path)  # time.process_time would not see
    return [(path, secret.type) for path, secret in secrets]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    files = tracked_files()
    size = sum((REPO / path).stat().st_size for path in files)
    print(f"{len(files)} tracked files, {size / 1e6:.2f} MB, scanned as if new")
    ours_s, found = best_cpu(lambda: ours(files), args.repeats)
    print(f"ours (nf1prov secret_scan): {ours_s:.3f} CPU-s, {len(found)} finding(s)")
    for finding in found:
        print(f"  {finding.describe()}")
    try:
        import detect_secrets  # noqa: F401
    except ImportError:
        print("peer (detect-secrets): not installed; `pip install detect-secrets` to compare")
        print(f"RESULT files={len(files)} ours_s={ours_s:.3f} peer_s=nan ratio=nan "
              "peer_findings=nan")
        return
    peer_s, peer_found = best_cpu(lambda: peer(files), args.repeats)
    print(f"peer (detect-secrets, default plugins): {peer_s:.3f} CPU-s, "
          f"{len(peer_found)} finding(s)")
    for path, kind in peer_found:
        print(f"  {path}: {kind}")
    print(f"peer / ours: {peer_s / ours_s:.0f}x the CPU")
    print(f"RESULT files={len(files)} ours_s={ours_s:.3f} peer_s={peer_s:.3f} "
          f"ratio={peer_s / ours_s:.1f} peer_findings={len(peer_found)}")


if __name__ == "__main__":
    main()
