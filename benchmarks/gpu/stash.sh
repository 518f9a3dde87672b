#!/usr/bin/env bash
# On the GPU machine: keep one carried set for the run (the machine stays warm ~30 s
# between calls; /tmp survives while it is held). Usage: stash.sh .gpukit/setK
set -euo pipefail
src="${1:?usage: stash.sh .gpukit/setK}"
dest="${GPUKIT_STASH:-/tmp/gpukit}"
mkdir -p "$dest"
cp -f "$src"/* "$dest"/
echo "stashed $(ls "$src" | wc -l) files of $src in $dest ($(du -sh "$dest" | cut -f1) there now)"
