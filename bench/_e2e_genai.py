"""Timing worker of bench/e2e.py for onnxruntime-genai (runs in the genai venv's Python).

Same protocol as ``_e2e_worker.py``: ``append_tokens`` of the ``--prompt-tokens`` prompt
(prefill), then ``--decode-steps`` calls of ``generate_next_token`` (greedy; ``min_length``
keeps EOS from ending the run early), timed separately. The first ``generate_next_token``
after the prefill only selects a token from the prefill's logits (no model run), so it is
counted with the prefill. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import onnxruntime_genai as og
from _sysinfo import peak_rss_kb


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--tokens", required=True)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--warmup-steps", type=int, default=4)
    args = ap.parse_args()
    tokens = np.asarray(json.load(open(args.tokens)), dtype=np.int32)
    P, N = args.prompt_tokens, args.decode_steps

    t = time.perf_counter()
    config = og.Config(args.model_dir)
    config.clear_providers()  # CPU
    model = og.Model(config)
    load_s = time.perf_counter() - t

    def run_once(n_decode: int) -> tuple[float, float, int]:
        params = og.GeneratorParams(model)
        length = P + n_decode + 1
        params.set_search_options(do_sample=False, max_length=length, min_length=length)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(tokens[:P])
        gen.generate_next_token()  # selection from the prefill's logits
        t1 = time.perf_counter()
        steps = 0
        for _ in range(n_decode):
            if gen.is_done():
                break
            gen.generate_next_token()
            steps += 1
        return t1 - t0, time.perf_counter() - t1, steps

    run_once(min(args.warmup_steps, N))
    prefill, decode, steps = [], [], []
    for _ in range(args.repeats):
        p, d, s = run_once(N)
        prefill.append(p)
        decode.append(d)
        steps.append(s)
    print(json.dumps({"load_s": load_s, "prefill_s": prefill, "decode_s": decode, "steps": steps,
                      "prompt_tokens": P, "decode_steps": N,
                      "peak_rss_kb": peak_rss_kb(),
                      "onnxruntime_genai": og.__version__}))


if __name__ == "__main__":
    main()
