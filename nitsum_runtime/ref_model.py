"""A small but real Llama decoder in plain torch: TP shards in vLLM's layouts, paged KV cache, all-reduce.

One call of :func:`forward` runs one continuous-batching iteration on one TP rank: the new tokens of every
scheduled request (prefill chunks and decode tokens, flattened), their KV written into the paged cache (NHD
layout of :mod:`nitsum_runtime.kv_migration`), attention of each request over its cached context, and the
log-probabilities of the rows asked for. TP follows vLLM: vocab-parallel embedding and LM head,
column-parallel fused QKV and gate-up projections, row-parallel ``o_proj`` and ``down_proj`` followed by an
all-reduce.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field
from torch.nn.attention import SDPBackend, sdpa_kernel

from nitsum_opt.models.spec import Frozen, ModelSpec
from nitsum_runtime.engine import TopK
from nitsum_runtime.sharding import TpLayout


class SeqInput(Frozen):
    """One request's part of an iteration."""

    query_start: int = Field(ge=0)
    """Index of its first new token in the flattened batch."""
    query_len: int = Field(ge=1)
    """New tokens (1 for a decode step)."""
    context_len: int = Field(ge=1)
    """Tokens in its cache after this iteration (cached + new)."""
    block_ids: tuple[int, ...]
    """Its cache blocks, in order."""
    logits_from: int = Field(ge=0)
    """First of its new tokens whose next-token log-probabilities are returned (``query_len - 1``: only the
    last one; 0: every position, for prompt log-probabilities)."""


class BatchInput(Frozen):
    """One iteration of an engine (identical on every rank of its TP group)."""

    token_ids: tuple[int, ...]
    """New tokens of every request, flattened in request order."""
    positions: tuple[int, ...]
    """Position of each new token in its request."""
    seqs: tuple[SeqInput, ...]
    """Per-request metadata."""
    top_k: int = Field(default=5, ge=1)
    """Log-probabilities returned per row."""


class TpComm:
    """All-reduce / all-gather over one engine's TP group (no-ops at TP 1)."""

    def __init__(self, group: dist.ProcessGroup | None, tp: int) -> None:
        self.group, self.tp = group, tp

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.tp)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


class RefModelConfig(Frozen):
    """Numerics of the reference model that the :class:`ModelSpec` does not carry."""

    rope_theta: float = Field(default=500_000.0, gt=0)
    """RoPE base (Llama 3 uses 500000)."""
    rms_norm_eps: float = Field(default=1e-5, gt=0)
    """RMSNorm epsilon."""
    deterministic: bool = True
    """Run-to-run bit-reproducible kernels: attention on PyTorch's math SDPA backend (float32 softmax, plain
    GEMMs) instead of fused kernels whose algorithm choice is not guaranteed to be reproducible, and, in the
    rank processes, ``torch.use_deterministic_algorithms`` (stable ``topk`` tie-breaking where the torch build
    has it). The bit-identity checks of the switch benchmarks rely on it; costs little at reference sizes."""


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    return (xf * weight.float()).to(x.dtype)


def _rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Neox-style rotary embedding of ``x`` ``[tokens, heads, head_dim]``."""
    half = x.shape[-1] // 2
    inv = 1.0 / (theta ** (torch.arange(0, half, device=x.device, dtype=torch.float32) / half))
    ang = positions.float()[:, None] * inv[None, :]
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def _embed(
    params: Mapping[str, torch.Tensor],
    ids: torch.Tensor,
    lay: TpLayout,
    rank: int,
    spec: ModelSpec,
    comm: TpComm,
) -> torch.Tensor:
    weight = params["model.embed_tokens.weight"]
    if lay.tp == 1:
        return F.embedding(ids, weight)
    start, end = lay.vocab_rows(rank, spec.vocab_size)
    outside = (ids < start) | (ids >= end)
    out = F.embedding(torch.where(outside, 0, ids - start), weight)
    out.masked_fill_(outside[:, None], 0)
    return comm.all_reduce(out)


class _SeqCtx:
    """Per-request tensors shared by every layer of one iteration."""

    def __init__(self, s: SeqInput, block_size: int, device: torch.device) -> None:
        pos = torch.arange(s.context_len)
        blocks = torch.tensor(s.block_ids)
        self.slots = (blocks[pos // block_size] * block_size + pos % block_size).to(device)
        self.rows = slice(s.query_start, s.query_start + s.query_len)
        self.mask: torch.Tensor | None = None
        if s.query_len > 1:
            first = s.context_len - s.query_len
            rows = torch.arange(s.query_len)[:, None] + first
            self.mask = (torch.arange(s.context_len)[None, :] <= rows).to(device)


def _attention(
    q: torch.Tensor, cache: torch.Tensor, ctxs: Sequence[_SeqCtx], head_dim: int, deterministic: bool
) -> torch.Tensor:
    """Causal attention of each request's new tokens over its cached context (``q``: ``[T, H_l, D]``)."""
    flat = cache.view(-1, cache.shape[2], cache.shape[3])
    out = torch.empty_like(q)
    backend = sdpa_kernel(SDPBackend.MATH) if deterministic else contextlib.nullcontext()
    with backend:
        for c in ctxs:
            kv = flat.index_select(0, c.slots).transpose(0, 1)  # [Hkv_l, ctx, 2D]
            k, v = kv[..., :head_dim], kv[..., head_dim:]
            qs = q[c.rows].transpose(0, 1)  # [H_l, Tq, D]
            groups = qs.shape[0] // k.shape[0]
            k, v = k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0)
            o = F.scaled_dot_product_attention(qs[None], k[None], v[None], attn_mask=c.mask)[0]
            out[c.rows] = o.transpose(0, 1)
    return out


