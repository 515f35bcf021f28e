#!/usr/bin/env bash
# Build and install MinkowskiEngine 0.5.4 (a source-only release) against the installed torch.
# Idempotent: does nothing when it already imports. Fails loudly on any error.
# Recipe measured on our machines (DEVELOPERS.md): OpenBLAS, wheel, no build isolation,
# SETUPTOOLS_USE_DISTUTILS=stdlib (Python < 3.12; from 3.12 on, stdlib has no distutils: setuptools' own, "local");
# --cpu_only unless torch sees a CUDA GPU and nvcc exists.
set -euo pipefail
PYTHON="${PYTHON:-python3}"

if "$PYTHON" -c "from greenlab.compat import import_minkowski; import_minkowski()" 2>/dev/null; then
    echo "install_minkowski: MinkowskiEngine already importable, nothing to do"
    exit 0
fi

if ! ldconfig -p | grep -q libopenblas; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq libopenblas-dev
fi
"$PYTHON" -m pip install wheel

BUILD_OPTS=(--config-settings="--build-option=--blas=openblas")
if command -v nvcc >/dev/null 2>&1 && "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "install_minkowski: building with CUDA (takes a while)"
else
    echo "install_minkowski: building CPU-only (about 6 min on 2 cores)"
    BUILD_OPTS+=(--config-settings="--build-option=--cpu_only")
fi
DISTUTILS=$("$PYTHON" -c "import sys; print('stdlib' if sys.version_info < (3, 12) else 'local')")
"$PYTHON" -m pip install setuptools  # (3.12+: setuptools is not preinstalled in a new environment)
SETUPTOOLS_USE_DISTUTILS=$DISTUTILS "$PYTHON" -m pip install --no-build-isolation "${BUILD_OPTS[@]}" minkowskiengine==0.5.4

"$PYTHON" -c "from greenlab.compat import import_minkowski; ME = import_minkowski(); print('install_minkowski: MinkowskiEngine', ME.__version__, 'OK')"
