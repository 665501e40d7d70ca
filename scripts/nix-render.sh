#!/usr/bin/env bash
# The render tests (nix/tests/real): builds every host, VM test node and
# container of the repository against the real NixOS declarations of the
# NixOS subset, with the local Nix and the binaries of this checkout
# (target/debug/presenced, the nats-server of the tools cache, the system's
# Mosquitto). Every build step the modules define runs: check-config,
# presenced acl/acl-hub, nats-server -t. Then:
#   - systemd-analyze verify on every rendered unit (any complaint fails),
#   - systemd-analyze security --offline=yes on every presenced unit,
#     failing above an exposure of 2.0; the others are listed.
# The units stay in target/nix-render/units/<system>/ (a GC root).
#
# Usage: scripts/nix-render.sh SUBSET_DIR
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
subset="$1"
say() { printf 'nix-render: %s\n' "$*"; }
threshold=20 # systemd-analyze's scale: 2.0 is 20

command -v nix-build >/dev/null || { say "nix-build missing"; exit 1; }
command -v systemd-analyze >/dev/null || { say "systemd-analyze missing (apt: systemd)"; exit 1; }

# shellcheck source=scripts/env.sh
[ -f scripts/env.sh ] && source scripts/env.sh >/dev/null
# PRESENCED names another build to render and check with.
presenced="${PRESENCED:-target/debug/presenced}"
if [ -z "${PRESENCED:-}" ] && [ ! -x "$presenced" ]; then
    say "building target/debug/presenced"
    cargo build --quiet --bin presenced
fi
presenced="$(readlink -f "$presenced")"

# The nspawn system's identities, made once: seeds stay here, outside the
# store; the public keys go into its authorization block.
keys="$root/target/nix-render/keys"
mkdir -p "$keys"
chmod 0700 "$keys"
for service in admin ingest engine leaf; do
    if [ ! -f "$keys/$service.nk.pub" ]; then
        rm -f "$keys/$service.nk"
        "$presenced" keygen --out "$keys/$service.nk" "$service" >"$keys/$service.nk.pub"
    fi
done
nats="$(command -v nats-server || true)"
[ -n "$nats" ] || { say "nats-server not on PATH (source scripts/env.sh)"; exit 1; }
mosquitto="$(command -v mosquitto || echo /usr/sbin/mosquitto)"
[ -x "$mosquitto" ] || { say "mosquitto missing"; exit 1; }
mosquitto_passwd="$(command -v mosquitto_passwd || echo /usr/bin/mosquitto_passwd)"
weed="$(command -v weed || true)"
[ -n "$weed" ] || { say "weed not on PATH (source scripts/env.sh)"; exit 1; }

# The tools cache may sit in a home directory that Nix's build users (and
# the nspawn machine's service users) cannot enter: the store's packages
# link to copies inside the checkout instead.
copies="$root/target/nix-render/tools"
mkdir -p "$copies"
copy_tool() {
    local src dst
    src="$(readlink -f "$1")"
    dst="$copies/$(basename "$1")"
    cmp -s "$src" "$dst" 2>/dev/null || install -m 0755 "$src" "$dst"
    printf '%s\n' "$dst"
}
nats="$(copy_tool "$nats")"
weed="$(copy_tool "$weed")"

start=$SECONDS
mkdir -p target/nix-render
# The store here has no binary cache to ask: nothing is substituted.
if ! nix-build --option substituters "" --keep-going \
    -o target/nix-render/units nix/tests/real \
    --arg subset "$subset" \
    --argstr presenced "$presenced" \
    --argstr nspawnKeys "$keys" \
    --argstr natsServer "$nats" \
    --argstr mosquitto "$(readlink -f "$mosquitto")" \
    --argstr mosquittoPasswd "$(readlink -f "$mosquitto_passwd")" \
    --argstr weed "$weed" \
    >target/nix-render/build.log 2>&1; then
    grep -v '^building \|^  /nix/store\|^these .* will be built' target/nix-render/build.log | tail -40
    say "build of the rendered systems failed (log: target/nix-render/build.log)"
    exit 1
fi
units=target/nix-render/units
systems=("$units"/*/)
say "built ${#systems[@]} systems in $((SECONDS - start)) s"
if [ -s "$units/WARNINGS" ]; then
    say "evaluation warnings:"
    sed 's/^/  /' "$units/WARNINGS"
fi

fail=0
nunits=0
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
for dir in "${systems[@]}"; do
    system="$(basename "$dir")"
    # A copy, so the units see each other (After=, Wants=) as on the host.
    rm -rf "$tmp/u" && mkdir "$tmp/u" && cp "$dir"/* "$tmp/u/" 2>/dev/null || continue
    chmod u+w "$tmp/u"/*
    for unit in "$tmp/u"/*.service; do
        nunits=$((nunits + 1))
        name="$(basename "$unit")"
        if ! out="$(cd "$tmp/u" && SYSTEMD_LOG_LEVEL=notice systemd-analyze verify --man=no \
            --recursive-errors=no "./$name" 2>&1)" || [ -n "$out" ]; then
            say "verify $system/$name:"
            printf '%s\n' "$out" | sed 's/^/  /'
            fail=1
        fi
        case "$name" in
        presenced-*)
            exposure="$(systemd-analyze security --offline=yes "$unit" 2>/dev/null |
                sed -n 's/.*Overall exposure level for .*: \([0-9.]*\).*/\1/p')"
            if ! systemd-analyze security --offline=yes --threshold="$threshold" "$unit" >/dev/null 2>&1; then
                say "security $system/$name: exposure ${exposure:-?} above 2.0"
                fail=1
            else
                printf '  %-40s %-34s exposure %s\n' "$system" "$name" "$exposure"
            fi
            ;;
        esac
    done
done
if [ "$fail" = 0 ]; then
    say "$nunits units of ${#systems[@]} systems verified; presenced units at or below 2.0 ($((SECONDS - start)) s)"
fi
exit "$fail"
