#!/usr/bin/env bash
# Download the wheels benchmarks/gpu_check.sh needs on an offline GPU machine (the packages of
# benchmarks/gpu_wheels.txt, which its image lacks) into .whl/, git-ignored through
# .git/info/exclude. See docs/gpu.md.
# Usage: bash benchmarks/fetch_gpu_wheels.sh [PYTHON_VERSION=3.12] [DEST=.whl]
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-3.12}
dest=${2:-.whl}
mkdir -p "$dest"
rm -f "$dest"/*.whl  # exactly the listed set: gpu_check.sh installs every wheel there
exclude=$(git rev-parse --git-path info/exclude)
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo /.whl/ >> "$exclude"
grep -v '^\s*\(#\|$\)' benchmarks/gpu_wheels.txt | xargs python3 -m pip download -q --no-deps \
  --only-binary=:all: --python-version "$version" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d "$dest"
du -sh "$dest"
