"""Tensor-parallel shards of a Llama-layout model, in vLLM 0.26's parameter layouts (plain torch).

A full weight copy uses the Hugging Face names (``model.layers.0.self_attn.q_proj.weight`` ...). An engine at
TP ``n`` holds, on rank ``r``, vLLM's fused and sharded parameters:

================================  =========================================================================
engine parameter                  rows / columns taken from the full weights on rank ``r`` of ``n``
================================  =========================================================================
``self_attn.qkv_proj.weight``     column-parallel, fused: ``[q rows of r; k, v rows of r//rep]``
``self_attn.o_proj.weight``       row-parallel: columns ``[r*H_l*D, (r+1)*H_l*D)`` of ``o_proj``
``mlp.gate_up_proj.weight``       column-parallel, fused: ``[gate rows of r; up rows of r]``
``mlp.down_proj.weight``          row-parallel: columns ``[r*I_l, (r+1)*I_l)`` of ``down_proj``
``embed_tokens`` / ``lm_head``    vocab-parallel: the vocabulary is padded to a multiple of 64, split evenly;
                                  rank ``r`` holds real rows ``[r*V_l, min((r+1)*V_l, V))``, zeros after them
norms                             replicated
================================  =========================================================================

``rep = max(1, n // num_kv_heads)``: when TP exceeds the KV heads each KV head is replicated on ``rep``
consecutive ranks (``QKVParallelLinear``: ``shard_rank = tp_rank // num_kv_head_replicas``). Checked against
vLLM 0.26.0 ``model_executor/layers/linear.py``, ``vocab_parallel_embedding.py`` and ``models/llama.py``.

:func:`shard_plan` lists the copies that build rank ``r``'s shard; :func:`slice_shard` (new tensors) and
:func:`nitsum_runtime.weights.fill_shard` (in-place ``copy_`` into existing parameters) both execute it, so a
shard is defined once.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from pydantic import Field

from nitsum_opt.models.spec import Frozen, ModelSpec

#: vLLM's ``DEFAULT_VOCAB_PADDING_SIZE``: the vocabulary is padded to a multiple of this before the TP split.
VOCAB_PADDING = 64


def pad_vocab(vocab_size: int, pad_to: int = VOCAB_PADDING) -> int:
    """Vocabulary rounded up to a multiple of ``pad_to`` (vLLM's ``pad_vocab_size``)."""
    return -(-vocab_size // pad_to) * pad_to


class TpLayout(Frozen):
    """Per-rank sizes of a model at one TP degree; build with :meth:`of`, which validates the degree."""

    tp: int = Field(ge=1)
    """Tensor-parallel degree."""
    heads_local: int = Field(ge=1)
    """Query heads per rank."""
    kv_heads_local: int = Field(ge=1)
    """KV heads per rank (1 when TP exceeds the KV heads)."""
    kv_replicas: int = Field(ge=1)
    """Ranks holding the same KV head (``tp // num_kv_heads`` when TP exceeds them, else 1)."""
    intermediate_local: int = Field(ge=1)
    """MLP width per rank."""
    vocab_padded: int = Field(ge=1)
    """Vocabulary padded to a multiple of 64."""
    vocab_local: int = Field(ge=1)
    """Embedding / LM-head rows per rank (padding included)."""
    head_dim: int = Field(ge=1)
    """Width of one head."""

    @classmethod
    def of(cls, spec: ModelSpec, tp: int) -> TpLayout:
        """Layout of ``spec`` at ``tp``; the error names the dimension that ``tp`` does not divide."""
        if tp < 1:
            raise ValueError(f"tp={tp}: the TP degree must be >= 1")
        kv = spec.num_kv_heads
        problems = []
        if spec.num_attention_heads % tp:
            problems.append(f"num_attention_heads={spec.num_attention_heads}")
        if kv % tp and tp % kv:
            problems.append(f"num_kv_heads={kv} (neither divides the other)")
        if spec.intermediate_size % tp:
            problems.append(f"intermediate_size={spec.intermediate_size}")
        if problems:
            raise ValueError(
                f"model {spec.name!r} cannot be split at tp={tp}: tp does not divide {', '.join(problems)}; "
                "use a TP degree that divides the head counts and the MLP width"
            )
        vocab_padded = pad_vocab(spec.vocab_size)
        if vocab_padded % tp:
            raise ValueError(f"padded vocabulary {vocab_padded} is not divisible by tp={tp}")
        return cls(
            tp=tp,
            heads_local=spec.num_attention_heads // tp,
            kv_heads_local=max(1, kv // tp),
            kv_replicas=max(1, tp // kv),
            intermediate_local=spec.intermediate_size // tp,
            vocab_padded=vocab_padded,
            vocab_local=vocab_padded // tp,
            head_dim=spec.head_dim,
        )

    def check_rank(self, rank: int) -> None:
        """Raise when ``rank`` is not in ``[0, tp)``."""
        if not 0 <= rank < self.tp:
            raise ValueError(f"rank={rank} is outside [0, {self.tp}) for tp={self.tp}")

    def kv_shard(self, rank: int) -> int:
        """KV-head group ``s`` held by ``rank`` (global KV heads ``[s*kv_local, (s+1)*kv_local)``)."""
        self.check_rank(rank)
        return rank // self.kv_replicas

    def kv_heads_of(self, rank: int) -> range:
        """Global KV heads held by ``rank``."""
        s = self.kv_shard(rank)
        return range(s * self.kv_heads_local, (s + 1) * self.kv_heads_local)

    def vocab_rows(self, rank: int, vocab_size: int) -> tuple[int, int]:
        """``[start, end)`` of the real vocabulary rows held by ``rank`` (padding rows follow them)."""
        self.check_rank(rank)
        start = min(rank * self.vocab_local, vocab_size)
        return start, min((rank + 1) * self.vocab_local, vocab_size)


class ShardCopy(Frozen):
    """``engine[dst].narrow(dim, dst_start, length) <- full[src].narrow(dim, src_start, length)``."""

    dst: str
    """Engine (vLLM) parameter name."""
    src: str
    """Full-weight (Hugging Face) name."""
    dim: int = Field(ge=0, le=1)
    """Dimension narrowed on both sides (0: output rows, column-parallel; 1: input columns, row-parallel)."""
    dst_start: int = Field(ge=0)
    """Offset in the engine parameter."""
    src_start: int = Field(ge=0)
    """Offset in the full weight."""
    length: int = Field(ge=0)
    """Elements along ``dim``."""


class ShardZero(Frozen):
    """Rows of an engine parameter that must be zero (vocabulary padding)."""

    dst: str
    """Engine parameter name."""
    dst_start: int = Field(ge=0)
    """First padding row."""
    length: int = Field(ge=0)
    """Padding rows."""


class ShardPlan(Frozen):
    """Everything that builds one rank's shard."""

    tp: int = Field(ge=1)
    """TP degree."""
    rank: int = Field(ge=0)
    """Rank inside the TP group."""
    shapes: dict[str, tuple[int, ...]]
    """Engine parameter name -> shape on this rank."""
    copies: tuple[ShardCopy, ...]
    """Copies from the full weights."""
    zeros: tuple[ShardZero, ...]
    """Padding to zero."""


def full_weight_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Hugging Face names and shapes of one full weight copy of ``spec``."""
    h, d, inter = spec.hidden_size, spec.head_dim, spec.intermediate_size
    q, kv = spec.num_attention_heads * d, spec.num_kv_heads * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (spec.vocab_size, h)}
    for i in range(spec.num_layers):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.input_layernorm.weight": (h,),
            f"{p}.self_attn.q_proj.weight": (q, h),
            f"{p}.self_attn.k_proj.weight": (kv, h),
            f"{p}.self_attn.v_proj.weight": (kv, h),
            f"{p}.self_attn.o_proj.weight": (h, q),
            f"{p}.post_attention_layernorm.weight": (h,),
            f"{p}.mlp.gate_proj.weight": (inter, h),
            f"{p}.mlp.up_proj.weight": (inter, h),
            f"{p}.mlp.down_proj.weight": (h, inter),
        }
    shapes["model.norm.weight"] = (h,)
    if not spec.tie_word_embeddings:
        shapes["lm_head.weight"] = (spec.vocab_size, h)
    return shapes


def shard_plan(spec: ModelSpec, tp: int, rank: int) -> ShardPlan:
    """The copies that build rank ``rank``'s shard at ``tp`` from a full weight copy (vLLM layouts)."""
    lay = TpLayout.of(spec, tp)
    lay.check_rank(rank)
    h, d = spec.hidden_size, lay.head_dim
    ql, kl, il = lay.heads_local * d, lay.kv_heads_local * d, lay.intermediate_local
    kv_start = lay.kv_shard(rank) * kl
    shapes: dict[str, tuple[int, ...]] = {}
    copies: list[ShardCopy] = []
    zeros: list[ShardZero] = []

    def vocab(dst: str, src: str) -> None:
        start, end = lay.vocab_rows(rank, spec.vocab_size)
        shapes[dst] = (lay.vocab_local, h)
        copies.append(ShardCopy(dst=dst, src=src, dim=0, dst_start=0, src_start=start, length=end - start))
        if end - start < lay.vocab_local:
            zeros.append(ShardZero(dst=dst, dst_start=end - start, length=lay.vocab_local - (end - start)))

    def replicated(name: str) -> None:
        shapes[name] = (h,)
        copies.append(ShardCopy(dst=name, src=name, dim=0, dst_start=0, src_start=0, length=h))

    vocab("model.embed_tokens.weight", "model.embed_tokens.weight")
    for i in range(spec.num_layers):
        p = f"model.layers.{i}"
        a, m = f"{p}.self_attn", f"{p}.mlp"
        replicated(f"{p}.input_layernorm.weight")
        replicated(f"{p}.post_attention_layernorm.weight")
        shapes[f"{a}.qkv_proj.weight"] = (ql + 2 * kl, h)
        copies += [
            ShardCopy(
                dst=f"{a}.qkv_proj.weight",
                src=f"{a}.q_proj.weight",
                dim=0,
                dst_start=0,
                src_start=rank * ql,
                length=ql,
            ),
            ShardCopy(
                dst=f"{a}.qkv_proj.weight",
                src=f"{a}.k_proj.weight",
                dim=0,
                dst_start=ql,
                src_start=kv_start,
                length=kl,
            ),
            ShardCopy(
                dst=f"{a}.qkv_proj.weight",
                src=f"{a}.v_proj.weight",
                dim=0,
                dst_start=ql + kl,
                src_start=kv_start,
                length=kl,
            ),
        ]
        shapes[f"{a}.o_proj.weight"] = (h, ql)
        copies.append(
            ShardCopy(
                dst=f"{a}.o_proj.weight",
                src=f"{a}.o_proj.weight",
                dim=1,
                dst_start=0,
                src_start=rank * ql,
                length=ql,
            )
        )
        shapes[f"{m}.gate_up_proj.weight"] = (2 * il, h)
        copies += [
            ShardCopy(
                dst=f"{m}.gate_up_proj.weight",
                src=f"{m}.gate_proj.weight",
                dim=0,
                dst_start=0,
                src_start=rank * il,
                length=il,
            ),
            ShardCopy(
                dst=f"{m}.gate_up_proj.weight",
                src=f"{m}.up_proj.weight",
                dim=0,
                dst_start=il,
                src_start=rank * il,
                length=il,
            ),
        ]
        shapes[f"{m}.down_proj.weight"] = (h, il)
        copies.append(
            ShardCopy(
                dst=f"{m}.down_proj.weight",
                src=f"{m}.down_proj.weight",
                dim=1,
                dst_start=0,
                src_start=rank * il,
                length=il,
            )
        )
    replicated("model.norm.weight")
    if not spec.tie_word_embeddings:
        vocab("lm_head.weight", "lm_head.weight")
    return ShardPlan(tp=tp, rank=rank, shapes=shapes, copies=tuple(copies), zeros=tuple(zeros))


def check_full_weights(spec: ModelSpec, full: Mapping[str, torch.Tensor]) -> None:
    """Raise when ``full`` lacks a weight of ``spec`` or has one of the wrong shape (names the weight)."""
    for name, shape in full_weight_shapes(spec).items():
        if name not in full:
            raise KeyError(f"full weights lack {name!r} (model {spec.name!r}); is the checkpoint for this model?")
        if tuple(full[name].shape) != shape:
            raise ValueError(
                f"full weight {name!r} has shape {tuple(full[name].shape)}, model {spec.name!r} needs {shape}"
            )


def apply_plan(plan: ShardPlan, full: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor]) -> int:
    """Execute ``plan``: copy narrowed views of ``full`` into ``params`` in place; returns bytes copied.

    Both sides stay on their own devices (no host round trip when both are on the same GPU)."""
    copied = 0
    for c in plan.copies:
        src = full[c.src].narrow(c.dim, c.src_start, c.length)
        params[c.dst].narrow(c.dim, c.dst_start, c.length).copy_(src)
        copied += src.numel() * src.element_size()
    for z in plan.zeros:
        params[z.dst].narrow(0, z.dst_start, z.length).zero_()
    return copied


def plan_mismatches(plan: ShardPlan, full: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor]) -> list[str]:
    """Engine parameters that differ, bit for bit, from what :func:`apply_plan` writes (sorted names; empty
    when the shard is exactly the plan's slices of ``full`` and its padding is zero)."""
    bad: set[str] = set()
    with torch.no_grad():
        for c in plan.copies:
            want = full[c.src].narrow(c.dim, c.src_start, c.length)
            if not torch.equal(params[c.dst].narrow(c.dim, c.dst_start, c.length), want):
                bad.add(c.dst)
        for z in plan.zeros:
            if bool(params[z.dst].narrow(0, z.dst_start, z.length).ne(0).any()):
                bad.add(z.dst)
    return sorted(bad)


def slice_shard(spec: ModelSpec, full: Mapping[str, torch.Tensor], tp: int, rank: int) -> dict[str, torch.Tensor]:
    """New tensors holding rank ``rank``'s shard at ``tp`` (same device and dtype as ``full``)."""
    check_full_weights(spec, full)
    plan = shard_plan(spec, tp, rank)
    ref = full["model.embed_tokens.weight"]
    out = {name: torch.empty(shape, dtype=ref.dtype, device=ref.device) for name, shape in plan.shapes.items()}
    apply_plan(plan, full, out)
    return out
