#!/bin/sh
# Assembles the build context of deploy/Containerfile: the root file system of the mcpwarden
# image, from an agent binary built on this machine.
#
#   deploy/stage-image.sh BINARY [DIR]      (DIR defaults to deploy/image-root)
#
# DIR receives, and nothing else:
#   usr/local/bin/mcpwarden            BINARY, stripped
#   <each library `ldd BINARY` names>  at the path ldd gives (glibc's libc, libm, libgcc_s and the
#                                      dynamic loader /lib64/ld-linux-x86-64.so.2), dereferenced
#   etc/ssl/certs/ca-certificates.crt  the host's CA bundle (Debian: ca-certificates; or $CA_BUNDLE),
#                                      the roots the agent verifies https upstream servers with
#   etc/passwd, etc/group              root only
#   etc/nsswitch.conf                  files: getgrnam_r for --admin-group NAME reads etc/group
#   etc/hosts                          localhost (the runtime usually mounts its own)
#   empty directories                  what the DaemonSet mounts over or the agent writes to:
#                                      etc/mcpwarden proc sys dev run/mcpwarden run/netns
#                                      var/lib/mcpwarden var/log/mcpwarden tmp; var/run -> ../run
#
# Then:  buildah bud -f deploy/Containerfile -t mcpwarden:TAG DIR   (or: podman build ...)
# DIR is made afresh; an existing DIR is only replaced when it holds an earlier staging.
set -eu
umask 022

usage() {
    echo "usage: $0 BINARY [DIR]" >&2
    exit 2
}
[ $# -ge 1 ] && [ $# -le 2 ] || usage
bin=$1
here=$(cd "$(dirname "$0")" && pwd)
out=${2:-$here/image-root}

[ -f "$bin" ] && [ -x "$bin" ] || { echo "$0: $bin is not an executable file" >&2; exit 1; }
ca=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
[ -s "$ca" ] || {
    echo "$0: no CA bundle at $ca (apt-get install ca-certificates, or set CA_BUNDLE)" >&2
    exit 1
}

if [ -e "$out" ]; then
    if [ -n "$(ls -A "$out")" ] && [ ! -e "$out/usr/local/bin/mcpwarden" ]; then
        echo "$0: $out exists and is not an earlier staging: not touching it" >&2
        exit 1
    fi
    rm -rf "$out"
fi
mkdir -p "$out"

# The binary, without its symbol table and debug sections.
mkdir -p "$out/usr/local/bin"
if command -v strip >/dev/null 2>&1; then
    strip --strip-all -o "$out/usr/local/bin/mcpwarden" "$bin"
else
    echo "$0: strip not found (binutils): the binary goes in unstripped" >&2
    cp "$bin" "$out/usr/local/bin/mcpwarden"
fi
chmod 0755 "$out/usr/local/bin/mcpwarden"

# The shared libraries it loads, at the paths the loader resolves them to here. A static
# binary has none ("not a dynamic executable"); linux-vdso is the kernel's.
libs=$(ldd "$bin" 2>/dev/null | awk '
    $2 == "=>" && $3 ~ /^\// { print $3; next }
    $1 ~ /^\// { print $1 }
') || true
if [ -z "$libs" ] && ! ldd "$bin" 2>&1 | grep -q 'not a dynamic executable'; then
    echo "$0: ldd $bin listed no libraries" >&2
    exit 1
fi
for lib in $libs; do
    mkdir -p "$out$(dirname "$lib")"
    cp -L "$lib" "$out$lib"
    chmod 0755 "$out$lib"
done

mkdir -p "$out/etc/ssl/certs"
cp -L "$ca" "$out/etc/ssl/certs/ca-certificates.crt"
chmod 0644 "$out/etc/ssl/certs/ca-certificates.crt"

printf 'root:x:0:0:root:/root:/usr/sbin/nologin\n' >"$out/etc/passwd"
printf 'root:x:0:\n' >"$out/etc/group"
printf 'passwd: files\ngroup: files\nhosts: files dns\n' >"$out/etc/nsswitch.conf"
printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$out/etc/hosts"
chmod 0644 "$out/etc/passwd" "$out/etc/group" "$out/etc/nsswitch.conf" "$out/etc/hosts"

for d in etc/mcpwarden proc sys dev run/mcpwarden run/netns var/lib/mcpwarden var/log/mcpwarden; do
    mkdir -p "$out/$d"
    chmod 0755 "$out/$d"
done
ln -s ../run "$out/var/run"
mkdir -p "$out/tmp"
chmod 1777 "$out/tmp"
chmod 0755 "$out" "$out/etc" "$out/usr" "$out/usr/local" "$out/usr/local/bin" "$out/var" \
    "$out/var/lib" "$out/var/log" "$out/run" "$out/etc/ssl" "$out/etc/ssl/certs"

echo "staged $(du -sh "$out" | cut -f1) in $out: $(echo $libs | wc -w) libraries"
