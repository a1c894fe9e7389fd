#!/bin/bash
# Debian 12's QEMU 7.2 (qemu-system-x86_64), unpacked, not installed.
#
# The installed QEMU is 10 (bookworm-backports) and 7.2's packages conflict
# with it, so this fetches bookworm/main's .debs with `apt-get download` and
# unpacks them with `dpkg-deb -x`; it never installs or removes a package.
# It prints, on stdout and alone, the path of a wrapper that runs 7.2 with
# its own firmware (-L: 7.2's share/qemu, bookworm's SeaBIOS and iPXE), its
# own modules (QEMU_MODULE_DIR) and, if some library of 7.2's sonames is not
# on this machine, the unpacked one (LD_LIBRARY_PATH). Progress goes to
# stderr. Idempotent: a second run reuses the unpacked tree.
#
#   benches/qemu-7.2.sh [DIR]      # DIR defaults to $QEMU72_DIR, else target/qemu-7.2
#   "$(benches/qemu-7.2.sh)" --version

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=${1:-${QEMU72_DIR:-$ROOT/target/qemu-7.2}}
SUITE=bookworm/main
# What the 7.2 binary needs that differs from the installed QEMU 10's:
# the binary, its modules and helpers, its data (option ROMs, keymaps), and
# the firmware it was released with.
PACKAGES=(qemu-system-x86 qemu-system-common qemu-system-data seabios ipxe-qemu)
ARCH_LIBDIR=usr/lib/$(uname -m)-linux-gnu  # Debian's multiarch directory on x86_64

say() { echo "qemu-7.2: $*" >&2; }
die() { say "error: $*"; exit 1; }

for tool in apt-cache apt-get dpkg-deb dpkg-query ldd; do
    command -v "$tool" >/dev/null || die "$tool not found (this script expects Debian's apt and dpkg)"
done

# The version of $1 that apt lists from $SUITE (the stable release, not
# -security or -backports).
suite_version() {
    apt-cache madison "$1" | awk -F' [|] ' -v s=" $SUITE " 'index($3, s) { gsub(/ /, "", $2); print $2; exit }'
}

# apt-get download's file name for $1 at version $2 (the epoch's ':' is
# written %3a).
deb_of() {
    local f
    for f in "$DIR/debs/$1_${2//:/%3a}"_*.deb; do
        [ -e "$f" ] && { echo "$f"; return 0; }
    done
    return 1
}

fetch() {  # $1 package, $2 version
    deb_of "$1" "$2" >/dev/null && return 0
    say "downloading $1=$2"
    (cd "$DIR/debs" && apt-get -q -o APT::Sandbox::User=root download "$1=$2" >&2) ||
        die "apt-get download $1=$2 failed (is $SUITE in apt's sources, and apt-get update done?)"
    deb_of "$1" "$2" >/dev/null || die "apt-get download $1=$2 left no .deb in $DIR/debs"
}

missing_libs() {  # sonames $1 (an ELF) needs and the loader cannot find
    if [ -n "$LD_EXTRA" ]; then
        LD_LIBRARY_PATH="$LD_EXTRA" ldd "$1"
    else
        ldd "$1"
    fi | awk '/not found/ { print $1 }'
}

WRAPPER=$DIR/qemu-system-x86_64
TREE=$DIR/root
STAMP=$DIR/packages

declare -A VERSION
for p in "${PACKAGES[@]}"; do
    v=$(suite_version "$p")
    [ -n "$v" ] || die "apt-cache lists no $SUITE version of $p (apt-get update?)"
    VERSION[$p]=$v
done
case ${VERSION[qemu-system-x86]} in
    1:7.2+*) ;;
    *) die "$SUITE's qemu-system-x86 is ${VERSION[qemu-system-x86]}, not 7.2" ;;
esac
want=$(for p in "${PACKAGES[@]}"; do echo "$p=${VERSION[$p]}"; done)

