#!/usr/bin/env bash
# Checks the Nix side of the repository without nixpkgs, a binary cache or
# the network beyond package registries:
#   1. installs Nix (Debian's nix-bin) if nix-instantiate is missing,
#   2. parses every .nix file,
#   3. checks formatting with nixfmt (RFC 166 style) if it is installed or
#      can be installed (cargo package nixfmt_rs); NIXFMT_INSTALL=0 skips
#      the install,
#   4. runs the evaluation tests in nix/tests/eval against nixpkgs' lib
#      when NIXPKGS_LIB names a copy of it (a checkout of nixpkgs or of
#      nixpkgs.lib, or its lib/ directory); skipped otherwise, since
#      `nix flake check` runs them with the pinned nixpkgs.
#
# Usage: [NIXPKGS_LIB=DIR] [NIXFMT_INSTALL=0] scripts/nix-check.sh
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

# 4. Evaluation tests
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

echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
