// transformers.js in the browser: greedy generation from an export folder served unchanged
// under /models/NAME/ (js/serve.py), everything from js/node_modules (no CDN).
// Query: model=NAME, ids=[prompt token ids] (JSON), new=N, device=wasm|webgpu.
// window.__result gets {version, ids (prompt + generated), device}.
import * as transformers from '/js/node_modules/@huggingface/transformers/dist/transformers.js';
import { greedyIds } from './tjs_greedy.mjs';

// transformers.js bundles its own onnxruntime-web build, whose .wasm it would fetch from a CDN
const ORT_DIST = '/js/node_modules/@huggingface/transformers/node_modules/onnxruntime-web/dist/';

async function main() {
  const params = new URL(location.href).searchParams;
  const { env } = transformers;
  env.allowRemoteModels = false;
  env.allowLocalModels = true;
  env.localModelPath = '/models/';
  env.useBrowserCache = false;
  env.backends.onnx.wasm.wasmPaths = {
    mjs: `${ORT_DIST}ort-wasm-simd-threaded.asyncify.mjs`,
    wasm: `${ORT_DIST}ort-wasm-simd-threaded.asyncify.wasm`,
  };
  const device = params.get('device') ?? 'wasm';
  const ids = await greedyIds(transformers, params.get('model'), JSON.parse(params.get('ids')),
    Number(params.get('new')), { device });
  window.__result = { version: env.version, ids, device };
}

main().catch((err) => { window.__error = `${err?.message ?? err}`.split('\n')[0]; });
