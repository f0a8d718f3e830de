#!/usr/bin/env bash
# Installs everything resnode, its tests and its book need, on a fresh machine; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -r requirements.txt
python3 -m pip install --quiet --disable-pip-version-check --no-deps -e .
python3 -m ipykernel install --user --name python3 --display-name "Python 3" >/dev/null
# MathJax, served by the book itself so that its maths renders offline (pinned; _config.yml's mathjax_path).
mathjax_version=3.2.2
if [ ! -f "_mathjax/mathjax/tex-chtml.js" ] || [ "$(cat _mathjax/mathjax/VERSION 2>/dev/null)" != "$mathjax_version" ]; then
  if command -v npm >/dev/null; then
    tmp=$(mktemp -d)
    (cd "$tmp" && npm pack --silent "mathjax@$mathjax_version" >/dev/null && tar xzf "mathjax-$mathjax_version.tgz")
    rm -rf _mathjax/mathjax && mkdir -p _mathjax/mathjax
    cp -r "$tmp"/package/es5/{tex-chtml.js,input,output,a11y,ui,sre} _mathjax/mathjax/
    echo "$mathjax_version" > _mathjax/mathjax/VERSION
    rm -rf "$tmp"
  else
    echo "setup: npm not found, so MathJax $mathjax_version is not in _mathjax/mathjax: the book's maths will not render" \
         "(install Node.js/npm and run this again)" >&2
  fi
fi
command -v "${CC:-cc}" >/dev/null \
  || echo "setup: no C compiler (cc): resnode's engine will run its depth loops through torch, about 3x slower" >&2
# Debian packages, when apt is there and we are root: Fashion-MNIST (optional: only the image chapters read it,
# and every loader says how to get it when it is missing), and Chromium with its driver for the browser test of
# the built book (which skips, saying why, without them).
packages=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || [ -n "${RESNODE_FASHION_MNIST:-}" ] \
  || packages+=(dataset-fashion-mnist)
command -v chromium >/dev/null && command -v chromedriver >/dev/null || packages+=(chromium chromium-driver)
if [ ${#packages[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >/dev/null) \
      || echo "setup: could not install ${packages[*]}; the chapters and tests that need them will say so" >&2
  else
    echo "setup: not installed (optional): ${packages[*]}; as root: apt-get install ${packages[*]}" \
         "(or set RESNODE_FASHION_MNIST to a folder holding Fashion-MNIST's IDX files)" >&2
  fi
fi
