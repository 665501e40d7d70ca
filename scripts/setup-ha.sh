#!/usr/bin/env bash
# Installs a real Home Assistant Core for tests/it/homeassistant_real.rs into
# the tools cache (<tools>/ha, a Python virtualenv; see setup.sh), idempotently. Kept apart from setup.sh:
# it is a ~400 MB install that takes about five minutes the first time.
#
# Pinned: Home Assistant 2024.3.3 (the newest line that runs on Python
# 3.11), the MQTT integration's paho-mqtt and file_upload's janus (Home
# Assistant installs integration requirements at run time; the test runs
# it with --skip-pip semantics, so they are installed here).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PRESENCED_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/presenced/tools}/ha"
HA_VERSION=2024.3.3
PACKAGES=("homeassistant==$HA_VERSION" "paho-mqtt==1.6.1" "janus==1.0.0")

say() { printf 'setup-ha: %s\n' "$*"; }

PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info[:2] in ((3, 11), (3, 12)) else 1)'; then
    say "error: Home Assistant $HA_VERSION needs Python 3.11 or 3.12 ($PYTHON is $("$PYTHON" --version 2>&1))" >&2
    exit 1
fi
if [ -x "$VENV/bin/python" ] &&
    "$VENV/bin/python" -c "import homeassistant.const as c, paho.mqtt, janus; import sys; sys.exit(0 if c.__version__ == '$HA_VERSION' else 1)" 2>/dev/null; then
    say "Home Assistant $HA_VERSION in $VENV (kept)"
    exit 0
fi
start=$(date +%s)
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check "${PACKAGES[@]}"
say "Home Assistant $HA_VERSION installed in $VENV in $(($(date +%s) - start)) s"
