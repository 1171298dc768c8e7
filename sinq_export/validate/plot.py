"""PNG of per-layer error."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .report import ValidationReport

# ------------------------------------------------------------------------------ plot


def plot_layers(report: ValidationReport, path: str | Path) -> Path:
    """PNG of per-layer local (solid) and propagated (dashed) relative error per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 4.5))
    for p in report.providers:
        if not p.layers:
            continue
        xs = np.arange(len(p.layers))
        local = [la.local_rel if la.local_rel else np.nan for la in p.layers]
        ax.semilogy(xs, local, "-", lw=1, label=f"{p.provider} acc{p.accuracy_level}: local")
        prop = [la.propagated_rel if la.propagated_rel else np.nan for la in p.layers]
        if any(np.isfinite(prop)):
            ax.semilogy(xs, prop, "--", lw=0.8, label=f"{p.provider}: propagated (drift)")
        if p.tolerance:
            ax.axhline(p.tolerance.layer_rel, color="red", lw=0.8, ls=":",
                       label=f"{p.provider} local tolerance")
        if p.first_diverging_layer:
            i = [la.name for la in p.layers].index(p.first_diverging_layer)
            ax.annotate(p.first_diverging_layer, (i, local[i]), color="red", fontsize=8)
    ax.set_xlabel("quantized layer (graph order)")
    ax.set_ylabel("max |err| / max |ref|")
    ax.set_title(f"sinq-export validate: {report.out_dir} ({report.mode}) - {report.status}")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
