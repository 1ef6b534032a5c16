#!/usr/bin/env bash
# Install promptseg into ./.venv on a fresh machine (Python >= 3.11, pip).
#   bash scripts/install.sh          # the package with every adapter
#   bash scripts/install.sh --test   # plus test tools, Xvfb and a Label Studio server in ./.venv-labelstudio
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# torch/torchvision pins that work on the CPU-only machines we test on; harmless elsewhere
CONSTRAINTS=.ci/constraints.txt

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
if [ "${1:-}" = "--test" ]; then
    .venv/bin/python -m pip install --quiet -c "$CONSTRAINTS" -e ".[test]" -r .ci/platform-requirements.txt
    # GUI tests need a real X server for napari's GL canvas, and the libraries Qt's xcb plugin loads;
    # FiftyOne reads video samples with ffmpeg/ffprobe (its apply_model opens each video itself);
    # the quick-try page's tests drive Debian's Chromium headless
    APT_PACKAGES="ffmpeg chromium xvfb libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 libxcb-image0 libxcb-render-util0
        libxkbcommon-x11-0 libxcb-randr0 libxcb-shape0 libxcb-xkb1 libxcb-xfixes0 libxcb-cursor0 libgl1
        libegl1 libfontconfig1 libdbus-1-3"
    MISSING=$(for p in $APT_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
    if [ -n "$MISSING" ]; then
        SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
        $SUDO apt-get update -qq && $SUDO apt-get install -y -qq $MISSING >/dev/null
    fi
    # Label Studio pins Django and friends: it gets its own environment, used only as a server
    [ -x .venv-labelstudio/bin/python ] || "$PYTHON" -m venv .venv-labelstudio
    .venv-labelstudio/bin/python -m pip install --quiet --upgrade pip
    .venv-labelstudio/bin/python -m pip install --quiet "label-studio==1.23.2"
else
    .venv/bin/python -m pip install --quiet -c "$CONSTRAINTS" -e ".[all]" -r .ci/platform-requirements.txt
fi
echo "promptseg installed in .venv ($(.venv/bin/promptseg --help >/dev/null && echo ok))"
