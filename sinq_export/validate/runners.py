"""Running the same tokens (or inputs) through onnxruntime and the torch reference."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..data import load_text, token_windows
from ..folders import Tokenizer
from .graph import _NP_OF_ONNX
from .providers import ValidationError

if TYPE_CHECKING:
    import onnx
    import torch
    from transformers.utils import ModelOutput


class OrtSession(Protocol):
    """What the runners need of an onnxruntime session (a wrapper that fixes its past's shape,
    as the benchmarks use, is one too)."""

    def get_inputs(self) -> list[Any]: ...

    def get_outputs(self) -> list[Any]: ...

    def run(self, output_names: list[str] | None, input_feed: dict[str, np.ndarray]) -> list[Any]: ...

# ------------------------------------------------------------------------------ running


@dataclass
class _LMRun:
    logits: np.ndarray  # [T, V]
    captures: dict[str, np.ndarray]  # tensor name -> [T, width]
    fed: list[int] = field(default_factory=list)  # decode tokens fed after the prefill


def _past_specs(session) -> tuple[list, list[str]]:
    """Past inputs (name, np dtype, shape with the past length 0) and present outputs."""
    pasts, presents = [], []
    for i in session.get_inputs():
        if i.name.startswith("past_key_values") or i.name.startswith("past"):
            shape = list(i.shape)
            if len(shape) != 4:
                raise ValidationError(f"unexpected past shape {i.name}: {shape}")
            fixed = [1, shape[1], 0, shape[3]]
            if not all(isinstance(d, int) for d in fixed):
                raise ValidationError(f"cannot size {i.name}: {shape}")
            pasts.append((i.name, _ORT_NP[i.type], fixed))
    for o in session.get_outputs():
        if o.name.startswith("present"):
            presents.append(o.name)
    if len(pasts) != len(presents):
        raise ValidationError(f"{len(pasts)} past inputs but {len(presents)} present outputs")
    return pasts, presents


_ORT_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
           "tensor(int32)": np.int32, "tensor(bool)": np.bool_, "tensor(double)": np.float64}


def _step_feed(input_names: dict, ids: np.ndarray, done: int, past: dict) -> dict[str, np.ndarray]:
    """One step's inputs: ``ids`` after ``done`` cached tokens whose keys/values are ``past``."""
    s = len(ids)
    feed: dict[str, np.ndarray] = {"input_ids": ids[None, :]}
    if "attention_mask" in input_names:
        feed["attention_mask"] = np.ones((1, done + s), dtype=_ORT_NP[input_names["attention_mask"].type])
    if "position_ids" in input_names:
        feed["position_ids"] = np.arange(done, done + s, dtype=np.int64)[None, :]
    if "use_cache_branch" in input_names:
        feed["use_cache_branch"] = np.array([done > 0])
    feed.update(past)
    return feed


def prefill_feed(session: OrtSession, ids: np.ndarray) -> dict[str, np.ndarray]:
    """The inputs that run the tokens ``ids`` from an empty cache (what a calibration reader of
    onnxruntime's own quantizers feeds: bench/ppl_table.py, row ort_gptq)."""
    pasts, _ = _past_specs(session)
    past = {name: np.zeros(shape, dtype=dt) for name, dt, shape in pasts}
    return _step_feed({i.name: i for i in session.get_inputs()},
                      np.asarray(ids, dtype=np.int64), 0, past)


def run_ort_lm(session: OrtSession, prefill: np.ndarray, decode: Sequence[int] | int,
               capture: Sequence[str] = ()) -> _LMRun:
    """Prefill ``prefill`` with an empty past, then feed ``decode`` tokens one at a time.

    ``decode`` as an int: that many greedy steps on this session's own argmax (the tokens fed
    are returned in ``run.fed``).
    """
    capture = list(dict.fromkeys(capture))
    pasts, presents = _past_specs(session)
    input_names = {i.name: i for i in session.get_inputs()}
    past = {name: np.zeros(shape, dtype=dt) for name, dt, shape in pasts}
    out_names = ["logits", *presents, *capture]
    greedy = isinstance(decode, int)
    n_steps = decode if greedy else len(decode)
    logits, caps, done, fed = [], {c: [] for c in capture}, 0, []
    ids = np.asarray(prefill, dtype=np.int64)
    for step in range(n_steps + 1):
        s = len(ids)
        res = session.run(out_names, _step_feed(input_names, ids, done, past))
        logits.append(np.asarray(res[0], dtype=np.float32).reshape(s, -1))
        for (name, _, _), value in zip(pasts, res[1:1 + len(presents)]):
            past[name] = value
        for c, value in zip(capture, res[1 + len(presents):]):
            caps[c].append(np.asarray(value, dtype=np.float32).reshape(s, -1))
        done += s
        if step < n_steps:
            nxt = int(logits[-1][-1].argmax()) if greedy else int(decode[step])
            fed.append(nxt)
            ids = np.asarray([nxt], dtype=np.int64)
    run = _LMRun(np.concatenate(logits), {c: np.concatenate(v) for c, v in caps.items()})
    run.fed = fed
    return run


