#!/usr/bin/env bash
# Builds the OCI image without Nix: a `FROM scratch` image holding the polars-node binary, the
# shared libraries it links (read with ldd), CA certificates, time zones, an unprivileged user
# and a default configuration. Usage: images/build.sh [BINARY] [TAG]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
binary="${1:-${CARGO_TARGET_DIR:-$here/../target}/debug/polars-node}"
tag="${2:-polars-node:dev}"
ctx="$(mktemp -d)"
trap 'rm -rf "$ctx"' EXIT
root="$ctx/rootfs"
mkdir -p "$root/usr/bin" "$root/etc/polars" "$root/etc/ssl/certs" "$root/tmp" "$root/usr/share"
# The state volume, owned by the node's user (set by the Containerfile's COPY --chown).
mkdir -p "$ctx/state/results" "$ctx/state/shuffle" "$ctx/state/tmp" "$ctx/state/observatory"

# The binary without debug sections (the debug build carries ~1 GB of them).
objcopy --strip-debug "$binary" "$root/usr/bin/polars-node"
# Its shared libraries and loader, at the paths the binary asks for.
ldd "$binary" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | while read -r lib; do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
cp -r /usr/share/zoneinfo "$root/usr/share/"
printf 'root:x:0:0::/:/bin/false\npolars:x:65534:65534::/var/lib/polars:/bin/false\n' > "$root/etc/passwd"
printf 'root:x:0:\npolars:x:65534:\n' > "$root/etc/group"
printf 'hosts: files dns\n' > "$root/etc/nsswitch.conf"
cp "$here/node.toml" "$root/etc/polars/node.toml"
chmod 1777 "$root/tmp"
cp "$here/Containerfile" "$ctx/Containerfile"
DOCKER_BUILDKIT=0 docker build --quiet -t "$tag" -f "$ctx/Containerfile" "$ctx" >/dev/null
echo "$tag"
