"""Timing worker of bench/e2e.py: one model, one process (so its peak RSS is this model's alone).

Imports only numpy and onnxruntime. Drives a decoder graph (input_ids, attention_mask
[, position_ids], past_key_values.* -> logits, present.*) with a numpy KV cache:
prefill ``--prompt-tokens`` tokens from an empty past, then ``--decode-steps`` single-token
steps, feeding the next tokens of the same text (every model does identical work; the argmax
a sampler would take is computed and discarded). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import onnxruntime as ort
from _sysinfo import peak_rss_kb

NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
      "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def kv_dims(shape: list, model: str) -> tuple[int, int, int]:
    """(kv_heads, 0, head_dim) of an empty past; symbolic dims (the genai builder names them)
    come from the genai_config.json next to the model."""
    heads, dim = shape[1], shape[3]
    if not (isinstance(heads, int) and isinstance(dim, int)):
        from pathlib import Path

        dec = json.loads((Path(model).parent / "genai_config.json").read_text())["model"]["decoder"]
        heads, dim = dec["num_key_value_heads"], dec["head_size"]
    return int(heads), 0, int(dim)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", required=True, help="JSON file: a list of token ids")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--warmup-steps", type=int, default=4)
    ap.add_argument("--ops-library", default=None)
    args = ap.parse_args()

    tokens = np.asarray(json.load(open(args.tokens)), dtype=np.int64)
    P, N = args.prompt_tokens, args.decode_steps
    assert len(tokens) >= P + N, "not enough tokens"

    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    if args.ops_library:
        so.register_custom_ops_library(args.ops_library)
    t = time.perf_counter()
    sess = ort.InferenceSession(args.model, so, providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - t

    inputs = {i.name: i for i in sess.get_inputs()}
    past_names = [n for n in inputs if n.startswith("past_key_values")]
    present_names = [o.name for o in sess.get_outputs() if o.name.startswith("present")]
    out_names = ["logits", *present_names]
    empty = {n: np.zeros((1, *kv_dims(inputs[n].shape, args.model)), NP[inputs[n].type])
             for n in past_names}
    mask_t = NP[inputs["attention_mask"].type] if "attention_mask" in inputs else None

    def feed(ids: np.ndarray, done: int, past: dict) -> dict:
        n = len(ids)
        f = {"input_ids": ids.reshape(1, n)}
        if mask_t is not None:
            f["attention_mask"] = np.ones((1, done + n), mask_t)
        if "position_ids" in inputs:
            f["position_ids"] = np.arange(done, done + n, dtype=np.int64).reshape(1, n)
        if "use_cache_branch" in inputs:
            f["use_cache_branch"] = np.array([done > 0])
        f.update(past)
        return f

    def run_once(n_decode: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        out = sess.run(out_names, feed(tokens[:P], 0, empty))
        int(np.argmax(out[0][0, -1]))
        t1 = time.perf_counter()
        past = dict(zip(past_names, out[1:]))
        for i in range(n_decode):
            out = sess.run(out_names, feed(tokens[P + i:P + i + 1], P + i, past))
            int(np.argmax(out[0][0, -1]))
            past = dict(zip(past_names, out[1:]))
        return t1 - t0, time.perf_counter() - t1

    run_once(min(args.warmup_steps, N))
    prefill, decode = [], []
    for _ in range(args.repeats):
        p, d = run_once(N)
        prefill.append(p)
        decode.append(d)
    print(json.dumps({"load_s": load_s, "prefill_s": prefill, "decode_s": decode,
                      "prompt_tokens": P, "decode_steps": N,
                      "peak_rss_kb": peak_rss_kb(),
                      "onnxruntime": ort.__version__}))


if __name__ == "__main__":
    main()
