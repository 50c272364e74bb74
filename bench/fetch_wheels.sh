#!/usr/bin/env bash
# The packages the GPU machine's image lacks (its python3 is 3.12 with torch and Triton; no soundfile, soxr or cffi,
# and transformers 5.17 where the tests pin 5.24.0), and nvtx (not checked there; the runtime imports it), as wheels
# in .whl/ for gpu_session.sh to install offline.
# Run here (package registries are reachable from this machine, nothing is from the GPU's), then pass
# carry=[".whl"] to the device tool: .whl/ is git-ignored, so only a carry takes it along (18 MB).
#
#   bash bench/fetch_wheels.sh [PYTHON_VERSION]   (default 3.12)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-3.12}
pip=${PIP:-$(command -v pip3 || command -v pip)}
[ -x .venv/bin/pip ] && pip=.venv/bin/pip
"$pip" download -q --only-binary=:all: --no-deps --implementation cp --python-version "$python" \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  -d .whl soundfile soxr cffi pycparser nvtx transformers==5.24.0
ls -l .whl
