#!/usr/bin/env bash
# Puts the exact Rust source of Polars 2.0.0 (the polars-runtime-64 sdist on PyPI, the source of
# the wheel that polars-cloud 0.12.0 pins) in .engine/polars-2.0.0, checked against the sha256
# kept here and patched with engine/patches/*.patch. Idempotent; nothing of it is committed.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
version=2.0.0
sha256=9d0aa1ba0ed4521203c1c2aa44c279809427305577583d57715f06c708011122
dest="$root/.engine/polars-$version"
cache="${POLARS_NODE_CACHE:-$HOME/.cache/polars-node}/sdist"
file="$cache/polars_runtime_64-$version.tar.gz"

# The stamp records what the tree was made from: source hash + patches.
want="$sha256 $(cat "$root"/engine/patches/*.patch | sha256sum | cut -d' ' -f1)"
if [ -f "$dest/.polars-node-stamp" ] && [ "$(cat "$dest/.polars-node-stamp")" = "$want" ]; then
  exit 0
fi

if ! echo "$sha256  $file" | sha256sum -c --status 2>/dev/null; then
  mkdir -p "$cache"
  rm -f "$file"
  echo "fetching the Polars $version source (polars-runtime-64 sdist) from PyPI" >&2
  PYTHONPATH="$root/engine/stand-in-backend${PYTHONPATH:+:$PYTHONPATH}" \
    python3 -m pip download --quiet --no-deps --no-binary :all: --no-build-isolation \
      --disable-pip-version-check -d "$cache" "polars-runtime-64==$version"
  if ! echo "$sha256  $file" | sha256sum -c --status; then
    echo "error: $file does not have the expected sha256 $sha256; refusing to build from it" >&2
    exit 1
  fi
fi

rm -rf "$dest.tmp"
mkdir -p "$dest.tmp"
tar -xzf "$file" -C "$dest.tmp" --strip-components=1
for p in "$root"/engine/patches/*.patch; do
  # Patched files keep the archive's timestamp, so a target directory that already built this
  # tree sees nothing new.
  files=$(grep '^+++ b/' "$p" | sed 's|^+++ b/||')
  ref=$(mktemp)
  for f in $files; do touch -r "$dest.tmp/$f" "$ref"; done
  patch -d "$dest.tmp" -p1 --quiet --forward < "$p"
  for f in $files; do touch -r "$ref" "$dest.tmp/$f"; done
  rm -f "$ref"
done
echo "$want" > "$dest.tmp/.polars-node-stamp"
rm -rf "$dest"
mv "$dest.tmp" "$dest"
echo "Polars $version source ready in $dest" >&2
