# shellcheck shell=bash
# Sourced, not run: puts the project's tools first on PATH (nats-server,
# weed) and tells the tests which nats-server and weed to use. Safe to source more than once.
#   source scripts/env.sh

PRESENCED_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
case ":$PATH:" in
*":$PRESENCED_ROOT/.tools/bin:"*) ;;
*) PATH="$PRESENCED_ROOT/.tools/bin:$PATH" ;;
esac
export PATH
if [ -x "$PRESENCED_ROOT/.tools/bin/nats-server" ]; then
    NATS_SERVER="$PRESENCED_ROOT/.tools/bin/nats-server"
else
    NATS_SERVER="$(command -v nats-server || true)"
fi
export NATS_SERVER
# SeaweedFS (S3 for the archive tests): the tests read WEED, else PATH.
if [ -x "$PRESENCED_ROOT/.tools/bin/weed" ]; then
    export WEED="$PRESENCED_ROOT/.tools/bin/weed"
fi
# Debian keeps the broker in /usr/sbin, which is not on every user's PATH.
if ! command -v mosquitto >/dev/null 2>&1 && [ -x /usr/sbin/mosquitto ]; then
    export MOSQUITTO=/usr/sbin/mosquitto
fi
export PRESENCED_ROOT