def forward(
    spec: ModelSpec,
    cfg: RefModelConfig,
    params: Mapping[str, torch.Tensor],
    kv_caches: Sequence[torch.Tensor],
    batch: BatchInput,
    tp: int,
    rank: int,
    comm: TpComm,
) -> list[TopK] | None:
    """One iteration on TP rank ``rank``; returns the top-k rows (on every rank; identical across ranks)."""
    lay = TpLayout.of(spec, tp)
    device = params["model.norm.weight"].device
    d, ql, kl = lay.head_dim, lay.heads_local * lay.head_dim, lay.kv_heads_local * lay.head_dim
    il = lay.intermediate_local
    block_size = kv_caches[0].shape[1]
    ids = torch.tensor(batch.token_ids, device=device)
    positions = torch.tensor(batch.positions, device=device)
    ctxs = [_SeqCtx(s, block_size, device) for s in batch.seqs]
    slots = torch.cat([c.slots[s.context_len - s.query_len :] for c, s in zip(ctxs, batch.seqs, strict=True)])
    h = _embed(params, ids, lay, rank, spec, comm)
    for i, cache in enumerate(kv_caches):
        p = f"model.layers.{i}"
        x = _rms_norm(h, params[f"{p}.input_layernorm.weight"], cfg.rms_norm_eps)
        qkv = x @ params[f"{p}.self_attn.qkv_proj.weight"].t()
        q, k, v = qkv.split([ql, kl, kl], dim=-1)
        q = _rope(q.view(-1, lay.heads_local, d), positions, cfg.rope_theta)
        k = _rope(k.view(-1, lay.kv_heads_local, d), positions, cfg.rope_theta)
        flat = cache.view(-1, cache.shape[2], cache.shape[3])
        flat.index_copy_(0, slots, torch.cat([k, v.view(-1, lay.kv_heads_local, d)], dim=-1))
        attn = _attention(q, cache, ctxs, d, cfg.deterministic).reshape(-1, ql)
        h = h + comm.all_reduce(attn @ params[f"{p}.self_attn.o_proj.weight"].t())
        x = _rms_norm(h, params[f"{p}.post_attention_layernorm.weight"], cfg.rms_norm_eps)
        gate, up = (x @ params[f"{p}.mlp.gate_up_proj.weight"].t()).split([il, il], dim=-1)
        h = h + comm.all_reduce((F.silu(gate) * up) @ params[f"{p}.mlp.down_proj.weight"].t())
    rows = [s.query_start + j for s in batch.seqs for j in range(s.logits_from, s.query_len)]
    hidden = _rms_norm(h[torch.tensor(rows, device=device)], params["model.norm.weight"], cfg.rms_norm_eps)
    head = params["model.embed_tokens.weight" if spec.tie_word_embeddings else "lm_head.weight"]
    logits = comm.all_gather_last(hidden @ head.t())[:, : spec.vocab_size]
    top = torch.log_softmax(logits.float(), dim=-1).topk(batch.top_k, dim=-1)
    ids_cpu, lps_cpu = top.indices.cpu().tolist(), top.values.cpu().tolist()
    return [TopK(token_ids=tuple(a), logprobs=tuple(b)) for a, b in zip(ids_cpu, lps_cpu, strict=True)]
