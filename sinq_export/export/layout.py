"""Record -> the NumPy arrays that become a quantized node's initializers.

`packing` is the only module that knows the byte layout; this module only decides *which*
width the graph stores (the record's own, or a stock container for runtime=stock) and asks
`packing` to re-pack. For the record's own width the arrays are the record's tensors, byte for
byte (no copy of meaning, only a ``.numpy()`` view).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..contract import CUSTOM_DOMAIN, CUSTOM_OP, STOCK_DOMAIN, STOCK_OP
from ..quant import packing
from ..quant.record import QuantizedWeight


@dataclass(frozen=True)
class NodeChoice:
    """Which op and storage width one quantized linear gets in the graph."""

    op: str  # STOCK_OP or CUSTOM_OP
    domain: str
    container_bits: int  # bits the packed tensors are stored with
    fused_col_scale: bool  # t is an input of the custom op (no separate Mul)


def choose_node(bits: int, runtime: str, col_scale_mode: str) -> NodeChoice:
    """Stock MatMulNBits wherever it can run the layer; our custom op only where needed.

    runtime='stock': MatMulNBits, 3/5/6/7-bit codes re-packed into 4/8-bit containers (same
    numbers, no size gain). runtime='custom': the custom op for widths stock cannot run and
    for col_scale='fused'; 2/4/8-bit layers without fusion keep onnxruntime's (faster, tuned)
    MatMulNBits kernels.
    """
    if runtime == "custom" and (bits not in packing.STOCK_BITS or col_scale_mode == "fused"):
        return NodeChoice(CUSTOM_OP, CUSTOM_DOMAIN, bits, col_scale_mode == "fused")
    return NodeChoice(STOCK_OP, STOCK_DOMAIN, packing.container_bits(bits), False)


@dataclass(frozen=True)
class QuantTensors:
    packed: np.ndarray  # uint8 [N, n_blocks, block_size*bits/8]
    scales: np.ndarray  # float32 [N, n_blocks]
    zero_points: np.ndarray  # uint8 [N, ceil(n_blocks*bits/8)]
    bits: int


def quant_tensors(record: QuantizedWeight, container_bits: int) -> QuantTensors:
    """The record's tensors, re-packed into ``container_bits`` when that differs from its bits."""
    scales = record.scales.detach().cpu().float().numpy()
    if container_bits == record.bits:
        return QuantTensors(record.packed.cpu().numpy(), scales, record.zero_points.cpu().numpy(),
                            record.bits)
    if container_bits < record.bits:
        raise ValueError(f"cannot store {record.bits}-bit codes in {container_bits} bits")
    codes = record.codes()
    packed = packing.pack_codes(codes, container_bits, record.group_size)
    zeros = packing.pack_zero_points(record.zeros(), container_bits)
    return QuantTensors(packed.numpy(), scales, zeros.numpy(), container_bits)
