#!/usr/bin/env bash
# On the GPU machine: reassemble vLLM from the two folders pack_vllm.sh made, check it, install it and its
# 21 small dependencies into TARGET (default /tmp/site). Then: export PYTHONPATH=TARGET:$PYTHONPATH
# Usage: bash install_vllm.sh V1_DIR V2_DIR [TARGET]
set -euo pipefail
v1=$(cd "${1:?usage: install_vllm.sh V1_DIR V2_DIR [TARGET]}" && pwd)
v2=$(cd "${2:?usage: install_vllm.sh V1_DIR V2_DIR [TARGET]}" && pwd)
target=${3:-/tmp/site}
mkdir -p "$target"
work=$(mktemp -d)
cat "$v1/vllm.tar.xz.part0" "$v2/vllm.tar.xz.part1" > "$work/vllm.tar.xz"
(cd "$work" && sha256sum -c --quiet "$v2/vllm.tar.xz.sha256")
python3 -m pip install -q --no-index --no-deps --no-compile --target "$target" "$v2"/*.whl
xz -d -T0 -c "$work/vllm.tar.xz" | tar -C "$target" -xf -
rm -rf "$work"
echo "vLLM installed into $target"
