#!/usr/bin/env bash
# The one demo command: installs what is missing (scripts/setup.sh), builds
# presenced and runs `presenced sandbox`: a 3-node hub, a leaf nats-server
# and the daemon per site, and simulated people whose sensors publish over
# MQTT, all on loopback, state and logs under .sandbox/. Ctrl-C stops
# everything.
#
#   scripts/demo.sh                 one site
#   scripts/demo.sh --sites 3       three sites mirrored to the hub
#   scripts/demo.sh --fresh         start from empty state
#   scripts/demo.sh --debug ...     use a debug build (quicker to build)
#
# Every other argument goes to `presenced sandbox` (see its --help).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

profile=release
args=()
for arg in "$@"; do
    case "$arg" in
    --debug) profile=debug ;;
    -h | --help)
        sed -n '2,13p' "${BASH_SOURCE[0]}"
        exit 0
        ;;
    *) args+=("$arg") ;;
    esac
done

bash scripts/setup.sh
# shellcheck source=scripts/env.sh
source scripts/env.sh

# The release profile is the quick optimised build (no fat LTO: that is
# the `dist` profile the Nix package ships). Cargo's own progress shows;
# a first build fetches and compiles every dependency.
if [ -x "target/$profile/presenced" ]; then
    printf 'demo: updating the %s build of presenced\n' "$profile"
else
    printf 'demo: building presenced (%s profile), a few minutes the first time\n' "$profile"
fi
if [ "$profile" = release ]; then
    cargo build --release --bin presenced
else
    cargo build --bin presenced
fi

exec "$ROOT/target/$profile/presenced" sandbox --dir "$ROOT/.sandbox" "${args[@]}"
