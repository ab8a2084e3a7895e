#!/usr/bin/env bash
# Install Horovod 0.28.1 (PyTorch + gloo, no MPI/TF/MXNet) into the venv given as $1.
# A stock build fails against torch 2.13: Horovod's CMake forces -std=c++14 and PyTorch's headers
# need C++17. A g++ wrapper that swaps the -std flag fixes it without patching sources. The wheel
# is built once (~3 min on 2 cores) and cached in $DISTQ_WHEEL_CACHE; later runs reinstall it.
# Idempotent: does nothing when `import horovod.torch` already works.
set -euo pipefail
VENV=${1:-.venv}
PY="$VENV/bin/python"
VERSION=0.28.1
CACHE=${DISTQ_WHEEL_CACHE:-$HOME/.cache/distq/wheels}
TORCH=$("$PY" -c 'import torch; print(torch.__version__)')

if "$PY" -c 'import horovod.torch' >/dev/null 2>&1; then
  exit 0
fi
# The wheel links against torch's C++ ABI: cache one per torch version.
WHEELS="$CACHE/horovod-$VERSION-torch-$TORCH"
mkdir -p "$WHEELS"
if ! ls "$WHEELS"/horovod-*.whl >/dev/null 2>&1; then
  command -v g++ >/dev/null || { echo "install-horovod: g++ is needed to build Horovod" >&2; exit 1; }
  command -v cmake >/dev/null || "$VENV/bin/pip" install --quiet --disable-pip-version-check \
    'cmake>=3.13,<4'
  WRAP=$(mktemp -d)
  trap 'rm -rf "$WRAP"' EXIT
  cat >"$WRAP/cxx17" <<'EOF'
#!/usr/bin/env bash
args=()
for a in "$@"; do
  case "$a" in
    -std=c++14|-std=c++11|-std=gnu++14|-std=gnu++11) args+=(-std=c++17) ;;
    *) args+=("$a") ;;
  esac
done
exec g++ "${args[@]}"
EOF
  chmod +x "$WRAP/cxx17"
  echo "install-horovod: building horovod==$VERSION against torch $TORCH (~3 min)"
  PATH="$(dirname "$(command -v cmake || echo "$VENV/bin/cmake")"):$VENV/bin:$PATH" \
  HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
  HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 MAKEFLAGS=-j2 CXX="$WRAP/cxx17" \
    "$VENV/bin/pip" wheel --quiet --disable-pip-version-check --no-build-isolation --no-deps \
    --no-cache-dir --wheel-dir "$WHEELS" "horovod==$VERSION"
fi
# Horovod's own requirements (the same ranges as distq's [horovod] extra), then the wheel with
# --no-deps, so pip never resolves anything against torch here.
"$VENV/bin/pip" install --quiet --disable-pip-version-check 'cloudpickle>=2,<4' 'psutil>=5,<8' \
  'packaging>=21' 'pyyaml>=6,<7' "torch==$TORCH"
"$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps "$WHEELS"/horovod-*.whl
"$PY" -c 'import horovod.torch' || { echo "install-horovod: import failed" >&2; exit 1; }
