"""Parity validator: does the exported ONNX model compute what the PyTorch SINQ model computes?

`validate(out_dir)` reads an export folder (see ``docs/export-format.md``), feeds identical
real-text tokens to the PyTorch reference (``OUT_DIR/reference``, `SinqLinear` modules) and to
onnxruntime on each requested execution provider, and compares:

* end to end, on the logits of a prefill of ``tokens`` tokens (empty past) followed by
  ``decode_steps`` greedy decode steps through the KV cache (the token fed at each step is
  the reference's argmax, fed to both): max / mean abs error, relative error
  (max abs error / range of the reference logits), cosine similarity per token, top-1
  agreement, KL(torch || ort) per token, and the perplexity of both on the prefill tokens;
* layer by layer, for every quantized linear (all steps, all tokens):
  - ``local`` error: the ONNX tensor ``onnx_output`` against the reference layer applied to
    the *same input onnxruntime gave that node* (captured from the graph). It does not
    accumulate upstream drift, so it isolates one layer: this is what is gated and what names
    the first diverging layer;
  - ``propagated`` error: ``onnx_output`` against the torch forward hook of the layer (the
    drift accumulated through the network; reported, not gated).

Without ``reference/`` the validator falls back to ONNX-only checks: each
MatMulNBits / SinqMatMulNBits node is compared with a NumPy dequantisation of its own
initializers (`sinq_export.quant.packing`) on captured inputs. That proves the kernels compute
what the initializers say, not that the initializers hold the PyTorch model's weights.

Tolerances depend on provider, accuracy level and dtype (`TOLERANCES`; the measurements that
justify each row are in the comment above it). A provider asked for but not
available is reported as ``skipped``, never as passed.

Layout: `providers` (names, tolerance table), `metrics`, `report`, `graph` (export folder,
ONNX sessions and layer sites), `runners` (torch and onnxruntime drivers), `core`
(`validate`), `plot`.
"""

from __future__ import annotations

from .core import (  # noqa: F401
    validate,
)
from .graph import (  # noqa: F401
    ExportInfo,
    _initializers,
    _session,
    dequantize_node,
    instrumented_copy,
    locate_layers,
    read_export,
)
from .metrics import (  # noqa: F401
    EndToEnd,
    compare_logits,
    compare_outputs,
    layer_error,
    perplexity_from_logits,
)
from .plot import (  # noqa: F401
    plot_layers,
)
from .providers import (  # noqa: F401
    CUSTOM_DOMAIN,
    EXPORT_META_FILE,
    PROVIDERS,
    QUANT_OPS,
    REFERENCE_DIR,
    TOLERANCES,
    Tolerance,
    ValidationError,
    available_providers,
    parse_providers,
    tolerance_for,
)
from .report import (  # noqa: F401
    LayerResult,
    ProviderResult,
    ValidationReport,
    format_report,
)
from .runners import (  # noqa: F401
    module_feeds,
    prefill_feed,
    run_ort_lm,
    run_ort_module,
    run_torch_lm,
    run_torch_module,
    validation_tokens,
)
