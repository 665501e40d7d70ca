# shellcheck shell=bash
# Sourced, not run: puts the project's tools first on PATH (nats-server,
# weed) and tells the tests which nats-server, weed and Home Assistant to use. Safe to source more than once.
#   source scripts/env.sh

PRESENCED_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The tools cache scripts/setup.sh fills (outside the checkout).
PRESENCED_TOOLS="${PRESENCED_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/presenced/tools}"
export PRESENCED_TOOLS
case ":$PATH:" in
*":$PRESENCED_TOOLS/bin:"*) ;;
*) PATH="$PRESENCED_TOOLS/bin:$PATH" ;;
esac
export PATH
if [ -x "$PRESENCED_TOOLS/bin/nats-server" ]; then
    NATS_SERVER="$PRESENCED_TOOLS/bin/nats-server"
else
    NATS_SERVER="$(command -v nats-server || true)"
fi
export NATS_SERVER
# SeaweedFS (S3 for the archive tests): the tests read WEED, else PATH.
if [ -x "$PRESENCED_TOOLS/bin/weed" ]; then
    export WEED="$PRESENCED_TOOLS/bin/weed"
fi
# Debian keeps the broker in /usr/sbin, which is not on every user's PATH.
if ! command -v mosquitto >/dev/null 2>&1 && [ -x /usr/sbin/mosquitto ]; then
    export MOSQUITTO=/usr/sbin/mosquitto
fi
# Headless Chromium for tests/it/page.rs (Debian's chromium, chromium-driver):
# the tests read CHROMIUM and CHROMEDRIVER, else PATH.
if [ -z "${CHROMEDRIVER:-}" ] && [ -x /usr/bin/chromedriver ]; then
    export CHROMEDRIVER=/usr/bin/chromedriver
fi
if [ -z "${CHROMIUM:-}" ] && [ -x /usr/bin/chromium ]; then
    export CHROMIUM=/usr/bin/chromium
fi
# Home Assistant Core for tests/it/homeassistant_real.rs (scripts/setup-ha.sh).
export PRESENCED_HA_PYTHON="$PRESENCED_TOOLS/ha/bin/python"
export PRESENCED_ROOT
