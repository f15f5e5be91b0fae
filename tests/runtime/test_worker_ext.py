"""CPU-checkable parts of the vLLM worker extension: no vLLM import, the IPC handle and KV wire formats."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from nitsum_runtime.worker_ext import NitsumWorkerExtension, _decode, _encode, kv_from_wire, kv_to_wire


def test_runtime_modules_do_not_import_vllm() -> None:
    code = (
        "import sys, nitsum_runtime.worker_ext, nitsum_runtime.vllm_process, nitsum_runtime.bench_vllm, "
        "nitsum_runtime.gpu_bench; print('vllm' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_extension_methods_cannot_clash_with_worker_attributes() -> None:
    public = [m for m in vars(NitsumWorkerExtension) if not m.startswith("__")]
    assert public and all(m.startswith(("nitsum_", "_nitsum_")) for m in public)


def test_ipc_args_round_trip_through_json_and_refuse_foreign_classes() -> None:
    args = (
        torch.Tensor,
        torch.Size([2, 3]),
        (3, 1),
        0,
        torch.TypedStorage,
        torch.bfloat16,
        2,
        b"\x00\xff",
        12,
        0,
        False,
        b"ab",
        4,
        None,
        True,
    )
    assert _decode(json.loads(json.dumps(_encode(args)))) == list(args)
    bad = _encode(args)
    bad[0] = {"class": "os.system"}
    with pytest.raises(ValueError, match=r"os\.system"):
        _decode(bad)


def test_kv_wire_round_trip() -> None:
    t = torch.randn(2, 5, 3, 8).to(torch.bfloat16)
    wire = kv_to_wire(t)
    assert set(wire) == {"shape", "dtype", "data"} and isinstance(wire["data"], bytes)
    assert torch.equal(kv_from_wire(wire), t)
    with pytest.raises(ValueError, match="unknown dtype"):
        kv_from_wire({**wire, "dtype": "nope"})
