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

CPU_ONLY=1
if command -v nvcc >/dev/null 2>&1 && "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "install_minkowski: building with CUDA (takes a while)"
    CPU_ONLY=0
else
    echo "install_minkowski: building CPU-only (about 6 min on 2 cores; 10 on a busy machine)"
fi

if "$PYTHON" -c "import sys; sys.exit(0 if sys.version_info < (3, 12) else 1)"; then
    # Python < 3.12: the measured recipe (stdlib distutils; numpy.distutils finds OpenBLAS)
    BUILD_OPTS=(--config-settings="--build-option=--blas=openblas")
    [ "$CPU_ONLY" = 1 ] && BUILD_OPTS+=(--config-settings="--build-option=--cpu_only")
    SETUPTOOLS_USE_DISTUTILS=stdlib "$PYTHON" -m pip install --no-build-isolation "${BUILD_OPTS[@]}" minkowskiengine==0.5.4
else
    # Python >= 3.12: no stdlib distutils and no numpy.distutils. setuptools' own distutils ("local"), a PEP 517
    # build, and the options as global options so that setup.py sees them already when it writes the metadata
    # (measured: Python 3.12.1, setuptools 84, pip 26, torch 2.14.1, CPU-only, 10 min on 2 busy cores).
    "$PYTHON" -m pip install setuptools "pip>=23.1"
    BUILD_OPTS=(--config-settings="--global-option=--blas=openblas")
    [ "$CPU_ONLY" = 1 ] && BUILD_OPTS+=(--config-settings="--global-option=--cpu_only")
    SETUPTOOLS_USE_DISTUTILS=local "$PYTHON" -m pip install --no-build-isolation --use-pep517 "${BUILD_OPTS[@]}" \
        minkowskiengine==0.5.4
fi

"$PYTHON" -c "from greenlab.compat import import_minkowski; ME = import_minkowski(); print('install_minkowski: MinkowskiEngine', ME.__version__, 'OK')"
