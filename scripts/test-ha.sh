#!/usr/bin/env bash
# presenced's Home Assistant discovery against a real Home Assistant Core
# (tests/it/homeassistant_real.rs): entity ids, state, attributes and
# availability as Home Assistant itself shows them. Part of scripts/test.sh's
# one test run; this runs it alone (installing Home Assistant first).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup-ha.sh
# shellcheck source=scripts/env.sh
source scripts/env.sh
cargo nextest run --test it homeassistant_real::
