#!/usr/bin/env bash
# Puts the exact Rust source of Polars 2.0.0 (the polars-runtime-64 sdist on PyPI, the source of
# the wheel that polars-cloud 0.12.0 pins) in .polars-source/polars-2.0.0, checked against the sha256
# kept here and patched with polars-source/patches/*.patch; and the hashbrown crate those sources build
# with (crates.io, checked against the same sha256 as Cargo.lock's) in .polars-source/hashbrown-0.17.2,
# patched with polars-source/hashbrown/*.patch. Idempotent; nothing of it is committed.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cache="${POLARS_NODE_CACHE:-$HOME/.cache/polars-node}/sdist"

# unpack ARCHIVE DEST PATCH_DIR: a fresh DEST from the archive with the patches applied, unless
# DEST's stamp says it was made from the same archive and patches.
unpack() {
  local archive="$1" dest="$2" patches="$3"
  local want
  want="$(sha256sum "$archive" | cut -d' ' -f1) $(cat "$patches"/*.patch | sha256sum | cut -d' ' -f1)"
  if [ -f "$dest/.polars-node-stamp" ] && [ "$(cat "$dest/.polars-node-stamp")" = "$want" ]; then
    return 0
  fi
  rm -rf "$dest.tmp"
  mkdir -p "$dest.tmp"
  tar -xzf "$archive" -C "$dest.tmp" --strip-components=1
  for p in "$patches"/*.patch; do
    # A patched file is dated when its patch was committed (its file's time if uncommitted):
    # a target directory (Cargo compares times) that built it since sees nothing new, one
    # built before the patch rebuilds it; every other file keeps the archive's time.
    local files when
    files=$(grep '^+++ b/' "$p" | sed 's|^+++ b/||; s|\t.*||')
    when=$(git -C "$root" log -1 --format=%ct -- "$p" 2>/dev/null || true)
    if [ -z "$when" ] || [ -n "$(git -C "$root" status --porcelain -- "$p" 2>/dev/null)" ]; then
      when=$(stat -c %Y "$p")
    fi
    patch -d "$dest.tmp" -p1 --quiet --forward < "$p"
    for f in $files; do touch -d "@$when" "$dest.tmp/$f"; done
  done
  echo "$want" > "$dest.tmp/.polars-node-stamp"
  rm -rf "$dest"
  mv "$dest.tmp" "$dest"
  echo "source ready in $dest" >&2
}

# Polars: pip fetches the sdist (a stand-in build backend stops it from building it).
version=2.0.0
sha256=9d0aa1ba0ed4521203c1c2aa44c279809427305577583d57715f06c708011122
file="$cache/polars_runtime_64-$version.tar.gz"
if ! echo "$sha256  $file" | sha256sum -c --status 2>/dev/null; then
  mkdir -p "$cache"
  rm -f "$file"
  echo "fetching the Polars $version source (polars-runtime-64 sdist) from PyPI" >&2
  PYTHONPATH="$root/polars-source/stand-in-backend${PYTHONPATH:+:$PYTHONPATH}" \
    python3 -m pip download --quiet --no-deps --no-binary :all: --no-build-isolation \
      --disable-pip-version-check -d "$cache" "polars-runtime-64==$version"
  if ! echo "$sha256  $file" | sha256sum -c --status; then
    echo "error: $file does not have the expected sha256 $sha256; refusing to build from it" >&2
    exit 1
  fi
fi
unpack "$file" "$root/.polars-source/polars-$version" "$root/polars-source/patches"

# hashbrown: Polars' workspace builds it from a fork (not reachable) for its prefetch hints;
# Cargo.toml patches crates.io's hashbrown with this copy, which adds them.
hb_version=0.17.2
hb_sha256=735eaa21a6a5ffb2e84362faaeb90c05ba8e19797ca30428478cb6ea3a4921bc
hb_file="$cache/hashbrown-$hb_version.crate"
if ! echo "$hb_sha256  $hb_file" | sha256sum -c --status 2>/dev/null; then
  mkdir -p "$cache"
  echo "fetching hashbrown $hb_version from crates.io" >&2
  curl -fsSL --retry 3 -o "$hb_file.tmp" "https://static.crates.io/crates/hashbrown/hashbrown-$hb_version.crate"
  if ! echo "$hb_sha256  $hb_file.tmp" | sha256sum -c --status; then
    echo "error: hashbrown-$hb_version.crate does not have the expected sha256 $hb_sha256; refusing to build from it" >&2
    exit 1
  fi
  mv "$hb_file.tmp" "$hb_file"
fi
unpack "$hb_file" "$root/.polars-source/hashbrown-$hb_version" "$root/polars-source/hashbrown"
