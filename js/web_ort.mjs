// Loading onnxruntime-web in a page served by js/serve.py (no CDN, no build step).
const DIST = '/js/node_modules/onnxruntime-web/dist/';

// The bundle for `backend` ('wasm' or 'webgpu'), its .wasm files from the same folder; WASM
// threads need a cross-origin isolated page (js/serve.py sends the headers).
export async function loadOrt(backend, threads = 1) {
  const ort = await import(`${DIST}${backend === 'webgpu' ? 'ort.webgpu.min.mjs' : 'ort.wasm.min.mjs'}`);
  ort.env.wasm.wasmPaths = DIST;
  ort.env.wasm.numThreads = self.crossOriginIsolated ? threads : 1;
  ort.env.logLevel = 'error';
  return ort;
}

// What WebGPU adapter the page got; SwiftShader (Chromium's CPU implementation) is reported
// as a software adapter so nobody reads its timings as a GPU's.
export async function adapterInfo() {
  if (!navigator.gpu) return { available: false };
  const adapter = await navigator.gpu.requestAdapter();
  if (!adapter) return { available: false };
  const info = adapter.info ?? {};
  const text = `${info.vendor ?? ''} ${info.architecture ?? ''} ${info.description ?? ''}`;
  const software = Boolean(adapter.isFallbackAdapter || info.isFallbackAdapter
    || /swiftshader|llvmpipe|software/i.test(text));
  return { available: true, vendor: info.vendor ?? '', architecture: info.architecture ?? '',
    description: info.description ?? '', software, subgroupMaxSize: info.subgroupMaxSize ?? null };
}

// How many prompt tokens one WebGPU run may take (0: the whole prompt). On an adapter whose
// subgroups are narrower than 16 lanes (SwiftShader's are 4) onnxruntime-web's prefill
// attention returns wrong rows once a run holds more than ~30 new tokens, while runs of 16
// new tokens on top of a past are right at every length measured (docs/runtimes.md); 16 lanes
// is the width onnxruntime's flash attention once required of an adapter.
export const NARROW_SUBGROUP_CHUNK = 16;
export function prefillChunk(backend, adapter) {
  if (backend !== 'webgpu' || !adapter?.available) return 0;
  const width = adapter.subgroupMaxSize;
  return width != null && width < 16 ? NARROW_SUBGROUP_CHUNK : 0;
}
