#!/usr/bin/env bash
# Install everything the tests need, then run the whole suite (unit, FiftyOne, napari, Label Studio).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --test
export PROMPTSEG_LABEL_STUDIO="$PWD/.venv-labelstudio/bin/label-studio"
export QT_QPA_PLATFORM=${QT_QPA_PLATFORM:-xcb}
exec xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python -m pytest "$@"
