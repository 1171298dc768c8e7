#!/usr/bin/env python
"""Greedy generation through optimum's ``ORTModelForCausalLM`` (transformers' ``generate``).

An export folder is a normal optimum folder, so this is the familiar Hugging Face API::

    python samples/optimum_generate.py out/smollm2-sinq4 --prompt "The capital of France is"
    python samples/optimum_generate.py out/smollm2-sinq4 --chat --prompt "Name three planets."

Models that use the ``sinq.ops`` custom op (listed in ``sinq_export.json``) need the library
registered in the ``SessionOptions`` handed to ``from_pretrained``; ``sinq_export.runtime_ops``
does that. ``--json`` prints the prompt ids, generated ids and text as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import onnxruntime as ort


def session_options(folder: Path, threads: int | None) -> ort.SessionOptions:
    meta = folder / "sinq_export.json"
    domains = json.loads(meta.read_text()).get("onnx", {}).get("custom_domains", []) if meta.is_file() else []
    if "sinq.ops" in domains:
        from sinq_export import runtime_ops

        so = runtime_ops.session_options()
    else:
        so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    return so


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", help="export folder (model.onnx + config + tokenizer)")
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)

    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    folder = Path(args.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = ORTModelForCausalLM.from_pretrained(
        folder, local_files_only=True, use_cache=True, use_io_binding=False,
        provider="CPUExecutionProvider", session_options=session_options(folder, args.threads))
    if args.chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}],
                                             tokenize=False, add_generation_prompt=True)
    else:
        text = args.prompt
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    start = time.perf_counter()
    out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False,
                         num_beams=1, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    seconds = time.perf_counter() - start
    prompt_ids = enc["input_ids"][0].tolist()
    tokens = out[0, len(prompt_ids):].tolist()
    completion = tokenizer.decode(tokens, skip_special_tokens=True)
    if args.json:
        print(json.dumps({"prompt_ids": prompt_ids, "tokens": tokens, "text": completion,
                          "seconds": seconds}))
    else:
        print(text + completion)
        print(f"\n[{len(tokens)} new tokens in {seconds:.2f} s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
