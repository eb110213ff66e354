#!/usr/bin/env bash
# Install ncd from a checkout into the current Python, keeping the Ray version already
# installed (the cluster image's), for cluster/Dockerfile and the launcher's setup_commands.
#
#   cluster/install_ncd.sh <checkout> [extras, e.g. gpu] [extra index URL, e.g. PyTorch CPU wheels]
#
# With the gpu extra, the CUDA FAISS wheel(s) it names are reinstalled last in place of
# faiss-cpu: both ship the same `faiss` package, so whichever is installed last wins.
set -euo pipefail
SRC="${1:-.}"
EXTRAS="${2:-}"
INDEX="${3:-}"

pins=()
if RAY_VERSION="$(python -c 'import ray; print(ray.__version__)' 2>/dev/null)"; then
  pins+=("ray[data,train,tune,default]==${RAY_VERSION}")
fi
args=()
if [ -n "${INDEX}" ]; then args+=(--extra-index-url "${INDEX}"); fi
spec="${SRC}"
if [ -n "${EXTRAS}" ]; then spec="${SRC}[${EXTRAS}]"; fi

python -m pip install --no-cache-dir "${args[@]}" "${spec}" "${pins[@]}"

if [[ ",${EXTRAS}," == *",gpu,"* ]]; then
  mapfile -t gpu_pkgs < <(python - "${SRC}/pyproject.toml" <<'PY'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    print("\n".join(tomllib.load(f)["project"]["optional-dependencies"]["gpu"]))
PY
)
  python -m pip uninstall -y faiss-cpu
  python -m pip install --no-cache-dir --force-reinstall --no-deps "${gpu_pkgs[@]}"
fi
python -c "import faiss, ncd, ray_jobs.cli; print('ncd installed; faiss', faiss.__version__)"
