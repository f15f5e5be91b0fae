"""The resident weight store (one full weight copy per GPU) and the refill of an engine's shard from it.

A TP switch never reads weights from disk: every GPU keeps one full copy of the model (loaded once from
safetensors, or generated deterministically for dummy models), and waking an engine copies the narrowed views
of that copy into the engine's own parameters with ``copy_`` on the same device (:func:`fill_shard`).

Dummy weights are a function of ``(seed, weight name, device type)``: every tensor has its own generator
seeded from the seed and the name, so the copies on several GPUs of one type are identical (checked at pool
start with :meth:`ResidentWeightStore.fingerprint`).
"""

from __future__ import annotations

import json
import math
import mmap
import time
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from pydantic import Field

from nitsum_opt.models.spec import Frozen, ModelSpec
from nitsum_runtime.sharding import apply_plan, check_full_weights, full_weight_shapes, shard_plan

_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
}
_DTYPE_NAMES = {v: k for k, v in _SAFETENSORS_DTYPES.items()}


class FillReport(Frozen):
    """What one :func:`fill_shard` call did."""

    tp: int = Field(ge=1)
    """TP degree of the engine."""
    rank: int = Field(ge=0)
    """Rank filled."""
    params: int = Field(ge=0)
    """Engine parameters written."""
    bytes_copied: int = Field(ge=0)
    """Bytes copied from the resident store."""
    seconds: float = Field(ge=0)
    """Wall time, device synchronised."""


class ResidentWeightStore:
    """One full weight copy of ``spec`` on one device, under Hugging Face names."""

    def __init__(self, spec: ModelSpec, tensors: Mapping[str, torch.Tensor]) -> None:
        check_full_weights(spec, tensors)
        self.spec = spec
        self.tensors: dict[str, torch.Tensor] = dict(tensors)

    @property
    def device(self) -> torch.device:
        """Device holding the copy."""
        return self.tensors["model.embed_tokens.weight"].device

    @property
    def nbytes(self) -> int:
        """Bytes of the copy."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @classmethod
    def dummy(
        cls, spec: ModelSpec, seed: int, device: torch.device | str, dtype: torch.dtype = torch.bfloat16
    ) -> ResidentWeightStore:
        """Deterministic random weights: ``N(0, 1/fan_in)`` for matrices, ``N(0, 1)`` embeddings, norms ~1."""
        device = torch.device(device)
        tensors = {
            name: _dummy_tensor(name, shape, seed, device, dtype) for name, shape in full_weight_shapes(spec).items()
        }
        return cls(spec, tensors)

    @classmethod
    def from_safetensors(
        cls, spec: ModelSpec, path: str | Path, device: torch.device | str, dtype: torch.dtype | None = None
    ) -> ResidentWeightStore:
        """Load every ``*.safetensors`` file of a folder (or one file) onto ``device`` (HF weight names)."""
        files = _safetensors_files(Path(path))
        wanted = full_weight_shapes(spec)
        tensors: dict[str, torch.Tensor] = {}
        for file in files:
            for name, tensor in read_safetensors(file):
                if name in wanted:
                    tensors[name] = tensor.to(device=device, dtype=dtype or tensor.dtype)
        if spec.tie_word_embeddings:
            tensors.pop("lm_head.weight", None)
        return cls(spec, tensors)

    def fingerprint(self) -> torch.Tensor:
        """Per-weight float64 sum and sum of squares (on the store's device), to compare GPU copies."""
        sums = [torch.stack([t.double().sum(), t.double().square().sum()]) for _, t in sorted(self.tensors.items())]
        return torch.stack(sums)


def _dummy_tensor(
    name: str, shape: tuple[int, ...], seed: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    values = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
    if name.endswith("norm.weight"):
        values = 1.0 + 0.1 * values
    elif "embed_tokens" not in name:
        values /= math.sqrt(shape[1])
    return values.to(dtype)


def fill_shard(store: ResidentWeightStore, engine_params: Mapping[str, torch.Tensor], tp: int, rank: int) -> FillReport:
    """Copy rank ``rank``'s TP-``tp`` shard from ``store`` into ``engine_params`` in place (device to device).

    ``engine_params`` maps vLLM parameter names to the engine's own tensors; every one the shard needs must be
    present with the right shape and on the store's device (the error names the first that is not)."""
    plan = shard_plan(store.spec, tp, rank)
    for name, shape in plan.shapes.items():
        if name not in engine_params:
            raise KeyError(f"engine has no parameter {name!r} needed by the tp={tp} shard of {store.spec.name!r}")
        param = engine_params[name]
        if tuple(param.shape) != shape:
            raise ValueError(
                f"engine parameter {name!r} has shape {tuple(param.shape)}, the tp={tp} rank={rank} shard is {shape}"
            )
        if param.device != store.device:
            raise ValueError(
                f"engine parameter {name!r} is on {param.device}, the resident store on {store.device}: "
                "refill only from the store on the same device"
            )
    t0 = time.perf_counter()
    with torch.no_grad():
        copied = apply_plan(plan, store.tensors, engine_params)
    if store.device.type == "cuda":
        torch.cuda.synchronize(store.device)
    return FillReport(tp=tp, rank=rank, params=len(plan.shapes), bytes_copied=copied, seconds=time.perf_counter() - t0)


def _safetensors_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {path}; point at the model folder or one file")
    return files


def read_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of one safetensors file (CPU, memory-mapped then copied); no code runs from the file."""
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if len(mm) < 8:
            raise ValueError(f"{path}: too short to be a safetensors file")
        header_len = int.from_bytes(mm[:8], "little")
        if header_len > len(mm) - 8:
            raise ValueError(f"{path}: header length {header_len} exceeds the file; the file is truncated")
        try:
            header = json.loads(bytes(mm[8 : 8 + header_len]))
        except ValueError as exc:
            raise ValueError(f"{path}: safetensors header is not valid JSON ({exc})") from None
        base = 8 + header_len
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            dtype = _SAFETENSORS_DTYPES.get(meta.get("dtype"))
            if dtype is None:
                raise ValueError(
                    f"{path}: tensor {name!r} has dtype {meta.get('dtype')!r}; supported: {sorted(_SAFETENSORS_DTYPES)}"
                )
            start, end = meta["data_offsets"]
            shape = tuple(meta["shape"])
            count = math.prod(shape)
            if end - start != count * torch.empty((), dtype=dtype).element_size() or base + end > len(mm):
                raise ValueError(f"{path}: tensor {name!r} offsets {start}..{end} do not match shape {shape}")
            data = torch.frombuffer(bytearray(mm[base + start : base + end]), dtype=dtype, count=count)
            yield name, data.view(shape)


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Write ``tensors`` (any device) as one safetensors file."""
    header: dict[str, object] = {}
    blobs: list[bytes] = []
    offset = 0
    for name, tensor in tensors.items():
        if tensor.dtype not in _DTYPE_NAMES:
            raise ValueError(f"tensor {name!r}: dtype {tensor.dtype} cannot be written to safetensors here")
        cpu = tensor.detach().contiguous().cpu()
        blob = cpu.view(torch.uint8).numpy().tobytes() if cpu.numel() else b""
        header[name] = {
            "dtype": _DTYPE_NAMES[tensor.dtype],
            "shape": list(cpu.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with path.open("wb") as fh:
        fh.write(len(head).to_bytes(8, "little"))
        fh.write(head)
        for blob in blobs:
            fh.write(blob)
