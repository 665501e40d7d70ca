#!/usr/bin/env bash
# The one demo command: a leaf nats-server (JetStream domain leaf-demo), a
# Mosquitto broker, presenced, and a simulated pair of motion sensors, all
# on loopback and all under .sandbox/. Ctrl-C stops everything.
#
#   scripts/demo.sh          keep JetStream data from the previous run
#   scripts/demo.sh --fresh  start from empty state
#   scripts/demo.sh --debug  use a debug build (quicker to build)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SANDBOX="$ROOT/.sandbox"
LOGS="$SANDBOX/logs"
TEMPLATE="$ROOT/examples/demo.toml"
CFG="$SANDBOX/presenced.toml"

say() { printf 'demo: %s\n' "$*"; }
die() {
    printf 'demo: error: %s\n' "$*" >&2
    exit 1
}

fresh=0
profile=release
for arg in "$@"; do
    case "$arg" in
    --fresh) fresh=1 ;;
    --debug) profile=debug ;;
    -h | --help)
        sed -n '2,9p' "${BASH_SOURCE[0]}"
        exit 0
        ;;
    *) die "unknown argument: $arg" ;;
    esac
done

[ -f "$TEMPLATE" ] || die "examples/demo.toml is missing"

bash scripts/setup.sh
# shellcheck source=scripts/env.sh
source scripts/env.sh
NATS_BIN="${NATS_SERVER:-nats-server}"
MOSQUITTO_BIN="${MOSQUITTO:-$(command -v mosquitto || echo /usr/sbin/mosquitto)}"

say "building presenced ($profile)"
if [ "$profile" = release ]; then
    cargo build --release --quiet
else
    cargo build --quiet
fi
PRESENCED="$ROOT/target/$profile/presenced"

# True if something accepts TCP connections on 127.0.0.1:$1.
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# The conventional port if it is free, else any free one: the demo never
# fights a broker or server already running on this machine.
pick_port() {
    if port_busy "$1"; then free_port; else echo "$1"; fi
}

# True if GET $2 on 127.0.0.1:$1 answers 200.
# shellcheck disable=SC2317 # called through wait_for
http_ok() {
    (
        exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
        printf 'GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' "$2" >&3
        IFS= read -r status <&3 || exit 1
        [[ "$status" == *" 200 "* ]]
    ) 2>/dev/null
}

# wait_for WHAT LOG COMMAND...: polls COMMAND for up to 10 s.
wait_for() {
    local what="$1" log="$2"
    shift 2
    local tries=0
    until "$@"; do
        tries=$((tries + 1))
        if [ "$tries" -ge 100 ]; then
            printf 'demo: %s did not come up; last lines of %s:\n' "$what" "$log" >&2
            tail -n 20 "$log" >&2 || true
            exit 1
        fi
        sleep 0.1
    done
}

pids=()
# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
    trap - EXIT INT TERM
    say "stopping"
    local pid
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

[ "$fresh" -eq 1 ] && rm -rf "$SANDBOX"
mkdir -p "$LOGS" "$SANDBOX/nats" "$SANDBOX/mosquitto"

NATS_PORT="$(pick_port 4222)"
NATS_MONITOR="$(pick_port 8222)"
MQTT_PORT="$(pick_port 1883)"
HTTP_PORT="$(pick_port 9464)"

cat >"$SANDBOX/nats/nats-server.conf" <<CONF
server_name: "leaf-demo"
listen: "127.0.0.1:$NATS_PORT"
http: "127.0.0.1:$NATS_MONITOR"
log_file: "$LOGS/nats-server.log"
jetstream {
  store_dir: "$SANDBOX/nats/jetstream"
  domain: "leaf-demo"
}
CONF

# Started as root, Mosquitto would switch to user mosquitto, who cannot
# write under .sandbox; "user root" keeps it as the caller.
{
    echo "listener $MQTT_PORT 127.0.0.1"
    echo "allow_anonymous true"
    echo "max_queued_messages 0"
    echo "max_inflight_messages 1000"
    echo "persistence false"
    echo "pid_file $SANDBOX/mosquitto/mosquitto.pid"
    echo "log_dest file $LOGS/mosquitto.log"
    if [ "$(id -u)" -eq 0 ]; then echo "user root"; fi
} >"$SANDBOX/mosquitto/mosquitto.conf"

# The example config with this run's ports.
sed -e "s#127\.0\.0\.1:4222#127.0.0.1:$NATS_PORT#g" \
    -e "s#^\([[:space:]]*port[[:space:]]*=[[:space:]]*\)1883#\1$MQTT_PORT#" \
    -e "s#127\.0\.0\.1:9464#127.0.0.1:$HTTP_PORT#g" \
    "$TEMPLATE" >"$CFG"

say "starting nats-server on 127.0.0.1:$NATS_PORT (JetStream domain leaf-demo)"
"$NATS_BIN" -c "$SANDBOX/nats/nats-server.conf" >/dev/null 2>&1 &
pids+=("$!")
wait_for nats-server "$LOGS/nats-server.log" http_ok "$NATS_MONITOR" '/healthz?js-enabled-only=true'

say "starting mosquitto on 127.0.0.1:$MQTT_PORT"
"$MOSQUITTO_BIN" -c "$SANDBOX/mosquitto/mosquitto.conf" >/dev/null 2>&1 &
pids+=("$!")
wait_for mosquitto "$LOGS/mosquitto.log" port_busy "$MQTT_PORT"

say "provisioning streams and buckets"
"$PRESENCED" provision --config "$CFG" >"$LOGS/provision.log" 2>&1 ||
    {
        cat "$LOGS/provision.log" >&2
        die "presenced provision failed"
    }

say "starting presenced"
RUST_LOG="${RUST_LOG:-info,presenced=debug}" "$PRESENCED" run --config "$CFG" >"$LOGS/presenced.log" 2>&1 &
daemon_pid="$!"
pids+=("$daemon_pid")

# Two motion sensors: a random zone reports motion or its end every 1-4 s,
# motion more often than not, so zones arrive, stay and leave.
simulate() {
    local zones=(hall kitchen) zone occupancy nap=""
    # Sleep in the background and wait, so SIGTERM ends the loop at once.
    trap '[ -n "$nap" ] && kill "$nap" 2>/dev/null; exit 0' TERM
    while true; do
        zone="${zones[RANDOM % 2]}"
        if ((RANDOM % 3)); then occupancy=true; else occupancy=false; fi
        mosquitto_pub -h 127.0.0.1 -p "$MQTT_PORT" -q 1 \
            -t "demo/$zone/motion" -m "{\"occupancy\":$occupancy}" ||
            echo "mosquitto_pub failed for demo/$zone/motion"
        echo "$(date +%T) demo/$zone/motion occupancy=$occupancy"
        sleep "$((1 + RANDOM % 4))" &
        nap="$!"
        wait "$nap" || true
    done
}
simulate >"$LOGS/simulator.log" 2>&1 &
pids+=("$!")

cat <<INFO

demo: running. Watch zones change, in another terminal:
  $PRESENCED watch --config $CFG
demo: logs: $LOGS/{presenced,nats-server,mosquitto,simulator,provision}.log
demo: nats  nats://127.0.0.1:$NATS_PORT (monitor http://127.0.0.1:$NATS_MONITOR)
demo: mqtt  127.0.0.1:$MQTT_PORT    http http://127.0.0.1:$HTTP_PORT/healthz
demo: Ctrl-C stops everything.

INFO

status=0
wait "$daemon_pid" || status=$?
say "presenced exited with status $status; last lines of its log:"
tail -n 20 "$LOGS/presenced.log" >&2 || true
exit "$status"
