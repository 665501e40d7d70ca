#!/usr/bin/env bash
# presenced's Home Assistant discovery against a real Home Assistant Core
# (tests/homeassistant_real.rs): entity ids, state, attributes and
# availability as Home Assistant itself shows them. Separate from the
# default test run because of the install (scripts/setup-ha.sh);
# scripts/test.sh runs it too.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup-ha.sh
# shellcheck source=scripts/env.sh
source scripts/env.sh
cargo nextest run --features real-ha --test homeassistant_real
