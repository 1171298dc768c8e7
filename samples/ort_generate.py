#!/usr/bin/env python
"""Greedy text generation with onnxruntime alone: numpy + tokenizers, no torch, no transformers.

Runs the ONNX graph of a ``sinq-export model`` folder (``onnx/model.onnx``, the file
``genai_config.json`` names; GroupQueryAttention decoder: inputs
``input_ids``, ``attention_mask`` [1, past + new], ``past_key_values.N.key/value`` [1, kv_heads,
past, head_dim]; outputs ``logits``, ``present.N.key/value`` [1, kv_heads, past + new,
head_dim]) with its KV cache kept in numpy arrays. A graph that also takes ``position_ids``
(an optimum-style export) is fed them too::

    python samples/ort_generate.py out/smollm2-sinq4 --prompt "The capital of France is"
    python samples/ort_generate.py out/smollm2-sinq4 --chat --prompt "Name three planets."

When the folder's ``sinq_export.json`` lists the custom domain ``sinq.ops`` (3/5/6/7-bit layers
or ``--col-scale fused``), the custom-op library is registered with the session. Its path is
taken from ``--ops-library``, ``$SINQ_OPS_LIBRARY``, or the installed ``sinq_export`` package
folder (located with ``importlib.util.find_spec``, which does not import the package - importing
it would import torch).

``--json`` prints the prompt ids, the generated ids, the text and the timings as one JSON
object (what the tests compare with onnxruntime-genai's and torch's greedy tokens).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

CUSTOM_DOMAIN = "sinq.ops"
OPS_LIBRARY = "libsinq_ops.so"
_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def find_ops_library(explicit: str | None = None) -> Path:
    """Path of the ``sinq.ops`` library: explicit, ``$SINQ_OPS_LIBRARY``, or the package's copy."""
    candidates = []
    if explicit:
        candidates.append(Path(explicit))
    if os.environ.get("SINQ_OPS_LIBRARY"):
        candidates.append(Path(os.environ["SINQ_OPS_LIBRARY"]))
    spec = importlib.util.find_spec("sinq_export")  # locates, does not import (no torch)
    for loc in (spec.submodule_search_locations or []) if spec else []:
        candidates.append(Path(loc) / "runtime_ops" / OPS_LIBRARY)
    for c in candidates:
        if c.is_file():
            return c
    raise SystemExit(f"this model uses the {CUSTOM_DOMAIN} custom op but its library was not found "
                     f"(looked at {', '.join(map(str, candidates)) or 'nothing'}); build it with "
                     "`python -m sinq_export.runtime_ops build` or pass --ops-library")


def uses_custom_ops(folder: Path) -> bool:
    manifest = folder / "sinq_export.json"
    if not manifest.is_file():
        return False
    meta = json.loads(manifest.read_text())
    return CUSTOM_DOMAIN in meta.get("onnx", {}).get("custom_domains", [])


def model_file(folder: Path) -> Path:
    """The graph ``genai_config.json`` names (``onnx/model.onnx`` in our folders), else the
    top-level ``model.onnx`` of other exporters' folders."""
    config = folder / "genai_config.json"
    if config.is_file():
        return folder / json.loads(config.read_text())["model"]["decoder"]["filename"]
    return folder / "model.onnx"