def _cache_kwargs(out: ModelOutput) -> dict:
    """The KV cache of a transformers output, under the name this version takes (``cache``
    since 5.24; ``past_key_values`` before, deprecated after)."""
    if "cache" in getattr(out, "__dataclass_fields__", {}):
        return {"cache": out.cache}
    return {"past_key_values": out.past_key_values}


def run_torch_lm(model, prefill: np.ndarray, decode_steps: int, hook_layers: dict | None = None
                 ) -> tuple[_LMRun, list[int]]:
    """Torch reference: prefill then ``decode_steps`` greedy steps; returns the fed tokens."""
    import torch

    captures: dict[str, list] = {n: [] for n in (hook_layers or {})}
    handles = []
    for name, module in (hook_layers or {}).items():
        def hook(mod: torch.nn.Module, args: tuple[Any, ...], out: torch.Tensor, name: str = name) -> None:
            captures[name].append(out.detach().float().reshape(-1, out.shape[-1]).numpy().copy())
        handles.append(module.register_forward_hook(hook))
    logits, fed = [], []
    try:
        with torch.inference_mode():
            ids = torch.as_tensor(np.asarray(prefill, dtype=np.int64))[None, :]
            out = model(input_ids=ids, use_cache=True)
            for step in range(decode_steps + 1):
                lg = out.logits[0].float().numpy()
                logits.append(lg)
                if step == decode_steps:
                    break
                nxt = int(lg[-1].argmax())
                fed.append(nxt)
                out = model(input_ids=torch.tensor([[nxt]]), use_cache=True, **_cache_kwargs(out))
    finally:
        for h in handles:
            h.remove()
    return _LMRun(np.concatenate(logits), {n: np.concatenate(v) for n, v in captures.items()}), fed


# ------------------------------------------------------------------------------ tokens


def _load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def validation_tokens(tokenizer: Tokenizer, n: int, text: str = "wikipedia") -> np.ndarray:
    """The first ``n`` tokens of the cleaned real text (`sinq_export.data`), no special tokens."""
    windows = token_windows(tokenizer, load_text(text), n_windows=1, length=n)
    first = windows[0]
    return np.asarray(first.tolist() if hasattr(first, "tolist") else first, dtype=np.int64).reshape(-1)


def _check_tokenizers(out_dir: Path, ref_dir: Path | None):
    """Tokenizer of the export folder (or the reference); mismatch between both is an error."""
    has = [d for d in (out_dir, ref_dir) if d is not None and (d / "tokenizer_config.json").is_file()]
    if not has:
        raise ValidationError(f"{out_dir}: no tokenizer files (needed to feed real text tokens)")
    tok = _load_tokenizer(has[0])
    if len(has) == 2:
        other = _load_tokenizer(has[1])
        probe = "Validation probe: Anarchism, Aristotle and Apollo 11 — 1969 ünïcödé."
        if tok.get_vocab() != other.get_vocab() or tok.encode(probe) != other.encode(probe):
            raise ValidationError(
                f"mismatched tokenizer: {has[0]} and {has[1]} tokenize differently")
    return tok



def module_feeds(model, size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random normal float inputs for a ``kind: module`` graph; symbolic dims get ``size``."""
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for i in model.graph.input:
        if i.name in inits:
            continue
        tt = i.type.tensor_type
        dtype = _NP_OF_ONNX.get(tt.elem_type)
        if dtype not in (np.float32, np.float16, np.float64):
            raise ValidationError(f"module input {i.name!r}: only float inputs can be generated")
        shape = [d.dim_value if d.HasField("dim_value") else size for d in tt.shape.dim]
        feeds[i.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def run_torch_module(module: torch.nn.Module, feeds: dict[str, np.ndarray], model: onnx.ModelProto,
                     hook_layers: dict) -> _LMRun:
    """Run a plain torch module on the feeds (graph input order); first output + hooks."""
    import torch

    captures: dict[str, list] = {n: [] for n in hook_layers}
    handles = []
    for name, m in hook_layers.items():
        def hook(mod: torch.nn.Module, args: tuple[Any, ...], out: torch.Tensor, name: str = name) -> None:
            captures[name].append(out.detach().float().reshape(-1, out.shape[-1]).numpy().copy())
        handles.append(m.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            out = module(*[torch.from_numpy(v.astype(np.float32)) for v in feeds.values()])
    finally:
        for h in handles:
            h.remove()
    first = out if isinstance(out, torch.Tensor) else out[0]
    y = first.float().numpy()
    return _LMRun(y.reshape(-1, y.shape[-1]), {n: np.concatenate(v) for n, v in captures.items()})


def run_ort_module(session: OrtSession, feeds: dict[str, np.ndarray], capture: Sequence[str] = ()) -> _LMRun:
    capture = list(dict.fromkeys(capture))
    first = session.get_outputs()[0].name
    res = session.run([first, *capture], feeds)
    y = np.asarray(res[0], dtype=np.float32)
    caps = {c: np.asarray(v, dtype=np.float32).reshape(-1, np.shape(v)[-1])
            for c, v in zip(capture, res[1:])}
    return _LMRun(y.reshape(-1, y.shape[-1]), caps)
