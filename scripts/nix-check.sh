#!/usr/bin/env bash
# Checks the Nix side of the repository without nixpkgs, a binary cache or
# the network beyond package registries:
#   1. installs Nix (Debian's nix-bin) if nix-instantiate is missing,
#   2. parses every .nix file,
#   3. checks formatting with nixfmt (RFC 166 style) if it is installed or
#      can be installed (cargo package nixfmt_rs); NIXFMT_INSTALL=0 skips
#      the install,
#   4. runs the evaluation tests in nix/tests/eval against nixpkgs' lib:
#      NIXPKGS_LIB (a checkout of nixpkgs or of nixpkgs.lib, or its lib/),
#      else the lib of the NixOS subset (below),
#   5. the render tests (nix/tests/real): every host, VM test node and
#      container evaluated against the real NixOS declarations of the NixOS
#      subset (../shared/nixos-subset from the checkout, or NIXOS_SUBSET)
#      and built with the local Nix, running every build step the modules
#      define with target/debug/presenced and the nats-server of the tools cache;
#      then `systemd-analyze verify` on every rendered unit and
#      `systemd-analyze security --offline=yes` on every presenced unit,
#      failing above an exposure of 2.0. The units are kept in
#      target/nix-render/units,
#   6. the systemd-nspawn boot test (scripts/nspawn-test.sh) on those
#      units, unless NSPAWN=0.
# Without the subset, steps 5 and 6 cannot run: said loudly, and a failure
# when CI=true.
#
# Usage: [NIXPKGS_LIB=DIR] [NIXOS_SUBSET=DIR] [NIXFMT_INSTALL=0] [NSPAWN=0]
#        scripts/nix-check.sh
# Exit status: 0 when every step that ran passed.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

say() { printf 'nix-check: %s\n' "$*"; }

# The evaluator never needs to build or fetch anything here.
nix_eval() { nix-instantiate --store dummy:// "$@"; }

# 1. Nix
if ! command -v nix-instantiate >/dev/null 2>&1; then
    say "installing nix-bin"
    sudo=""
    if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq nix-bin >/dev/null
fi
say "$(nix-instantiate --version)"

# Every .nix file of the work tree, tracked or new, but not ignored.
mapfile -t files < <(git ls-files --cached --others --exclude-standard -- '*.nix' | sort -u)
if [ "${#files[@]}" -eq 0 ]; then
    say "no .nix files found"
    exit 1
fi

failed=0
passed=0

# 2. Parse
parse_failed=0
for f in "${files[@]}"; do
    if ! nix_eval --parse "$f" >/dev/null; then
        say "parse error in $f"
        parse_failed=1
    fi
done
if [ "$parse_failed" = 0 ]; then
    say "parsed ${#files[@]} files"
    passed=$((passed + 1))
else
    failed=$((failed + 1))
fi

# 3. Format
if ! command -v nixfmt >/dev/null 2>&1 && [ "${NIXFMT_INSTALL:-1}" != 0 ] \
    && command -v cargo >/dev/null 2>&1; then
    say "installing nixfmt (cargo package nixfmt_rs)"
    cargo install --quiet --locked nixfmt_rs --version 0.5.3 || say "nixfmt could not be installed"
    export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
fi
if command -v nixfmt >/dev/null 2>&1; then
    if nixfmt --check "${files[@]}"; then
        say "nixfmt: all files formatted"
        passed=$((passed + 1))
    else
        say "nixfmt: files above need formatting (run: nixfmt FILE...)"
        failed=$((failed + 1))
    fi
else
    say "nixfmt not available: format check skipped"
fi

subset="${NIXOS_SUBSET:-$root/../shared/nixos-subset}"
if [ -d "$subset/nixos" ] && [ -d "$subset/nixpkgs-lib/lib" ]; then
    subset="$(cd "$subset" && pwd)"
else
    subset=""
fi

# 4. Evaluation tests
if [ -z "${NIXPKGS_LIB:-}" ] && [ -n "$subset" ]; then
    NIXPKGS_LIB="$subset/nixpkgs-lib"
fi
if [ -n "${NIXPKGS_LIB:-}" ]; then
    lib="$NIXPKGS_LIB"
    if [ -f "$lib/lib/default.nix" ]; then lib="$lib/lib"; fi
    if [ ! -f "$lib/default.nix" ]; then
        say "NIXPKGS_LIB=$NIXPKGS_LIB holds no nixpkgs lib (no default.nix)"
        exit 1
    fi
    lib="$(cd "$lib" && pwd)"
    if result="$(nix_eval --eval --strict --json \
        -E "import $root/nix/tests/eval { lib = import $lib; }")"; then
        count="$(printf '%s' "$result" | jq '.count')"
        nfail="$(printf '%s' "$result" | jq '.failures | length')"
        if [ "$nfail" = 0 ]; then
            say "evaluation tests: $count passed"
        else
            say "evaluation tests: $nfail of $count failed:"
            printf '%s' "$result" | jq '.failures'
        fi
        passed=$((passed + count - nfail))
        failed=$((failed + nfail))
    else
        say "evaluation tests could not be evaluated"
        failed=$((failed + 1))
    fi
else
    say "NIXPKGS_LIB not set: evaluation tests skipped (nix flake check runs them)"
fi

# 5. Render tests against the NixOS subset
if [ -z "$subset" ]; then
    say "!!! NixOS subset not found at ${NIXOS_SUBSET:-../shared/nixos-subset}:"
    say "!!! render tests, systemd-analyze and the nspawn boot test NOT run"
    if [ "${CI:-}" = true ]; then
        failed=$((failed + 1))
    fi
else
    if bash scripts/nix-render.sh "$subset"; then
        passed=$((passed + 1))
        # 6. The rendered units under a real systemd
        if [ "${NSPAWN:-1}" = 0 ]; then
            say "NSPAWN=0: nspawn boot test not run"
        elif bash scripts/nspawn-test.sh target/nix-render/units; then
            passed=$((passed + 1))
        else
            say "nspawn boot test failed"
            failed=$((failed + 1))
        fi
    else
        say "render tests failed"
        failed=$((failed + 1))
    fi
fi

echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
