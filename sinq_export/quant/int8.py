"""onnxruntime's int8 activations (MatMulNBits ``accuracy_level`` 4) emulated in PyTorch, and the
error they add to one linear layer.

What the CPU kernel does (MLAS ``QuantizeARow_CompInt8``, the x86 AVX2/AVX512 and Arm paths
alike): each row of the input ``A [M, K]`` is cut into blocks of the node's ``block_size``
along K (the weight's group size; a last partial block is zero-padded); every block is
quantized symmetrically to int8 with its own scale ``absmax / 127``, as
``round_half_even(a * (127 / absmax))`` in float32 (an all-zero block gets scale 0); the
int8 codes are multiplied with the integer weight codes and each block's partial sum is scaled
by ``scale_a * scale_w``. Up to float summation order that is ``dequant(A) @ W_hat^T``, which
`int8_activations` computes (tests/test_int8.py checks it against a real onnxruntime session).

Why it matters: a block holding one large activation (a "massive" channel, Gemma's
``sqrt(hidden)``-scaled embeddings) gives every other entry of the block a step of
``absmax / 127``, so the small channels lose most of their bits. `int8_error` measures that
per layer on real inputs, which is how the export chooses a layer's accuracy level
(`export.accuracy`). Taking the few loudest channels out of the int8 input (multiplied in
float beside the node, LLM.int8()'s decomposition, arXiv 2208.07339) gives the rest their bits
back: `loudest_channels`, ``int8_activations(..., exact_channels=)``.
"""

from __future__ import annotations

import torch

INT8_MAX = 127.0


def int8_activations(x: torch.Tensor, block: int,
                     exact_channels: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K]`` as MatMulNBits at accuracy level 4 sees it: float32, blocks of ``block``
    along K quantized to int8 (scale ``absmax / 127``, round half to even) and dequantized.

    ``exact_channels`` (indices into K): channels the graph takes out of the node's input
    (zeroed there) and multiplies in float beside it (`loudest_channels`); they come back
    unquantized, and the rest of their blocks is quantized without them.
    """
    if block < 1:
        raise ValueError(f"block={block} must be >= 1")
    x = x.float()
    if exact_channels is not None and len(exact_channels):
        mask = int8_mask(x.shape[-1], exact_channels)
        return torch.where(mask == 0, x, int8_activations(x * mask, block))
    k = x.shape[-1]
    pad = (-k) % block
    xb = torch.nn.functional.pad(x, (0, pad)).reshape(*x.shape[:-1], (k + pad) // block, block)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, INT8_MAX / amax, torch.zeros_like(amax))  # float32, as MLAS
    q = torch.round(xb * inv)  # round half to even (MLAS: _MM_ROUND_NEAREST)
    out = q * (amax / INT8_MAX)
    return out.reshape(*x.shape[:-1], k + pad)[..., :k]


def int8_mask(k: int, exact_channels: torch.Tensor | list[int]) -> torch.Tensor:
    """float32 ``[k]``: 0 at the exact channels, 1 elsewhere (what the graph multiplies the
    node's input by)."""
    mask = torch.ones(k)
    mask[torch.as_tensor(exact_channels, dtype=torch.long)] = 0.0
    return mask


def loudest_channels(x: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` input channels of largest RMS over the rows of ``x [..., K]``, ascending
    (int64): the ones whose absmax sets their blocks' int8 step."""
    rms = x.reshape(-1, x.shape[-1]).float().square().mean(0)
    return torch.sort(rms.topk(min(count, rms.numel())).indices).values


def relative_error(ref: torch.Tensor, test: torch.Tensor) -> float:
    """``max |test - ref| / max |ref|``: the validator's layer metric (`validate.metrics`)."""
    return _relative_to(test - ref, ref)


def _relative_to(error: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |error| / max |ref|`` (0 for empty tensors)."""
    if not ref.numel():
        return 0.0
    return float(error.abs().max()) / max(float(ref.abs().max()), 1e-30)


@torch.no_grad()
def int8_error(x: torch.Tensor, weight: torch.Tensor, block: int,
               col_scale: torch.Tensor | None = None,
               reference: torch.Tensor | None = None) -> float:
    """The error int8 activations add to the linear ``x -> (x * t) @ weight^T``, relative to
    its output (`relative_error`), for inputs ``x [..., K]`` and node block size ``block``.

    ``weight`` is what the node multiplies by (``(Q - z) * s``, or the float weight over ``t``);
    ``col_scale`` is the ``t`` applied to the activations before the node (folded into a norm
    or not, the node's input is ``x * t``), None when there is none. ``reference``: that
    output (without bias) where a forward already computed it, else it is computed here.

    The error is one product, the rounding of the input times the weight: the difference of
    two outputs would cost a second product and lose the small error to cancellation.
    """
    x = x.reshape(-1, x.shape[-1]).float()
    if col_scale is not None:
        x = x * col_scale.float()
    w = weight.float()
    error = (int8_activations(x, block) - x) @ w.T
    ref = x @ w.T if reference is None else reference.reshape(-1, w.shape[0])
    return _relative_to(error, ref)