class OrtCausalLM:
    """A decoder graph (input_ids, attention_mask[, position_ids], past_key_values.* -> logits,
    present.*) driven step by step with a numpy KV cache that grows by the new tokens."""

    def __init__(self, folder: str | Path, threads: int | None = None, ops_library: str | None = None,
                 provider: str = "CPUExecutionProvider"):
        self.folder = Path(folder)
        onnx_path = model_file(self.folder)
        if not onnx_path.is_file():
            raise SystemExit(f"{onnx_path} not found: pass a `sinq-export model` output folder")
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        if uses_custom_ops(self.folder):
            so.register_custom_ops_library(str(find_ops_library(ops_library)))
        self.session = ort.InferenceSession(str(onnx_path), so, providers=[provider])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in self.inputs if n.startswith("past_key_values")]
        self.present_names = [o.name for o in self.session.get_outputs() if o.name.startswith("present")]
        if len(self.past_names) != len(self.present_names) or "logits" not in \
                [o.name for o in self.session.get_outputs()]:
            raise SystemExit(f"{onnx_path} is not a decoder with KV cache (export it with past)")

    def empty_past(self) -> dict[str, np.ndarray]:
        past = {}
        for name in self.past_names:
            shape = self.inputs[name].shape  # [batch, kv_heads, past_len, head_dim]
            past[name] = np.zeros((1, int(shape[1]), 0, int(shape[3])),
                                  dtype=_NP_TYPES[self.inputs[name].type])
        return past

    def step(self, ids: np.ndarray, past: dict[str, np.ndarray], done: int
             ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Run ``ids`` (1-D) after ``done`` cached tokens; returns (last logits, new past)."""
        n = len(ids)
        feed = {"input_ids": ids.reshape(1, n).astype(np.int64)}
        if "attention_mask" in self.inputs:
            feed["attention_mask"] = np.ones((1, done + n), _NP_TYPES[self.inputs["attention_mask"].type])
        if "position_ids" in self.inputs:
            feed["position_ids"] = np.arange(done, done + n, dtype=np.int64).reshape(1, n)
        feed.update(past)
        out = self.session.run(["logits", *self.present_names], feed)
        new_past = dict(zip(self.past_names, out[1:]))
        return np.asarray(out[0][0, -1], dtype=np.float32), new_past

    def generate(self, prompt_ids: list[int], max_new_tokens: int, eos_ids: set[int] = frozenset()
                 ) -> dict:
        t0 = time.perf_counter()
        logits, past = self.step(np.asarray(prompt_ids, dtype=np.int64), self.empty_past(), 0)
        t1 = time.perf_counter()
        done, tokens = len(prompt_ids), []
        while len(tokens) < max_new_tokens:
            nxt = int(np.argmax(logits))
            tokens.append(nxt)
            if nxt in eos_ids or len(tokens) == max_new_tokens:
                break
            logits, past = self.step(np.asarray([nxt], dtype=np.int64), past, done)
            done += 1
        t2 = time.perf_counter()
        steps = max(len(tokens) - 1, 0)  # the first token comes from the prefill's logits
        return {"tokens": tokens, "prefill_s": t1 - t0, "decode_s": t2 - t1,
                "decode_tok_s": steps / (t2 - t1) if steps and t2 > t1 else None}


def eos_token_ids(folder: Path) -> set[int]:
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        p = folder / name
        if p.is_file():
            e = json.loads(p.read_text()).get("eos_token_id")
            ids.update(e if isinstance(e, list) else [] if e is None else [e])
    return ids


def chat_prompt(folder: Path, user: str) -> str:
    """Render the folder's chat template (jinja2, imported only here) for one user turn."""
    import jinja2

    template = None
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    elif (folder / "tokenizer_config.json").is_file():
        template = json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")
    if not template:
        raise SystemExit(f"{folder} has no chat template; drop --chat")
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=[{"role": "user", "content": user}],
                                            add_generation_prompt=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", help="export folder (onnx/model.onnx + tokenizer.json)")
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    ap.add_argument("--ops-library", default=None, help="path of libsinq_ops.so")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)

    folder = Path(args.model_dir)
    for path in (model_file(folder), folder / "tokenizer.json"):
        if not path.is_file():
            ap.error(f"{path} not found: pass a `sinq-export model` output folder")
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    text = chat_prompt(folder, args.prompt) if args.chat else args.prompt
    prompt_ids = tokenizer.encode(text, add_special_tokens=False).ids
    lm = OrtCausalLM(folder, threads=args.threads, ops_library=args.ops_library)
    out = lm.generate(prompt_ids, args.max_new_tokens, eos_token_ids(folder))
    completion = tokenizer.decode(out["tokens"], skip_special_tokens=True)
    if args.json:
        print(json.dumps({"prompt_ids": prompt_ids, **out, "text": completion,
                          "torch_imported": sys.modules.get("torch") is not None}))
    else:
        print(text + completion)
        rate = f"{out['decode_tok_s']:.1f} tok/s" if out["decode_tok_s"] else "n/a"
        print(f"\n[{len(prompt_ids)} prompt tokens in {out['prefill_s']:.2f} s; "
              f"{len(out['tokens'])} new tokens, decode {rate}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
