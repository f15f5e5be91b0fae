"""Resident weight store: deterministic dummy weights, safetensors round trip, clear errors on bad files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nitsum_opt.models.spec import ModelSpec
from nitsum_runtime.weights import ResidentWeightStore, read_safetensors, write_safetensors

TINY = ModelSpec(
    name="tiny",
    num_layers=2,
    hidden_size=32,
    num_attention_heads=8,
    num_kv_heads=2,
    intermediate_size=48,
    vocab_size=100,
    max_model_len=256,
)


def test_dummy_weights_are_deterministic_per_seed() -> None:
    a = ResidentWeightStore.dummy(TINY, seed=1, device="cpu")
    b = ResidentWeightStore.dummy(TINY, seed=1, device="cpu")
    c = ResidentWeightStore.dummy(TINY, seed=2, device="cpu")
    assert all(torch.equal(a.tensors[n], b.tensors[n]) for n in a.tensors)
    assert torch.equal(a.fingerprint(), b.fingerprint())
    assert not torch.equal(a.fingerprint(), c.fingerprint())
    assert a.tensors["lm_head.weight"].dtype == torch.bfloat16
    assert a.nbytes == TINY.param_count * 2


def test_safetensors_round_trip(tmp_path: Path) -> None:
    store = ResidentWeightStore.dummy(TINY, seed=5, device="cpu")
    names = sorted(store.tensors)
    write_safetensors(tmp_path / "a.safetensors", {n: store.tensors[n] for n in names[::2]})
    write_safetensors(tmp_path / "b.safetensors", {n: store.tensors[n] for n in names[1::2]})
    loaded = ResidentWeightStore.from_safetensors(TINY, tmp_path, device="cpu", dtype=torch.float32)
    assert all(torch.equal(loaded.tensors[n], store.tensors[n].float()) for n in names)


def test_truncated_or_foreign_files_give_clear_errors(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    write_safetensors(path, {"x": torch.ones(4, 4)})
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(ValueError, match="offsets"):
        list(read_safetensors(path))
    path.write_bytes(b"\xff" * 16)
    with pytest.raises(ValueError, match="header length"):
        list(read_safetensors(path))
    write_safetensors(path, {"x": torch.ones(2)})
    with pytest.raises(KeyError, match=r"model\.embed_tokens\.weight"):
        ResidentWeightStore.from_safetensors(TINY, path, device="cpu")
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors"):
        ResidentWeightStore.from_safetensors(TINY, tmp_path / "missing", device="cpu")
