"""Our onnxruntime custom ops: ``sinq.ops::SinqMatMulNBits`` (version 1).

    Y[..., N] = (A[..., K] * col_scale) @ ((Q - z) * s)^T + bias

The native library (C++ CPU kernel; CUDA kernel where built) lives in ``runtime_ops/`` at the
repository root and is compiled at install time (``setup.py`` -> ``runtime_ops/build.py``) into
this package folder; a wheel carries it prebuilt, and its build script and sources (in
``_native/``), so ``python -m sinq_export.runtime_ops build`` works from any install. The library
is optional: without it everything that uses only stock onnxruntime ops works, and what needs it
(:func:`require`) fails with one line saying how to build it. This module finds it, registers it
with onnxruntime, and holds the NumPy reference implementation the tests compare against.

Typical use::

    from sinq_export import runtime_ops
    so = runtime_ops.session_options()          # onnxruntime.SessionOptions, library registered
    sess = onnxruntime.InferenceSession(path, so, providers=["CPUExecutionProvider"])

Operator contract (inputs in order; ``T`` is float32 or float16):

* ``A`` T ``[..., K]``; ``B`` uint8 ``[N, nb, bs*bits/8]`` (``nb = ceil(K/bs)``, one LSB-first
  bitstream of ``bs`` codes per block, see :mod:`sinq_export.quant.packing`);
  ``scales`` T ``[N, nb]``; ``zero_points`` uint8 ``[N, ceil(nb*bits/8)]``, optional, default
  ``2^(bits-1)``; ``col_scale`` T ``[K]``, optional; ``bias`` T ``[N]``, optional.
* attributes ``K``, ``N``, ``bits`` (2..8), ``block_size`` (power of two, 16..2048).
* For bits 2/4/8 this is exactly ``Mul(A, col_scale)`` -> ``com.microsoft::MatMulNBits``
  (+ ``Add(bias)``) on the same initializers.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import contract

if TYPE_CHECKING:
    from ..quant.record import QuantizedWeight

DOMAIN = contract.CUSTOM_DOMAIN
OP_TYPE = contract.CUSTOM_OP
OPSET_VERSION = contract.CUSTOM_OPSET_VERSION
SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)
LIB_NAME = contract.CUSTOM_OP_LIBRARY
CUDA_LIB_NAME = contract.CUSTOM_OP_CUDA_LIBRARY
INPUT_NAMES = contract.CUSTOM_OP_INPUTS

_PKG_DIR = Path(__file__).resolve().parent
_REPO_ROOT = _PKG_DIR.parent.parent
# A source checkout builds from runtime_ops/ at the root; a wheel/sdist install from the copy
# setup.py puts into the package (same files).
_BUILD_SCRIPTS = (_REPO_ROOT / "runtime_ops" / "build.py", _PKG_DIR / "_native" / "build.py")
BUILD_COMMAND = "python -m sinq_export.runtime_ops build"


def build_hint() -> str:
    """One sentence: how to build the library on *this* machine (the Debian route only where apt is)."""
    debian = (
        ", or with no ORT_INCLUDE_DIR it fetches Debian's libonnxruntime-dev headers with apt-get"
        if shutil.which("apt-get")
        else ""
    )
    return (
        f"build it with `{BUILD_COMMAND}` (needs a C++ compiler and onnxruntime's C/C++ API headers: "
        f"set ORT_INCLUDE_DIR to a folder with onnxruntime_cxx_api.h, e.g. include/ of an onnxruntime "
        f"release archive{debian}), or set SINQ_OPS_LIBRARY to a library built elsewhere"
    )


class RuntimeOpsUnavailable(RuntimeError):
    """The custom-op library is missing or cannot be loaded into this onnxruntime."""


# --------------------------------------------------------------------------------------------
# Library location, build, registration
# --------------------------------------------------------------------------------------------
def _candidates(cuda: bool) -> list[Path]:
    name = CUDA_LIB_NAME if cuda else LIB_NAME
    env = os.environ.get("SINQ_OPS_CUDA_LIBRARY" if cuda else "SINQ_OPS_LIBRARY")
    out = [Path(env)] if env else []
    return out + [_PKG_DIR / name]


def library_path(*, cuda: bool = False) -> Path:
    """Path of the built library (``cuda=True``: the CUDA-enabled variant).

    Raises :class:`RuntimeOpsUnavailable` with build instructions when it is missing.
    """
    for cand in _candidates(cuda):
        if cand.is_file():
            return cand
    what = "CUDA-enabled sinq.ops library" if cuda else "sinq.ops custom-op library"
    extra = (
        " (the CUDA variant is built only where nvcc and an onnxruntime with the CUDA provider "
        "are present, or with SINQ_OPS_CUDA=1)"
        if cuda
        else ""
    )
    looked = ", ".join(map(str, _candidates(cuda)))
    raise RuntimeOpsUnavailable(f"the {what} is not built (looked for {looked}); {build_hint()}{extra}")


def require(what: str) -> Path:
    """The library path, or :class:`RuntimeOpsUnavailable` saying that ``what`` needs it and how
    to build it: called up front, before any work, by everything that emits or runs sinq.ops."""
    if is_available():
        return library_path()
    raise RuntimeOpsUnavailable(f"{what} needs the sinq.ops custom-op library, which is not built: "
                                f"{build_hint()}")


def is_available(*, cuda: bool = False) -> bool:
    try:
        library_path(cuda=cuda)
    except RuntimeOpsUnavailable:
        return False
    return True


def _load_build_module():
    script = next((p for p in _BUILD_SCRIPTS if p.is_file()), None)
    if script is None:
        raise RuntimeOpsUnavailable(
            f"cannot build the custom-op library: its build script is in neither of "
            f"{', '.join(map(str, _BUILD_SCRIPTS))}; reinstall sinq-export or set SINQ_OPS_LIBRARY"
        )
    spec = importlib.util.spec_from_file_location("_sinq_ops_build", script)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("_sinq_ops_build", mod)
    spec.loader.exec_module(mod)
    return mod


def build(*, force: bool = False, cuda: bool | None = None) -> Path:
    """Compile the library into this package folder (see ``runtime_ops/build.py``)."""
    mod = _load_build_module()
    try:
        return mod.build(_PKG_DIR, force=force, cuda=cuda)
    except mod.BuildError as e:
        raise RuntimeOpsUnavailable(f"building the sinq.ops library failed: {e}") from e


def ensure_built(*, cuda: bool = False) -> Path:
    """The library path, building it first (from a source checkout) if it is missing."""
    if is_available(cuda=cuda):
        return library_path(cuda=cuda)
    build(cuda=True if cuda else None)
    return library_path(cuda=cuda)


def session_options(
    options: Any = None,
    *,
    cuda: bool = False,
    intra_op_num_threads: int | None = None,
) -> Any:
    """``onnxruntime.SessionOptions`` with the sinq.ops library registered.

    Args:
        options: existing SessionOptions to register into (default: a new one).
        cuda: register the CUDA-enabled variant (CPU + CUDA kernels); needs it built.
        intra_op_num_threads: convenience setter (the CPU kernel uses onnxruntime's intra-op
            thread pool).
    """
    import onnxruntime as ort

    so = options if options is not None else ort.SessionOptions()
    if intra_op_num_threads is not None:
        so.intra_op_num_threads = int(intra_op_num_threads)
    path = library_path(cuda=cuda)
    try:
        so.register_custom_ops_library(str(path))
    except Exception as e:  # onnxruntime raises its own Fail/RuntimeException types
        raise RuntimeOpsUnavailable(
            f"onnxruntime {ort.__version__} could not load {path}: {e}. The library may be "
            f"built for another onnxruntime/CPU, or be corrupt. Rebuild it with "
            f"`{BUILD_COMMAND} --force`"
        ) from e
    return so


def cuda_provider_available() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


# --------------------------------------------------------------------------------------------
# Graph helper
# --------------------------------------------------------------------------------------------
def make_node(
    inputs: Sequence[str],
    output: str,
    *,
    K: int,
    N: int,
    bits: int,
    block_size: int,
    name: str | None = None,
):
    """An ``onnx.NodeProto`` for the op. ``inputs``: A, B, scales[, zero_points[, col_scale[,
    bias]]] — use ``""`` for an absent optional input that precedes a present one."""
    import onnx

    inputs = list(inputs)
    while inputs and inputs[-1] == "":
        inputs.pop()
    if len(inputs) < 3 or len(inputs) > 6:
        raise ValueError(f"{OP_TYPE} takes 3 to 6 inputs ({', '.join(INPUT_NAMES)}), got {inputs}")
    return onnx.helper.make_node(
        OP_TYPE,
        inputs,
        [output],
        name=name,
        domain=DOMAIN,
        K=int(K),
        N=int(N),
        bits=int(bits),
        block_size=int(block_size),
    )


# --------------------------------------------------------------------------------------------
# NumPy reference
# --------------------------------------------------------------------------------------------
def record_from_arrays(
    packed: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None,
    *,
    K: int,
    N: int,
    bits: int,
    block_size: int,
) -> QuantizedWeight:
    """The `QuantizedWeight` a quantized node's initializers hold (``zero_points`` None: the
    op's default ``2^(bits-1)``), so its one dequantizer serves the op's reference and the
    validator. ValueError when an array does not have the op's shape for ``K``/``N``/``bits``.
    The arrays are copied: an initializer read from a graph is read-only, a tensor is not."""
    import torch  # lazy for start-up time: the build command runs without importing torch

    from sinq_export.quant import packing
    from sinq_export.quant.record import QuantizedWeight

    nb = packing.n_blocks(K, block_size)
    if zero_points is None:
        zeros = torch.full((N, nb), packing.default_zero_point(bits), dtype=torch.uint8)
        zp = packing.pack_zero_points(zeros, bits)
    else:
        zp = torch.from_numpy(np.array(zero_points, dtype=np.uint8).reshape(N, -1))
    return QuantizedWeight(
        packed=torch.from_numpy(np.array(packed, dtype=np.uint8).reshape(N, nb, -1)),
        scales=torch.from_numpy(np.asarray(scales).reshape(N, nb).astype(np.float32)),
        zero_points=zp, col_scale=None, bits=bits, group_size=block_size, shape=(N, K))


def reference_sinq_matmul(
    a: np.ndarray,
    packed: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None = None,
    col_scale: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    *,
    K: int,
    N: int,
    bits: int,
    block_size: int,
) -> np.ndarray:
    """What ``SinqMatMulNBits`` computes, in NumPy (the weight through `record_from_arrays`).

    ``W = (Q - z) * s`` is formed in float32 as MatMulNBits dequantises, ``A * col_scale`` in
    A's precision as the ``Mul`` node would, the product is accumulated in float64 and the
    result returned in A's dtype.
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} not in {SUPPORTED_BITS}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size={block_size} must be a power of two >= 16")
    a = np.asarray(a)
    if a.shape[-1] != K:
        raise ValueError(f"A has shape {a.shape}; its last dimension must be K={K}")
    record = record_from_arrays(packed, scales, zero_points, K=K, N=N, bits=bits,
                                block_size=block_size)
    return _matmul(a, record.dequantize_grouped().numpy(), col_scale, bias)