# Already unpacked (the stamp lists every package=version unpacked, library
# packages included), and it runs: done.
if [ -x "$WRAPPER" ] && [ -f "$STAMP" ] && [ "$(head -n "${#PACKAGES[@]}" "$STAMP")" = "$want" ] &&
    "$WRAPPER" --version 2>/dev/null | grep -q '^QEMU emulator version 7\.2'; then
    echo "$WRAPPER"
    exit 0
fi

mkdir -p "$DIR/debs"
rm -rf "$TREE" "$STAMP" "$WRAPPER"
mkdir -p "$TREE"
unpacked=()
for p in "${PACKAGES[@]}"; do
    fetch "$p" "${VERSION[$p]}"
    dpkg-deb -x "$(deb_of "$p" "${VERSION[$p]}")" "$TREE"
    unpacked+=("$p=${VERSION[$p]}")
done
BIN=$TREE/usr/bin/qemu-system-x86_64
[ -x "$BIN" ] || die "no usr/bin/qemu-system-x86_64 in qemu-system-x86 ${VERSION[qemu-system-x86]}"

# Libraries: a soname this machine lacks comes from the library package of
# the binary's Depends that is not installed (Debian names library packages
# after their soname), at its $SUITE version, unpacked next to the rest.
LD_EXTRA=
missing=$(missing_libs "$BIN")
if [ -n "$missing" ]; then
    say "libraries not on this machine: $(echo $missing)"
    LD_EXTRA=$TREE/lib/${ARCH_LIBDIR#usr/lib/}:$TREE/$ARCH_LIBDIR
    deps=$(dpkg-deb -f "$(deb_of qemu-system-x86 "${VERSION[qemu-system-x86]}")" Depends |
        tr ',' '\n' | sed -E 's/^ *//; s/[ (|].*//' | grep '^lib' || true)
    for p in $deps; do
        if dpkg-query -W -f '${Status}\n' "$p" 2>/dev/null | grep -q 'install ok installed'; then
            continue
        fi
        v=$(suite_version "$p")
        [ -n "$v" ] || die "$p (a Depends of qemu-system-x86) has no $SUITE version"
        fetch "$p" "$v"
        dpkg-deb -x "$(deb_of "$p" "$v")" "$TREE"
        unpacked+=("$p=$v")
    done
    missing=$(missing_libs "$BIN")
    [ -z "$missing" ] || die "still not found after unpacking the missing library packages: $(echo $missing)"
fi

MODULES=$TREE/$ARCH_LIBDIR/qemu
[ -d "$MODULES" ] || die "no module directory $MODULES in qemu-system-common"
for d in usr/share/qemu usr/share/seabios usr/lib/ipxe/qemu; do
    [ -d "$TREE/$d" ] || die "no $d in the unpacked packages"
done

{
    echo '#!/bin/sh'
    echo "# Debian 12's QEMU ${VERSION[qemu-system-x86]}, unpacked by benches/qemu-7.2.sh."
    echo "R='$TREE'"
    echo 'export QEMU_MODULE_DIR="$R/'"$ARCH_LIBDIR"'/qemu"'
    if [ -n "$LD_EXTRA" ]; then
        echo 'export LD_LIBRARY_PATH="$R/lib/'"${ARCH_LIBDIR#usr/lib/}"':$R/'"$ARCH_LIBDIR"'${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"'
    fi
    echo 'exec "$R/usr/bin/qemu-system-x86_64" -L "$R/usr/share/qemu" -L "$R/usr/share/seabios" -L "$R/usr/lib/ipxe/qemu" "$@"'
} >"$WRAPPER"
chmod +x "$WRAPPER"

version=$("$WRAPPER" --version 2>&1 | head -n 1) || die "$WRAPPER --version failed: $version"
case $version in
    "QEMU emulator version 7.2"*) say "$version" ;;
    *) die "$WRAPPER --version says: $version" ;;
esac
printf '%s\n' "${unpacked[@]}" >"$STAMP"
echo "$WRAPPER"
