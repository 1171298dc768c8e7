// Greedy generation from a sinq-export folder in onnxruntime-web, streamed token by token.
// The model files come from /models/NAME/ (js/serve.py): the graph genai_config.json names,
// its external data files (sinq_export.json's list, else config.json's transformers.js_config
// count, else the genai builder's `<graph>.data`), tokenizer.json and generation_config.json.
import { Tokenizer } from '/js/node_modules/@huggingface/tokenizers/dist/tokenizers.min.mjs';
import { runDecoder } from '/js/decoder.mjs';
import { adapterInfo, loadOrt, prefillChunk } from '/js/web_ort.mjs';

const $ = (id) => document.getElementById(id);
const params = new URL(location.href).searchParams;

async function getJson(url, fallback) {
  const response = await fetch(url);
  if (response.ok) return response.json();
  if (fallback !== undefined) return fallback;
  throw new Error(`${url}: HTTP ${response.status}`);
}

// The empty KV cache from genai_config.json (the genai builder's graphs leave head_dim
// symbolic, so the graph's input metadata cannot size it).
function pastSpecs(decoder) {
  const specs = [];
  for (let i = 0; i < decoder.num_hidden_layers; i += 1) {
    for (const names of [decoder.inputs.past_key_names, decoder.inputs.past_value_names]) {
      specs.push({ name: names.replace('%d', i),
        dims: [1, decoder.num_key_value_heads, 0, decoder.head_size] });
    }
  }
  return specs;
}

// The graph, its external data files (relative to the model folder) and the past inputs.
async function modelFiles(base) {
  const genai = await getJson(`${base}genai_config.json`);
  const graph = genai.model.decoder.filename;
  const dir = graph.includes('/') ? graph.slice(0, graph.lastIndexOf('/') + 1) : '';
  const name = graph.slice(dir.length);
  const manifest = await getJson(`${base}sinq_export.json`, null);
  let data = manifest?.onnx?.data_files?.map((f) => f.slice(dir.length));
  if (!data) {
    const config = await getJson(`${base}config.json`, {});
    const chunks = config['transformers.js_config']?.use_external_data_format?.[name];
    data = chunks ? Array.from({ length: chunks }, (_, i) => `${name}_data${i ? `_${i}` : ''}`)
      : [`${name}.data`];
  }
  return { graph: `${base}${graph}`, data: data.map((f) => ({ path: f, data: `${base}${dir}${f}` })),
    pasts: pastSpecs(genai.model.decoder) };
}

async function generate({ model, backend, threads, prompt, tokens, ignoreEos }) {
  const base = `/models/${model}/`;
  const status = (text) => { $('stats').textContent = text; };
  status('loading…');
  const start = performance.now();
  const ort = await loadOrt(backend, threads);
  const [files, tokenizerJson, tokenizerConfig, generation] = await Promise.all([
    modelFiles(base), getJson(`${base}tokenizer.json`), getJson(`${base}tokenizer_config.json`, {}),
    getJson(`${base}generation_config.json`, {})]);
  const tokenizer = new Tokenizer(tokenizerJson, tokenizerConfig);
  const session = await ort.InferenceSession.create(files.graph, {
    executionProviders: [backend], externalData: files.data, logSeverityLevel: 3 });
  const loadSeconds = (performance.now() - start) / 1000;
  const promptIds = tokenizer.encode(prompt, { add_special_tokens: false }).ids;
  const eos = ignoreEos ? [] : [generation.eos_token_id ?? []].flat();
  const generated = [];
  let firstAt = 0;
  const adapter = backend === 'webgpu' ? await adapterInfo() : null;
  const chunk = prefillChunk(backend, adapter);
  const runStart = performance.now();
  await runDecoder(ort, session, {
    prefill: promptIds,
    chunk,
    decode: tokens - 1,
    pasts: files.pasts,
    stopAt: eos,
    onStep: ({ step, token }) => {
      if (step === 0) firstAt = performance.now();
      generated.push(token);
      $('output').textContent = prompt + tokenizer.decode(generated, { skip_special_tokens: true });
      const decodeSeconds = (performance.now() - firstAt) / 1000;
      status(`${generated.length} tokens · ${step ? (step / decodeSeconds).toFixed(2) : '–'} tok/s`);
    },
  });
  const end = performance.now();
  await session.release();
  const decodeSeconds = (end - firstAt) / 1000;
  const result = {
    model, backend, threads: ort.env.wasm.numThreads, isolated: self.crossOriginIsolated,
    adapter, prefill_chunk: chunk, ort: ort.env.versions?.web ?? null,
    prompt_ids: promptIds, ids: generated, text: tokenizer.decode(generated, { skip_special_tokens: true }),
    load_s: loadSeconds, first_token_s: (firstAt - runStart) / 1000,
    decode_tokens_per_s: generated.length > 1 ? (generated.length - 1) / decodeSeconds : null,
  };
  const ran = backend === 'webgpu'
    ? `WebGPU (${result.adapter?.software ? 'software adapter' : 'GPU'}: ${result.adapter?.vendor ?? '?'} ${result.adapter?.architecture ?? ''})`
    : `WASM, ${result.threads} thread(s)${result.isolated ? '' : ' (page not cross-origin isolated)'}`;
  status(`${generated.length} tokens · ${result.decode_tokens_per_s?.toFixed(2) ?? '–'} tok/s decode · `
    + `first token ${result.first_token_s.toFixed(2)} s · load ${loadSeconds.toFixed(1)} s · `
    + `onnxruntime-web ${result.ort ?? ''} on ${ran}`);
  return result;
}

function options() {
  return {
    model: $('model').value, backend: $('backend').value, threads: Number($('threads').value),
    prompt: $('prompt').value, tokens: Number($('tokens').value),
    ignoreEos: params.get('ignore_eos') === '1',
  };
}

for (const key of ['model', 'backend', 'threads', 'prompt', 'tokens']) {
  if (params.has(key)) $(key).value = params.get(key);
}
$('form').addEventListener('submit', (event) => {
  event.preventDefault();
  generate(options()).catch((err) => { $('stats').textContent = `error: ${err.message ?? err}`; });
});
if (params.get('autorun') === '1') {
  generate(options()).then((r) => { window.__result = r; })
    .catch((err) => { window.__error = `${err?.message ?? err}`.split('\n')[0]; });
}