def reference_from_record(a: np.ndarray, qw: QuantizedWeight, bias: np.ndarray | None = None) -> np.ndarray:
    """:func:`reference_sinq_matmul` for a :class:`~sinq_export.quant.record.QuantizedWeight`."""
    col_scale = None if qw.col_scale is None else qw.col_scale.float().numpy()
    return _matmul(np.asarray(a), qw.dequantize_grouped().numpy(), col_scale, bias)


def _matmul(a: np.ndarray, w: np.ndarray, col_scale: np.ndarray | None,
            bias: np.ndarray | None) -> np.ndarray:
    """``(A * col_scale) @ W^T + bias`` accumulated in float64, returned in A's dtype."""
    x = a if col_scale is None else a * np.asarray(col_scale, dtype=a.dtype)
    y = x.astype(np.float64) @ w.astype(np.float64).T
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float64)
    return y.astype(a.dtype if a.dtype in (np.float16, np.float32) else np.float32)


__all__ = [
    "BUILD_COMMAND",
    "CUDA_LIB_NAME",
    "DOMAIN",
    "INPUT_NAMES",
    "LIB_NAME",
    "OPSET_VERSION",
    "OP_TYPE",
    "RuntimeOpsUnavailable",
    "SUPPORTED_BITS",
    "build",
    "build_hint",
    "cuda_provider_available",
    "ensure_built",
    "is_available",
    "library_path",
    "make_node",
    "record_from_arrays",
    "reference_from_record",
    "reference_sinq_matmul",
    "require",
    "session_options",
]
