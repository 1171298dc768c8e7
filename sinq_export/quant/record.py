"""`QuantizedWeight`: the one record every stage after the quantizer consumes.

The quantizer produces it; `SinqLinear` computes with it; the ONNX exporter turns its tensors
into initializers unchanged; the custom op's NumPy reference and the validator read it.
Nobody re-derives the layout: the packed tensors are exactly what MatMulNBits reads.

Dequantisation (what every backend computes):
    W_hat[n, k] = (Q[n, k] - z[n, k // g]) * s[n, k // g] * t[k]
and a linear layer is  y = (x * t) @ ((Q - z) * s).T + b.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from . import packing


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """A SINQ/RTN-quantized ``[N, K]`` weight in MatMulNBits layout.

    Attributes:
        packed: uint8 ``[N, n_blocks, group_size*bits/8]`` codes (see `packing`).
        scales: float32 ``[N, n_blocks]``; the Sinkhorn row scale is already folded in.
        zero_points: uint8 ``[N, ceil(n_blocks*bits/8)]`` packed integer zero points.
        col_scale: float32 ``[K]`` per-input-channel scale ``t``, or None when it is all ones
            (RTN), so the exporter emits no ``Mul``.
        bits, group_size: code width and block size along K.
        shape: ``(N, K)`` of the original weight.
    """

    packed: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor
    col_scale: torch.Tensor | None
    bits: int
    group_size: int
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        n, k = self.shape
        nb = packing.n_blocks(k, self.group_size)
        expected = {
            "packed": (n, nb, packing.packed_block_bytes(self.group_size, self.bits)),
            "scales": (n, nb),
            "zero_points": (n, packing.packed_zero_point_bytes(nb, self.bits)),
        }
        for name, shape in expected.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"QuantizedWeight.{name} has shape {got}, expected {shape}")
        if self.col_scale is not None and tuple(self.col_scale.shape) != (k,):
            raise ValueError(f"col_scale has shape {tuple(self.col_scale.shape)}, expected ({k},)")

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def n_blocks(self) -> int:
        return packing.n_blocks(self.in_features, self.group_size)

    def codes(self) -> torch.Tensor:
        """Integer codes ``[N, K]`` (uint8)."""
        return packing.unpack_codes(self.packed, self.bits, self.group_size, self.in_features)

    def zeros(self) -> torch.Tensor:
        """Integer zero points ``[N, n_blocks]`` (uint8)."""
        return packing.unpack_zero_points(self.zero_points, self.bits, self.n_blocks)

    def dequantize_grouped(self) -> torch.Tensor:
        """``(Q - z) * s`` as float32 ``[N, K]``: the matrix MatMulNBits multiplies by.

        The column scale is *not* applied: it acts on the activations (``x * t``), which is how
        the graph computes it and why the PyTorch reference does the same.
        """
        n, k = self.shape
        g = self.group_size
        nb = self.n_blocks
        q = torch.zeros(n, nb * g, dtype=torch.float32)
        q[:, :k] = self.codes().to(torch.float32)
        q = q.reshape(n, nb, g)
        w = (q - self.zeros().to(torch.float32).unsqueeze(-1)) * self.scales.float().unsqueeze(-1)
        return w.reshape(n, nb * g)[:, :k]

    def dequantize_columns(self, columns: torch.Tensor, rows: int = 4096) -> torch.Tensor:
        """``dequantize_grouped()[:, columns]`` a slab of ``rows`` rows at a time: no
        ``[N, K]`` float copy of a large head."""
        parts = []
        for start in range(0, self.out_features, rows):
            part = slice(start, start + rows)
            slab = replace(
                self, packed=self.packed[part], scales=self.scales[part],
                zero_points=self.zero_points[part],
                shape=(min(rows, self.out_features - start), self.in_features))
            parts.append(slab.dequantize_grouped()[:, columns])
        return torch.cat(parts)

    def dequantize(self) -> torch.Tensor:
        """The full reconstruction ``W_hat = (Q - z) * s * t`` as float32 ``[N, K]``."""
        w = self.dequantize_grouped()
        return w if self.col_scale is None else w * self.col_scale.float()

    def nbytes(self) -> int:
        """Bytes of the stored tensors (codes + scales + zero points + column scale)."""
        tensors = [self.packed, self.scales, self.zero_points]
        if self.col_scale is not None:
            tensors.append(self.col_scale)
        return sum(t.numel() * t.element_size() for t in tensors)
