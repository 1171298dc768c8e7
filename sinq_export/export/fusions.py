"""Graph fusions on the built decoder, written as onnxscript pattern -> replacement rules.

**Packed q/k/v.** When q, k and v are three ``MatMulNBits`` on the *same* input (their column
scale ``t`` is shared and folded into ``input_layernorm``, or there is none) and feed one
``GroupQueryAttention``, they become one ``MatMulNBits`` whose rows are q's, then k's, then
v's, feeding GQA's packed-QKV form (key and value inputs empty), as onnxruntime-genai's builder
does. Decode on a small model is bound by per-node overhead as much as by bytes; this removes
two nodes per layer (four with biases) and reads the input once.

mobius' own ``PackQKVForGQA`` matches float ``MatMul`` only (our quantized nodes are in place by
then), so this is the same idea for ``MatMulNBits``. The packed tensors are ``Concat`` nodes of
the per-linear initializers, named ``<attention>.qkv_proj.<part>``; `builder.fold_constant_transposes`
turns them into lazy initializers after the weights are bound, so the export still streams and
each record is still quantized once. Every packed linear is reported (`PackedRows`) so the
manifest can give it its ``rows`` of the packed node, which is what `validate` slices.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir
from onnxscript.rewriter import MatchContext, RewriterContext, rewrite
from onnxscript.rewriter._basics import MatchFailureError
from onnxscript.rewriter._pattern_ir import ValuePattern
from onnxscript.rewriter._rewrite_rule import RewriteRuleClassBase, RewriteRuleSet
from onnxscript.rewriter.pattern import OpsetPatternBuilder, Var

from ..contract import STOCK_DOMAIN

QUANT_PARTS = ("qweight", "scales", "qzeros")
PACKED_QKV = "qkv_proj"
_SAME_ATTRS = ("K", "bits", "block_size", "accuracy_level")
GQAOutputs = tuple[ir.Value, ir.Value, ir.Value]  # output, present key, present value


@dataclass(frozen=True)
class PackedRows:
    """A linear now held by a packed node: ``owner`` prefixes its initializers, rows [start, stop)."""

    owner: str
    start: int
    stop: int


def _linear_of(value: ir.Value) -> str:
    name = value.name or ""
    if not name.endswith(".qweight"):
        raise MatchFailureError(f"{name!r} is not a quantized linear's packed codes")
    return name.removesuffix(".qweight")


def _attrs(value: ir.Value) -> dict:
    node = value.producer()
    return {k: node.attributes[k].value for k in node.attributes}


class _PackQKVBase(RewriteRuleClassBase):
    """Shared check and rewrite of the bias-free and the biased q/k/v forms."""

    def __init__(self, packed: dict[str, PackedRows]) -> None:
        super().__init__()
        self._packed = packed

    def _projection(self, op: OpsetPatternBuilder, x: Var, w: Var, s: Var) -> ValuePattern:
        # zero points (input 3) are optional: absent when all are the default
        return op.MatMulNBits(x, w, s, _domain=STOCK_DOMAIN, _allow_other_attributes=True,
                              _allow_other_inputs=True)

    def _params(self, projections: list[ir.Value]) -> list[ir.Value | None]:
        """(codes, scales, zero points or None) of q, then k, then v."""
        out: list[ir.Value | None] = []
        for p in projections:
            inputs = list(p.producer().inputs)
            out += [inputs[1], inputs[2], inputs[3] if len(inputs) > 3 else None]
        return out

    def _check(self, projections: list[ir.Value]) -> bool:
        attrs = [_attrs(p) for p in projections]
        if any({k: a.get(k) for k in _SAME_ATTRS} != {k: attrs[0].get(k) for k in _SAME_ATTRS}
               for a in attrs):
            raise MatchFailureError("q/k/v differ in K, bits, block size or accuracy level")
        if any(len(p.producer().inputs) > 4 for p in projections):
            raise MatchFailureError("a q/k/v node has inputs beyond its zero points")
        params = self._params(projections)
        if len({v is None for v in params[2::3]}) != 1:
            raise MatchFailureError("zero points on some of q/k/v only")
        for v in params:
            if v is not None and (v.producer() is not None or not v.is_initializer()):
                raise MatchFailureError(f"{v.name!r} is not an initializer")
        if len({_linear_of(w).rpartition(".")[0] for w in params[::3]}) != 1:
            raise MatchFailureError("q/k/v belong to different attention modules")
        return True

    def _packed_call(self, op: RewriterContext, x: ir.Value, biases: list[ir.Value],
                     projections: list[ir.Value], gqa_out: ir.Value) -> GQAOutputs:
        params = self._params(projections)
        linears = [_linear_of(w) for w in params[::3]]
        owner = f"{linears[0].rpartition('.')[0]}.{PACKED_QKV}"
        attrs = _attrs(projections[0])
        sizes = [int(_attrs(p)["N"]) for p in projections]
        start = 0
        for linear, n in zip(linears, sizes):
            self._packed[linear] = PackedRows(owner, start, start + n)
            start += n
        parts = [op.Concat(*params[i::3], axis=0, _outputs=[f"{owner}.{part}"])
                 for i, part in enumerate(QUANT_PARTS) if params[i] is not None]
        y = op.MatMulNBits(x, *parts, _domain=STOCK_DOMAIN, **{**attrs, "N": start})
        if biases:
            y = op.Add(y, op.Concat(*biases, axis=0, _outputs=[f"{owner}.bias"]))
        gqa = gqa_out.producer()
        out = op.GroupQueryAttention(
            y, None, None, *gqa.inputs[3:], _domain=gqa.domain, _outputs=3,
            **{k: gqa.attributes[k].value for k in gqa.attributes})
        return out[0], out[1], out[2]


class PackQKV(_PackQKVBase):
    """``GQA(MatMulNBits(x, q..), MatMulNBits(x, k..), MatMulNBits(x, v..))`` -> one packed node."""

    def pattern(self, op: OpsetPatternBuilder, x: Var, qw: Var, qs: Var, kw: Var, ks: Var,
                vw: Var, vs: Var) -> list[ValuePattern]:
        q = self._projection(op, x, qw, qs)
        k = self._projection(op, x, kw, ks)
        v = self._projection(op, x, vw, vs)
        return op.GroupQueryAttention(q, k, v, _domain=STOCK_DOMAIN, _allow_other_inputs=True,
                                      _allow_other_attributes=True,
                                      _outputs=["gqa_out", "present_key", "present_value"])

    def check(self, context: MatchContext, gqa_out: ir.Value, **_: object) -> bool:
        return self._check(list(gqa_out.producer().inputs[:3]))

    def rewrite(self, op: RewriterContext, x: ir.Value, gqa_out: ir.Value, **_: object
                ) -> GQAOutputs:
        return self._packed_call(op, x, [], list(gqa_out.producer().inputs[:3]), gqa_out)


class PackQKVWithBias(_PackQKVBase):
    """The same with ``Add(bias)`` after each projection (Qwen2): one packed ``Add``."""

    def pattern(self, op: OpsetPatternBuilder, x: Var, qw: Var, qs: Var, qb: Var, kw: Var,
                ks: Var, kb: Var, vw: Var, vs: Var, vb: Var) -> list[ValuePattern]:
        q = op.Add(self._projection(op, x, qw, qs), qb)
        k = op.Add(self._projection(op, x, kw, ks), kb)
        v = op.Add(self._projection(op, x, vw, vs), vb)
        return op.GroupQueryAttention(q, k, v, _domain=STOCK_DOMAIN, _allow_other_inputs=True,
                                      _allow_other_attributes=True,
                                      _outputs=["gqa_out", "present_key", "present_value"])

    @staticmethod
    def _projections(gqa_out: ir.Value) -> list[ir.Value]:
        return [i.producer().inputs[0] for i in gqa_out.producer().inputs[:3]]

    def check(self, context: MatchContext, qb: ir.Value | None, kb: ir.Value | None,
              vb: ir.Value | None, gqa_out: ir.Value, **_: object) -> bool:
        for b in (qb, kb, vb):
            if b is None or not b.is_initializer():
                raise MatchFailureError("a q/k/v bias is not an initializer")
        return self._check(self._projections(gqa_out))

    def rewrite(self, op: RewriterContext, x: ir.Value, qb: ir.Value, kb: ir.Value,
                vb: ir.Value, gqa_out: ir.Value, **_: object) -> GQAOutputs:
        return self._packed_call(op, x, [qb, kb, vb], self._projections(gqa_out), gqa_out)


def pack_qkv(model: ir.Model) -> dict[str, PackedRows]:
    """Apply the q/k/v packing in place; returns each packed linear's owner and rows."""
    packed: dict[str, PackedRows] = {}
    rewrite(model, pattern_rewrite_rules=RewriteRuleSet(
        [PackQKV.rule(packed), PackQKVWithBias.rule(packed)]))
    return packed


__all__ = ["PACKED_QKV", "PackedRows", "pack_qkv"]
