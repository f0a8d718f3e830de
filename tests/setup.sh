#!/usr/bin/env bash
# Installs everything resnode, its tests and its book need, on a fresh machine; safe to run again.
# Fashion-MNIST comes from Debian's dataset-fashion-mnist when apt is there and we are root; it is
# optional (only the image chapters read it) and every loader says how to get it when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -r requirements.txt
python3 -m pip install --quiet --disable-pip-version-check --no-deps -e .
python3 -m ipykernel install --user --name python3 --display-name "Python 3" >/dev/null
command -v "${CC:-cc}" >/dev/null \
  || echo "setup: no C compiler (cc): resnode's engine will run its depth loops through torch, about 3x slower" >&2
fashion=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -f "$fashion" ] && [ -z "${RESNODE_FASHION_MNIST:-}" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
      || echo "setup: could not install dataset-fashion-mnist; chapters that need Fashion-MNIST will say so" >&2
  else
    echo "setup: Fashion-MNIST not installed (optional): apt-get install dataset-fashion-mnist as root," \
         "or set RESNODE_FASHION_MNIST to a folder holding its IDX files" >&2
  fi
fi
