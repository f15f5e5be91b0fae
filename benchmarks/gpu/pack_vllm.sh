#!/usr/bin/env bash
# Pack vLLM 0.26.0 for the offline H200 machines in TWO folders of < 60 MiB (instead of six), so that it
# installs in two device calls. Input: the verified wheel folder that
# ../shared/tools/vllm-offline/prepare.sh OUT leaves in OUT/wheels. The vLLM wheel is unpacked and re-packed
# as tar.xz WITHOUT three files that serving a dense Llama on Hopper never loads:
#   vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so  (FlashAttention 2; SM90 uses FA3, vllm/v1/attention/backends/fa_utils.py)
#   vllm/_moe_C_stable_libtorch.abi3.so       (MoE kernels; imported inside contextlib.suppress(ImportError))
#   vllm/vllm-rs                              (Rust API-server frontend binary)
# Every other file is the wheel's, byte for byte. install_vllm.sh reassembles and installs it.
# Usage: benchmarks/gpu/pack_vllm.sh WHEELS_DIR OUT_DIR      (OUT_DIR gets v1/ and v2/)
set -euo pipefail
wheels=$(cd "${1:?usage: pack_vllm.sh WHEELS_DIR OUT_DIR}" && pwd)
out=${2:?usage: pack_vllm.sh WHEELS_DIR OUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)
whl=$(ls "$wheels"/vllm-0.26.0-*.whl)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && python3 -m zipfile -e "$whl" unpacked)
tar -C "$work/unpacked" --sort=name --owner=0 --group=0 --mtime=@0 \
  --exclude=vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so --exclude=vllm/_moe_C_stable_libtorch.abi3.so \
  --exclude=vllm/vllm-rs -cf - vllm vllm-0.26.0.dist-info | xz -T0 -6 > "$work/vllm.tar.xz"
rm -rf "$out/v1" "$out/v2"
mkdir -p "$out/v1" "$out/v2"
(cd "$work" && sha256sum vllm.tar.xz > "$out/v2/vllm.tar.xz.sha256")
split -b 55M -d -a 1 "$work/vllm.tar.xz" "$work/part_"
ls "$work"/part_* | sort | sed -n 3p | grep -q . && { echo "vllm.tar.xz needs more than two parts" >&2; exit 1; }
mv "$work/part_0" "$out/v1/vllm.tar.xz.part0"
mv "$work/part_1" "$out/v2/vllm.tar.xz.part1"
find "$wheels" -name '*.whl' ! -name 'vllm-*' -exec cp {} "$out/v2/" \;
cp "$here/install_vllm.sh" "$out/v2/"
du -sh "$out"/v1 "$out"/v2
