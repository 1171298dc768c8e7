"""Named presets: the product's choices of `SinqConfig` and `GraphConfig` fields, in the library.

``sinq-export model`` and ``export_causal_lm(src, out)`` (no configs) both export with the
``default`` preset, so Python and the command line write the same folder; a flag of the CLI
overrides one field of the preset it names (``--preset``). Why each preset holds what it holds,
and the measurements that chose it: docs/presets.md.

A preset is plain data: the fields it sets (``sinq``, ``graph``) and the few rules that derive
the fields it leaves open from the ones that are set (a narrow head is calibrated in finer
groups; calibrating every linear gives each its own t; a head that must be calibrated on text
stays 8-bit, and the table with it, when the model has no tokenizer). `Preset.configs` applies
them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .config import ACCURACY_AUTO, ConfigError, GraphConfig, SinqConfig
from .folders import read_config
from .models import missing_tokenizer

DEFAULT_PRESET = "default"


@dataclass(frozen=True)
class Preset:
    """Fields of `SinqConfig` / `GraphConfig` a preset sets, and the rules for those it leaves open.

    Attributes:
        name / summary: the name ``--preset`` takes and its one line in ``--help``.
        sinq / graph: `SinqConfig` / `GraphConfig` fields this preset sets (the rest keep the
            dataclasses' defaults, or follow the rules below).
        shared_col_scale: ``SinqConfig.shared_col_scale`` when ``sinq`` does not set it and the
            decoder is calibration-free; ``calibrated_shared_col_scale`` when it is calibrated.
        narrow_head_group_size: ``lm_head_group_size`` of a head narrower than 8 bits when
            ``sinq`` does not set it (such a head is also calibrated unless ``sinq`` says
            otherwise; an 8-bit or wider head keeps ``group_size`` and is not calibrated).
        no_tokenizer_head_bits: the head's width when it would be calibrated by this rule but
            the model folder has no tokenizer to make calibration text with.
        tie_o_proj: fill ``SinqConfig.o_proj_tie`` from the model's config.json.
    """

    name: str
    summary: str
    sinq: Mapping[str, Any] = field(default_factory=dict)
    graph: Mapping[str, Any] = field(default_factory=dict)
    shared_col_scale: str = "mlp"
    calibrated_shared_col_scale: str = "none"
    narrow_head_group_size: int = 32
    no_tokenizer_head_bits: int = 8
    tie_o_proj: bool = False

    def override(self, sinq: Mapping[str, Any] | None = None,
                 graph: Mapping[str, Any] | None = None, tie_o_proj: bool | None = None) -> Preset:
        """This preset with some fields set explicitly (what a CLI flag does)."""
        return replace(self, sinq={**self.sinq, **(sinq or {})},
                       graph={**self.graph, **(graph or {})},
                       tie_o_proj=self.tie_o_proj if tie_o_proj is None else tie_o_proj)

    def configs(self, model_dir: str | Path | None = None
                ) -> tuple[SinqConfig, GraphConfig, list[str]]:
        """(quantization config, graph config, warnings) for the model in ``model_dir``.

        Without ``model_dir`` the rules that read the model folder (tokenizer, attention
        heads) are not applied.
        """
        fields, graph = dict(self.sinq), dict(self.graph)
        if "shared_col_scale" not in fields:
            fields["shared_col_scale"] = (self.calibrated_shared_col_scale
                                          if fields.get("calibrate") else self.shared_col_scale)
        head_bits = fields.get("lm_head_bits")
        narrow_head = head_bits is not None and head_bits < 8
        if narrow_head and "lm_head_group_size" not in fields:
            fields["lm_head_group_size"] = self.narrow_head_group_size
        warnings = []
        if "calibrate_head" not in fields:
            fields["calibrate_head"] = narrow_head
            if narrow_head and model_dir is not None and _missing_tokenizer(model_dir):
                fields.update(calibrate_head=False, lm_head_bits=self.no_tokenizer_head_bits)
                if self.no_tokenizer_head_bits >= 8:
                    fields["lm_head_group_size"] = self.sinq.get("lm_head_group_size")
                # a tied head and a table of one width ship as one table, which is both
                # smaller and better than the head beside a calibration-free narrower table
                table_bits = graph.get("embedding_bits")
                if table_bits is not None and table_bits < self.no_tokenizer_head_bits:
                    graph["embedding_bits"] = self.no_tokenizer_head_bits
                warnings.append(f"the lm_head stays {self.no_tokenizer_head_bits}-bit (a table "
                                f"narrower than it too): calibrating the {self.name} preset's "
                                f"{head_bits}-bit head needs the tokenizer")
        config = SinqConfig(**fields)
        if self.tie_o_proj and model_dir is not None:
            config = config.tie_o_proj_for(read_config(Path(model_dir)))
        return config, GraphConfig(**graph), warnings


def _missing_tokenizer(model_dir: str | Path) -> bool:
    return missing_tokenizer(Path(model_dir)) is not None


_DEFAULT = Preset(
    DEFAULT_PRESET,
    "4-bit SINQ in 32-wide groups, int8 activations where measured safe, a 4-bit head "
    "calibrated on text, a 4-bit embedding table (one with a tied head)",
    sinq={"group_size": 32, "lm_head_bits": 4},
    graph={"accuracy_level": ACCURACY_AUTO, "col_scale": "fold", "embedding_bits": 4},
)

PRESETS: dict[str, Preset] = {p.name: p for p in (
    _DEFAULT,
    replace(_DEFAULT, name="small",
            summary="the smallest: the default in 64-wide groups (~8 % fewer bytes, higher "
                    "perplexity)",
            sinq={**_DEFAULT.sinq, "group_size": 64}),
    replace(_DEFAULT, name="exact",
            summary="the default at accuracy level 0: fp32 activations, ~2x slower decode",
            graph={**_DEFAULT.graph, "accuracy_level": 0}),
    replace(_DEFAULT, name="calibrated",
            summary="the default with every linear calibrated (A-SINQ + GPTQ on Wikipedia text)",
            sinq={**_DEFAULT.sinq, "calibrate": True}),
    # onnxruntime-web's WebGPU EP fuses norm + gate/up + SiLU into one MatMulNBitsMlp only for
    # 4-bit g32 MatMulNBits without zero points that read the norm directly; one t for q/k/v
    # packs them into one node (GQA's packed form, as in the genai builder's model) and the
    # tied o_proj t leaves no Mul in front of o_proj; the fusion also needs gate and up at one
    # accuracy level, which "auto" gives them (it chooses per shared-input group), and a model
    # whose int8 activations fail its validator still runs exact; its 8-bit table is the
    # configuration measured in the browser (docs/runtimes.md), read by standard ops because
    # transformers.js's own onnxruntime-web build has no GatherBlockQuantized kernel
    replace(_DEFAULT, name="web",
            summary="for browsers (onnxruntime-web's WebGPU, transformers.js): the default "
                    "with symmetric 4-bit g32 codes and one t per block input, which the "
                    "WebGPU fused MLP kernel needs, and an 8-bit table in standard ops",
            sinq={**_DEFAULT.sinq, "symmetric": True, "shared_col_scale": "all"},
            graph={**_DEFAULT.graph, "embedding_bits": 8, "table_ops": "standard"},
            tie_o_proj=True),
)}


def get_preset(preset: str | Preset) -> Preset:
    """The preset named ``preset`` (or ``preset`` itself)."""
    if isinstance(preset, Preset):
        return preset
    try:
        return PRESETS[preset]
    except KeyError:
        raise ConfigError(f"preset {preset!r} is not one of {', '.join(PRESETS)}") from None
