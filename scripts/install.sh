#!/usr/bin/env bash
# Install promptseg into ./.venv on a fresh machine (Python >= 3.11, pip).
#   bash scripts/install.sh              # the package with every adapter
#   bash scripts/install.sh napari       # only what one host needs: fiftyone, napari, labelstudio, app
#                                        # (comma-separated for several, e.g. fiftyone,app)
#   bash scripts/install.sh --test       # plus test tools, Xvfb and a Label Studio server in ./.venv-labelstudio
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# torch/torchvision pins that work on the CPU-only machines we test on; harmless elsewhere
CONSTRAINTS=.ci/constraints.txt

EXTRAS=${1:-all}
if [ "$EXTRAS" != "--test" ]; then
    for extra in ${EXTRAS//,/ }; do
        case "$extra" in
            all|fiftyone|napari|labelstudio|app|video|meta|ray|s3) ;;
            *) echo "install.sh: unknown extra '$extra'; use all, fiftyone, napari, labelstudio, app, video, meta, ray or s3" >&2; exit 2 ;;
        esac
    done
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
if [ "$EXTRAS" = "--test" ]; then
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
    case ",$EXTRAS," in
        # FiftyOne's database wheel (see .ci/platform-requirements.txt) only where FiftyOne is installed
        *,all,*|*,fiftyone,*) PLATFORM=(-r .ci/platform-requirements.txt) ;;
        *) PLATFORM=() ;;
    esac
    .venv/bin/python -m pip install --quiet -c "$CONSTRAINTS" -e ".[$EXTRAS]" "${PLATFORM[@]}"
fi
echo "promptseg installed in .venv ($(.venv/bin/promptseg --help >/dev/null && echo ok))"
