// One session run of an ONNX graph on given feeds, in onnxruntime-web (for bench scripts that
// compare a runtime's kernels with Python onnxruntime). The job (JSON at ?job=): {backend, graph:
// URL, feeds: [{name, url, type: 'float32'|'int32'|'int64', dims}], put: URL prefix}. Every
// output is PUT to `${put}${index}.bin` (raw little-endian); window.__result gets {outputs:
// {name: {index, dims, type}}, adapter}.
import { adapterInfo, loadOrt } from './web_ort.mjs';

const ARRAYS = { float32: Float32Array, int32: Int32Array, int64: BigInt64Array };

async function main() {
  const job = await (await fetch(new URL(location.href).searchParams.get('job'))).json();
  const ort = await loadOrt(job.backend, 1);
  const session = await ort.InferenceSession.create(job.graph, {
    executionProviders: [job.backend], logSeverityLevel: 3 });
  const feeds = {};
  for (const f of job.feeds) {
    const data = new ARRAYS[f.type](await (await fetch(f.url)).arrayBuffer());
    feeds[f.name] = new ort.Tensor(f.type, data, f.dims);
  }
  const out = await session.run(feeds);
  const outputs = {};
  let index = 0;
  for (const [name, tensor] of Object.entries(out)) {
    const put = await fetch(`${job.put}${index}.bin`, { method: 'PUT', body: new Blob([tensor.data]) });
    if (!put.ok) throw new Error(`cannot store output ${name}: HTTP ${put.status}`);
    outputs[name] = { index, dims: tensor.dims, type: tensor.type };
    index += 1;
  }
  await session.release();
  window.__result = { outputs, adapter: job.backend === 'webgpu' ? await adapterInfo() : null };
}

main().catch((err) => { window.__error = `${err?.message ?? err}`.split('\n')[0]; });
