#!/usr/bin/env bash
# Set up a fresh machine: Debian's Fashion-MNIST (the embedded default data set), a virtual
# environment in .venv, and this project pinned to the tested torch/timm/Ray/Optuna/MLflow set.
#   ./install.sh        # to run the sweeps
#   ./install.sh test   # plus the test dependencies
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get install -y dataset-fashion-mnist || { $SUDO apt-get update && $SUDO apt-get install -y dataset-fashion-mnist; }
fi

extras=""; [ "${1:-}" = "test" ] && extras="[test]"
# The slow tests open MLflow's UI and Optuna's dashboard in headless Chromium (Debian's package).
if [ "${1:-}" = "test" ] && ! command -v chromium >/dev/null; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get install -y chromium || { $SUDO apt-get update && $SUDO apt-get install -y chromium; }
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
# constraints.txt pins torch/torchvision (a bare `torch` would pull the newest CUDA build) and the
# rest of the tested set; pyproject.toml itself stays loose for GPU users.
.venv/bin/pip install --quiet --disable-pip-version-check -c constraints.txt -e ".${extras}" 2>&1 \
  | grep -v "is ignored: it is neither a file nor a directory" || true
.venv/bin/python -c "import torch, timm, ray, optuna, mlflow, sit_core; print(f'ready: torch {torch.__version__}, timm {timm.__version__}, ray {ray.__version__}, optuna {optuna.__version__}, mlflow {mlflow.__version__}')"
