"""One frozen configuration object, validated once, passed everywhere.

The CLI builds it from flags; a Python user builds it directly. Functions take the config and
never re-parse flags, so a bad value is reported once, at construction, with its name.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

from .quant.methods import GPTQ_DAMP, MethodConfig, make_config
from .quant.methods import METHODS as _REGISTRY

QUANT_BITS = (2, 3, 4, 5, 6, 7, 8)
METHODS = tuple(_REGISTRY)  # the registered quantization methods (sinq_export.quant.methods)
RUNTIMES = ("stock", "custom")
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
# GraphConfig.accuracy_level "auto": each node's level chosen by measurement (export.accuracy)
ACCURACY_AUTO = "auto"
DTYPES = ("fp32", "fp16")
COL_SCALE_MODES = ("mul", "fold", "fused")
SHARED_COL_SCALES = ("none", "mlp", "all")  # which same-input linears share one t
CALIBRATION_DTYPES = ("auto", "float32", "bfloat16")  # precision of the calibration forwards


HEAD_PATTERN = r"(^|\.)lm_head$"  # the output projection's module name
# GPTQ damping (SinqConfig.gptq_damp): decoder linears / the output projection
DECODER_GPTQ_DAMP, HEAD_GPTQ_DAMP = 0.2, GPTQ_DAMP
# The calibration-free default (SinqConfig.energy_refit / probe_tokens): scale refits weighted
# by input energies measured on this many random token ids (docs/quality.md)
ENERGY_REFIT, PROBE_TOKENS = 3, 256


# `SinqConfig` field -> the field of a method's config (`quant.methods`) it sets. A method
# whose config lacks the target does not have that knob: setting it is refused.
METHOD_KNOBS = {
    "symmetric": "symmetric",
    "scale_search": "scale_search",
    "energy_refit": "scale_refit",
    "sinkhorn_iters": "sinkhorn_iters",
    "kurtosis_gate": "kurtosis_gate",
    "awq": "awq",
    "gptq": "gptq",
    "gptq_damp": "gptq_damp",
    "o_proj_tie": "col_scale_tie",
}


def is_head(name: str) -> bool:
    return re.search(HEAD_PATTERN, name) is not None


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def check_bits(bits: int, where: str = "bits") -> None:
    if bits not in QUANT_BITS:
        raise ConfigError(f"{where}={bits!r} is not supported; choose one of {QUANT_BITS}")


def check_group_size(group_size: int, where: str = "group_size") -> None:
    # MatMulNBits accepts power-of-two block sizes from 16 to 256.
    ok = isinstance(group_size, int) and 16 <= group_size <= 256
    if not ok or group_size & (group_size - 1):
        raise ConfigError(
            f"{where}={group_size!r} must be a power of two between 16 and 256 "
            "(MatMulNBits' block size constraint)"
        )


def _compile_all(patterns: tuple[str, ...], where: str) -> None:
    for p in patterns:
        try:
            re.compile(p)
        except re.error as exc:
            raise ConfigError(f"{where}: invalid regular expression {p!r}: {exc}") from None


@dataclass(frozen=True)
class SinqConfig:
    """Everything that decides how weights are quantized (not how the graph computes them).

    Attributes:
        bits: code width for quantized linears (2-8; stock onnxruntime runs 2/4/8).
        group_size: block size along K (power of two, 16-256).
        method: ``"sinq"`` (Sinkhorn normalisation, then RTN) or ``"rtn"`` (the baseline).
        symmetric: fixed mid-range zero point instead of min/max asymmetric quantization.
        sinkhorn_iters: normalisation iterations per tile (the paper uses 16).
        kurtosis_gate: if set, a layer whose whole-matrix kurtosis exceeds it falls back to
            RTN (the reference's default is 5.0; off by default: docs/quality.md).
        include / exclude: regular expressions matched (``re.search``) against module names.
        overrides: regex -> bits for per-layer bit widths (first match wins).
        group_overrides: regex -> group size per layer (first match wins; a bit allocation
            writes one per layer). The output projection's ``lm_head_group_size`` comes first.
        shared_col_scale: which linears that read the same input run Sinkhorn jointly, so
            they share one t that folds into the norm weight: ``"none"``, ``"mlp"``
            (gate/up: no perplexity cost) or ``"all"`` (q/k/v too, which also packs them into
            one node, at a perplexity cost; docs/quality.md).
            ``True`` / ``False`` mean ``"all"`` / ``"none"``.
        lm_head_bits: quantize the output projection to this width (None keeps it float).
        lm_head_group_size: block size for the output projection (None = ``group_size``).
        scale_search: per-group range search under the integer-zero-point constraint (None =
            on when calibrated, else the method's default, off).
        energy_refit: weighted least-squares refits of every group's scale on the min/max
            grid (`rtn.refit_params`), each weight weighted by ``t^2 E[x^2]``: its input
            channel's energy, measured on ``probe_tokens`` random token ids run through the
            float model (no text, also where the head is calibrated on text: the model's loud
            channels are a property of the model, not of the text). Calibrated linears do not
            use it. 0 = none (weight-only SINQ, no forward pass). Why: it lowers perplexity on
            every model measured, most at 3 bits (docs/quality.md).
        probe_tokens: how many random token ids (one window, fixed seed) give the energies.
        calibrate: calibrated SINQ (A-SINQ activation-aware t + GPTQ rounding) from
            ``calibration_windows`` x ``calibration_length`` tokens of the Wikipedia text that
            are disjoint from the evaluation windows (see ``calibration``);
            ``calibration_windows=None``: at least 8, more for linears wider than ~2700
            inputs; a head calibrated alone, 4 windows of 512
            (`calibration.windows.default_window_count`).
        calibration_dtype: precision of the decoder forwards that produce the calibration
            statistics (`calibration.forward.forward_dtype`): ``"auto"`` runs them in bfloat16
            autocast where the CPU multiplies bfloat16 natively (faster matmuls, the same
            perplexity within the calibration's own spread; docs/quality.md) and in float32
            elsewhere; the statistics themselves always accumulate in float32.
        calibrate_head: calibrate the output projection alone (A-SINQ + GPTQ on the final
            norm's output, the decoder quantized calibration-free and run on the calibration
            windows to produce it). Why alone: a narrow head costs much less perplexity
            calibrated than calibration-free, and it is the one layer whose calibration pays
            for a fast export (an 8-bit head is the slowest node of the graph; docs/quality.md).
            Implied by ``calibrate``.
        awq / gptq: the two calibrated steps (A-SINQ's activation-aware t, GPTQ rounding),
            each on by default when ``calibrate`` is set.
        gptq_damp: GPTQ's damping (fraction of the mean Hessian diagonal); None = 0.2 for
            decoder linears and GPTQ's own 0.01 for the output projection. Why: with 0.01 a
            decoder layer's compensation fits the calibration tokens and the error it moves
            compounds through the later blocks; the head's output is final and wants the full
            compensation (docs/quality.md).
        o_proj_tie: ``(kv_heads, heads_per_kv)`` of the model's attention, or None: tie each
            o_proj's t across the query heads that read one kv head, so the graph folds it
            into v_proj's rows instead of a Mul per layer (a small perplexity cost,
            docs/quality.md; `SinqConfig.tie_o_proj_for` fills it from a model's config.json).
        avg_bits / max_size_mb: the budget a bit allocation (``quant.allocate``) was solved
            for; the chosen widths and group sizes themselves are the ``overrides`` and
            ``group_overrides``.
    """

    bits: int = 4
    group_size: int = 64
    method: Literal["sinq", "rtn"] = "sinq"
    symmetric: bool = False
    sinkhorn_iters: int = 16
    kurtosis_gate: float | None = None
    include: tuple[str, ...] = (r".*",)
    exclude: tuple[str, ...] = (HEAD_PATTERN,)
    overrides: tuple[tuple[str, int], ...] = field(default_factory=tuple)
    group_overrides: tuple[tuple[str, int], ...] = field(default_factory=tuple)
    shared_col_scale: Literal["none", "mlp", "all"] = "none"
    lm_head_bits: int | None = None
    lm_head_group_size: int | None = None
    scale_search: bool | None = None
    energy_refit: int = ENERGY_REFIT
    probe_tokens: int = PROBE_TOKENS
    calibrate: bool = False
    calibrate_head: bool = False
    calibration_windows: int | None = None
    calibration_length: int = 512
    calibration_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    awq: bool = True
    gptq: bool = True
    gptq_damp: float | None = None
    avg_bits: float | None = None
    max_size_mb: float | None = None
    o_proj_tie: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        for name in ("overrides", "group_overrides"):
            value = getattr(self, name)
            if isinstance(value, Mapping):
                value = value.items()
            try:
                object.__setattr__(self, name, tuple((str(p), int(v)) for p, v in value))
            except (TypeError, ValueError):
                raise ConfigError(f"{name}={value!r} must be (regex, int) pairs") from None
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, (value,))
        if isinstance(self.shared_col_scale, bool):
            object.__setattr__(self, "shared_col_scale", "all" if self.shared_col_scale else "none")
        if self.shared_col_scale not in SHARED_COL_SCALES:
            raise ConfigError(f"shared_col_scale={self.shared_col_scale!r} is not one of "
                              f"{SHARED_COL_SCALES}")
        check_bits(self.bits)
        check_group_size(self.group_size)
        if self.method not in METHODS:
            raise ConfigError(f"method={self.method!r} is not one of {METHODS}")
        self._check_method_knobs()
        if not isinstance(self.sinkhorn_iters, int) or not 0 <= self.sinkhorn_iters <= 1000:
            raise ConfigError(f"sinkhorn_iters={self.sinkhorn_iters!r} must be an int in [0, 1000]")
        if self.kurtosis_gate is not None and not self.kurtosis_gate > 0:
            raise ConfigError(f"kurtosis_gate={self.kurtosis_gate!r} must be positive or None")
        _compile_all(self.include, "include")
        _compile_all(self.exclude, "exclude")
        _compile_all(tuple(p for p, _ in self.overrides), "overrides")
        for pattern, b in self.overrides:
            check_bits(b, where=f"overrides[{pattern!r}]")
        _compile_all(tuple(p for p, _ in self.group_overrides), "group_overrides")
        for pattern, g in self.group_overrides:
            check_group_size(g, where=f"group_overrides[{pattern!r}]")
        if self.lm_head_bits is not None:
            check_bits(self.lm_head_bits, where="lm_head_bits")
        if self.lm_head_group_size is not None:
            check_group_size(self.lm_head_group_size, where="lm_head_group_size")
        if self.calibrate_head and self.lm_head_bits is None:
            raise ConfigError("calibrate_head needs a quantized lm_head (lm_head_bits); "
                              "the head is kept float")
        for name in ("calibration_windows", "calibration_length"):
            value = getattr(self, name)
            if name == "calibration_windows" and value is None:
                continue  # enough for the widest calibrated linear (calibration.windows)
            if not isinstance(value, int) or not 1 <= value <= 4096:
                raise ConfigError(f"{name}={value!r} must be an int in [1, 4096]")
        if not isinstance(self.energy_refit, int) or not 0 <= self.energy_refit <= 32:
            raise ConfigError(f"energy_refit={self.energy_refit!r} must be an int in [0, 32]")
        if not isinstance(self.probe_tokens, int) or not 16 <= self.probe_tokens <= 4096:
            raise ConfigError(f"probe_tokens={self.probe_tokens!r} must be an int in [16, 4096]")
        if self.gptq_damp is not None and not (isinstance(self.gptq_damp, (int, float))
                                               and 0 < self.gptq_damp <= 100):
            raise ConfigError(f"gptq_damp={self.gptq_damp!r} must be a number in (0, 100] or None")
        if self.calibration_dtype not in CALIBRATION_DTYPES:
            raise ConfigError(f"calibration_dtype={self.calibration_dtype!r} is not one of "
                              f"{CALIBRATION_DTYPES}")
        if self.avg_bits is not None and not 2 <= self.avg_bits <= 8:
            raise ConfigError(f"avg_bits={self.avg_bits!r} must be between 2 and 8")
        # a byte count is an int: inf (or a float so large that x1e6 overflows) has none
        if self.max_size_mb is not None and not (self.max_size_mb > 0
                                                 and math.isfinite(self.max_size_mb * 1e6)):
            raise ConfigError(f"max_size_mb={self.max_size_mb!r} must be a positive, finite "
                              "number of megabytes")
        if self.o_proj_tie is not None:
            tie = tuple(self.o_proj_tie)
            if len(tie) != 2 or not all(isinstance(v, int) and v >= 1 for v in tie):
                raise ConfigError(f"o_proj_tie={self.o_proj_tie!r} must be (kv_heads, "
                                  "heads_per_kv), two positive ints")
            object.__setattr__(self, "o_proj_tie", tie)

    def _check_method_knobs(self) -> None:
        """Refuse a knob set away from its default that the method does not have (e.g.
        ``sinkhorn_iters`` for ``rtn``): it would be silently ignored."""
        known = {f.name for f in fields(_REGISTRY[self.method].config)}
        defaults = {f.name: f.default for f in fields(SinqConfig)}
        for knob, target in METHOD_KNOBS.items():
            value = getattr(self, knob)
            if target not in known and value != defaults[knob]:
                raise ConfigError(f"{knob}={value!r} does not apply to method {self.method!r} "
                                  f"(it has no {target!r} setting)")

    def tie_o_proj_for(self, model_config: Mapping[str, Any]) -> SinqConfig:
        """This config with ``o_proj_tie`` from a model's config.json (its attention heads)."""
        heads = model_config.get("num_attention_heads")
        kv = model_config.get("num_key_value_heads") or heads
        if not isinstance(heads, int) or not isinstance(kv, int) or kv < 1 or heads % kv:
            raise ConfigError("o_proj_tie: config.json has no usable num_attention_heads / "
                              "num_key_value_heads")
        return self.replace(o_proj_tie=(kv, heads // kv))

    def bits_for(self, name: str) -> int | None:
        """Bit width for module ``name``, or None when it stays in float."""
        if self.lm_head_bits is not None and is_head(name):
            return self.lm_head_bits
        if not any(re.search(p, name) for p in self.include):
            return None
        if any(re.search(p, name) for p in self.exclude):
            return None
        for pattern, b in self.overrides:
            if re.search(pattern, name):
                return b
        return self.bits

    def group_size_for(self, name: str) -> int:
        """Block size for module ``name`` (the output projection may use finer groups)."""
        if self.lm_head_group_size is not None and is_head(name):
            return self.lm_head_group_size
        for pattern, g in self.group_overrides:
            if re.search(pattern, name):
                return g
        return self.group_size

    @property
    def needs_calibration(self) -> bool:
        """Whether quantizing needs the calibration windows run through the model."""
        return self.calibrate or self.calibrate_head

    @property
    def budgeted(self) -> bool:
        """Whether a bit allocation picks the widths (``avg_bits`` / ``max_size_mb``)."""
        return self.avg_bits is not None or self.max_size_mb is not None

    def is_calibrated(self, name: str) -> bool:
        """Whether module ``name`` is quantized on calibration statistics."""
        return self.calibrate or (self.calibrate_head and is_head(name))

    def search_scales(self, name: str) -> bool | None:
        """`scale_search` or its default for module ``name``: on when it is calibrated (the
        search then weighs each weight by its input's E[x^2], which pays), else the method's
        own default."""
        if self.scale_search is not None:
            return self.scale_search
        return True if self.is_calibrated(name) else None

    def damp_for(self, name: str) -> float:
        """GPTQ damping for module ``name`` (see ``gptq_damp``)."""
        if self.gptq_damp is not None:
            return float(self.gptq_damp)
        return HEAD_GPTQ_DAMP if is_head(name) else DECODER_GPTQ_DAMP

    def method_config(self, name: str, bits: int) -> MethodConfig:
        """The registered method's config (`quant.methods`) for module ``name`` at ``bits``:
        the knobs of `METHOD_KNOBS` the method has, resolved for this module."""
        calibrated = self.is_calibrated(name)
        values = {"symmetric": self.symmetric, "scale_search": self.search_scales(name),
                  "scale_refit": 0 if calibrated else self.energy_refit,
                  "sinkhorn_iters": self.sinkhorn_iters, "kurtosis_gate": self.kurtosis_gate,
                  "awq": self.awq and calibrated, "gptq": self.gptq and calibrated,
                  "gptq_damp": self.damp_for(name),
                  "col_scale_tie": self.o_proj_tie if name.rpartition(".")[2] == "o_proj"
                  else None}
        known = {f.name for f in fields(_REGISTRY[self.method].config)}
        return make_config(self.method, bits=bits, group_size=self.group_size_for(name),
                           **{k: v for k, v in values.items() if k in known and v is not None})

    def replace(self, **changes: Any) -> SinqConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["include"] = list(self.include)
        d["exclude"] = list(self.exclude)
        d["overrides"] = [list(o) for o in self.overrides]
        d["group_overrides"] = [list(o) for o in self.group_overrides]
        d["o_proj_tie"] = None if self.o_proj_tie is None else list(self.o_proj_tie)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SinqConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for key in ("include", "exclude"):
            if key in known:
                known[key] = tuple(known[key])
        if known.get("o_proj_tie") is not None:
            known["o_proj_tie"] = tuple(known["o_proj_tie"])
        return cls(**known)


EMBEDDING_BITS = (4, 8)  # GatherBlockQuantized's CPU kernel
TABLE_OPS_CHOICES = ("contrib", "standard")


@dataclass(frozen=True)
class GraphConfig:
    """Everything that decides the ONNX graph around the quantized weights.

    Attributes:
        runtime: ``"stock"`` (MatMulNBits, 3/5/6/7-bit codes in 4/8-bit containers) or
            ``"custom"`` (our ``sinq.ops::SinqMatMulNBits`` with true packed size).
        accuracy_level: MatMulNBits ``accuracy_level`` of every node (0 = fp32 compute, 4 = int8
            activations), or ``"auto"``: 4 on each linear whose int8 error, measured on the
            energy probe, keeps it and the decoder within tolerance, 0 on the others
            (`export.accuracy`; a causal-LM export only).
        dtype: float type of the exported graph's activations and scales.
        col_scale: how the column scale t is applied: an explicit ``Mul``, ``fold`` it into a
            preceding norm / up_proj where exact, or ``fused`` into the custom op.
        embedding_bits: store the token embedding table quantized (GatherBlockQuantized) at this
            width; None keeps it float.
        table_ops: how the graph reads a quantized table: ``"contrib"`` (onnxruntime's
            ``GatherBlockQuantized``) or ``"standard"`` (``Gather`` of the packed rows and
            their dequantization in standard ONNX ops, for runtimes without that op; the same
            tensors and numbers).
    """

    runtime: Literal["stock", "custom"] = "stock"
    accuracy_level: int | Literal["auto"] = 0
    dtype: Literal["fp32", "fp16"] = "fp32"
    col_scale: Literal["mul", "fold", "fused"] = "mul"
    embedding_bits: int | None = None
    table_ops: Literal["contrib", "standard"] = "contrib"

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ConfigError(f"runtime={self.runtime!r} is not one of {RUNTIMES}")
        if self.accuracy_level not in (*ACCURACY_LEVELS, ACCURACY_AUTO) \
                or isinstance(self.accuracy_level, bool):
            raise ConfigError(f"accuracy_level={self.accuracy_level!r} not in {ACCURACY_LEVELS} "
                              f"or {ACCURACY_AUTO!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r} is not one of {DTYPES}")
        if self.col_scale not in COL_SCALE_MODES:
            raise ConfigError(f"col_scale={self.col_scale!r} is not one of {COL_SCALE_MODES}")
        if self.col_scale == "fused" and self.runtime != "custom":
            raise ConfigError("col_scale='fused' needs runtime='custom' (the fused op is ours)")
        if self.embedding_bits is not None and self.embedding_bits not in EMBEDDING_BITS:
            raise ConfigError(f"embedding_bits={self.embedding_bits!r} is not one of {EMBEDDING_BITS} "
                              "(GatherBlockQuantized)")
        if self.table_ops not in TABLE_OPS_CHOICES:
            raise ConfigError(f"table_ops={self.table_ops!r} is not one of {TABLE_OPS_CHOICES}")

    def replace(self, **changes: Any) -> GraphConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GraphConfig:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


# --- values as a command line gives them (text, None = not given) -> config fields ----------

FLOAT = "float"  # a width flag's value that keeps the tensor in float


def parse_width(text: str, choices: Sequence[int]) -> int | str:
    """A bit width from ``choices``, or `FLOAT` (keep the tensor in float)."""
    if text == FLOAT:
        return FLOAT
    if text.isdigit() and int(text) in choices:
        return int(text)
    raise ConfigError(f"{text!r}: choose one of {', '.join(map(str, choices))} or 'float'")


def parse_accuracy_level(text: str) -> int | str:
    """``auto`` or one of the MatMulNBits accuracy levels."""
    if text == ACCURACY_AUTO:
        return text
    if text.isdigit() and int(text) in ACCURACY_LEVELS:
        return int(text)
    raise ConfigError(f"{text!r}: choose {ACCURACY_AUTO} or one of "
                      f"{', '.join(map(str, ACCURACY_LEVELS))}")


def parse_overrides(items: Sequence[str]) -> tuple[tuple[str, int], ...]:
    """``SinqConfig.overrides`` from ``--override`` texts, each ``REGEX=BITS``."""
    out = []
    for item in items:
        pattern, sep, bits = item.rpartition("=")
        if not sep or not pattern or not bits.isdigit():
            raise ConfigError(f"--override {item!r}: expected REGEX=BITS, e.g. 'down_proj=8'")
        out.append((pattern, int(bits)))
    return tuple(out)


def given_fields(values: Mapping[str, Any]) -> dict[str, Any]:
    """The config fields a command line sets: a value of None was not given (the field keeps
    its default or preset value), `FLOAT` is None (kept in float), ``exclude`` a sequence and
    ``overrides`` ``REGEX=BITS`` texts."""
    fields = {name: None if value == FLOAT else value
              for name, value in values.items() if value is not None}
    if "exclude" in fields:
        fields["exclude"] = tuple(fields["exclude"])
    if "overrides" in fields:
        fields["overrides"] = parse_overrides(fields["overrides"])
    return fields


def arg_type(parse: Callable[..., Any], *extra: Any) -> Callable[[str], Any]:
    """An argparse ``type`` from one of the parsers here (its message becomes argparse's)."""
    def convert(text: str) -> Any:
        try:
            return parse(text, *extra)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return convert
