#!/usr/bin/env bash
# The one test command: tools, formatting, lints, every test target against
# real servers, doc tests. Runs every step, then exits non-zero if any failed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh
# shellcheck source=scripts/env.sh
source scripts/env.sh

failed=()
step() {
    local name="$1"
    shift
    local started=$SECONDS
    printf '\n==> %s: %s\n' "$name" "$*"
    if "$@"; then
        printf '==> %s: ok (%d s)\n' "$name" "$((SECONDS - started))"
    else
        printf '==> %s: FAILED (%d s)\n' "$name" "$((SECONDS - started))"
        failed+=("$name")
    fi
}

step fmt cargo fmt --all --check
step clippy cargo clippy --workspace --all-targets -- -D warnings
# Benchmarks are compiled by clippy above and run on demand only
# (cargo bench --bench e2e); they are not tests.
# Built first on its own, so its time (the cold test build on a fresh
# clone) shows apart from the run's.
step build cargo nextest run --workspace --lib --bins --tests --no-run
step tests cargo nextest run --workspace --lib --bins --tests --no-fail-fast
step nix bash scripts/nix-check.sh
step doctests cargo test --workspace --doc

if [ "${#failed[@]}" -gt 0 ]; then
    printf '\ntest.sh: failed: %s\n' "${failed[*]}" >&2
    exit 1
fi
printf '\ntest.sh: all steps passed (%d s)\n' "$SECONDS"
