// The greedy decode loop of a sinq-export decoder, shared by onnxruntime-node and
// onnxruntime-web (the caller passes its `ort` module). The graph's inputs: input_ids,
// attention_mask [1, past + new], past_key_values.N.key/value [1, kv_heads, past, head_dim];
// outputs: logits [1, new, vocab], present.N.key/value (fed back as the next step's past).

// The past inputs with an empty (length 0) sequence axis, read from the session's metadata
// where the runtime exposes shapes, else given by the caller.
export function pastSpecs(session, given) {
  if (given && given.length) return given;
  const specs = [];
  for (const meta of session.inputMetadata ?? []) {
    if (!meta.name.startsWith('past_key_values')) continue;
    const [, heads, , headDim] = meta.shape;
    specs.push({ name: meta.name, dims: [1, heads, 0, headDim] });
  }
  return specs;
}

function argmaxRow(data, row, vocab) {
  let best = 0;
  let value = -Infinity;
  const start = row * vocab;
  for (let j = 0; j < vocab; j += 1) {
    if (data[start + j] > value) {
      value = data[start + j];
      best = j;
    }
  }
  return best;
}

function int64(ort, ids) {
  return new ort.Tensor('int64', BigInt64Array.from(ids.map((x) => BigInt(x))), [1, ids.length]);
}

// Prefill `prefill`, then `decode` steps: a number runs that many greedy steps on this
// runtime's own argmax, an array feeds those tokens. `onStep({step, token, logits, rows})`
// sees every step's logits (Float32Array of rows x vocab) as they come; `stopAt` ends early.
// `chunk` > 0 feeds the prompt that many tokens per run (`web_ort.prefillChunk`); the runs
// before the last one hand their logits rows to `onRows({logits, rows, vocab})`.
export async function runDecoder(ort, session, { prefill, decode, pasts, onStep, onRows, stopAt,
  chunk = 0 }) {
  const specs = pastSpecs(session, pasts);
  const presentOf = (name) => name.replace('past_key_values', 'present');
  let feedsPast = {};
  for (const spec of specs) {
    feedsPast[spec.name] = new ort.Tensor('float32', new Float32Array(0), spec.dims);
  }
  let done = 0;
  // One run on `ids` after `done` tokens; the next run's past becomes this run's present.
  const run = async (ids) => {
    const out = await session.run({
      input_ids: int64(ort, ids),
      attention_mask: int64(ort, new Array(done + ids.length).fill(1)),
      ...feedsPast,
    });
    for (const old of Object.values(feedsPast)) old.dispose?.();
    feedsPast = {};
    for (const spec of specs) feedsPast[spec.name] = out[presentOf(spec.name)];
    done += ids.length;
    const logits = out.logits;
    return { logits, rows: ids.length, vocab: logits.dims[logits.dims.length - 1] };
  };
  let ids = prefill.slice();
  while (chunk > 0 && ids.length > chunk) {
    const { logits, rows, vocab } = await run(ids.slice(0, chunk));
    if (onRows) await onRows({ logits: logits.data, rows, vocab });
    logits.dispose?.();
    ids = ids.slice(chunk);
  }
  const greedy = typeof decode === 'number';
  const steps = greedy ? decode : decode.length;
  const fed = [];
  let vocab = 0;
  for (let step = 0; step <= steps; step += 1) {
    const { logits, rows, vocab: width } = await run(ids);
    vocab = width;
    const data = logits.data;
    const token = argmaxRow(data, rows - 1, vocab);
    if (onStep) await onStep({ step, token, logits: data, rows, vocab });
    logits.dispose?.();
    if (step === steps || (stopAt && stopAt.includes(token))) break;
    const next = greedy ? token : decode[step];
    fed.push(next);
    ids = [next];
  }
  for (const old of Object.values(feedsPast)) old.dispose?.();
  return { fed, vocab };
}

// A parity job's run: `job.prefill`, then `job.decode` (a number of greedy steps or the tokens
// to feed), every step's logits rows kept in order (Float32Array chunks, rows x vocab each).
// `chunk`: as in `runDecoder`.
export async function runParityJob(ort, session, job, chunk = 0) {
  const chunks = [];
  let rows = 0;
  const keep = ({ logits, rows: n, vocab: v }) => {
    chunks.push(new Float32Array(logits.subarray(0, n * v)));
    rows += n;
  };
  const { fed, vocab } = await runDecoder(ort, session, {
    prefill: job.prefill,
    decode: job.decode,
    pasts: job.pasts,
    onStep: keep,
    onRows: keep,
    chunk,
  });
  return { fed, vocab, rows, chunks };
}
