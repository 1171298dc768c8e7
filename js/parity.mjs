// One parity job in onnxruntime-web (opened by browser_run.mjs). The job (JSON at ?job=):
// {backend: 'wasm'|'webgpu', threads, graph: URL, data: [{path, url}], prefill, decode, pasts,
//  logits_put: URL}. Every step's logits (float32 rows x vocab) are PUT to logits_put;
// window.__result gets {runtime, version, backend, adapter, prefill_chunk, fed, vocab, rows,
// seconds}.
import { runParityJob } from './decoder.mjs';
import { adapterInfo, loadOrt, prefillChunk } from './web_ort.mjs';

async function main() {
  const job = await (await fetch(new URL(location.href).searchParams.get('job'))).json();
  const ort = await loadOrt(job.backend, job.threads);
  const start = performance.now();
  const session = await ort.InferenceSession.create(job.graph, {
    executionProviders: [job.backend],
    externalData: job.data,
    logSeverityLevel: 3,
  });
  const adapter = job.backend === 'webgpu' ? await adapterInfo() : null;
  const chunk = prefillChunk(job.backend, adapter);
  const { fed, vocab, rows, chunks } = await runParityJob(ort, session, job, chunk);
  const seconds = (performance.now() - start) / 1000;
  await session.release();
  const put = await fetch(job.logits_put, { method: 'PUT', body: new Blob(chunks) });
  if (!put.ok) throw new Error(`cannot store the logits: HTTP ${put.status}`);
  window.__result = {
    runtime: 'onnxruntime-web', version: ort.env.versions?.web ?? null, backend: job.backend,
    threads: ort.env.wasm.numThreads, isolated: self.crossOriginIsolated,
    adapter, prefill_chunk: chunk, fed, vocab, rows, seconds,
  };
}

main().catch((err) => { window.__error = `${err?.message ?? err}`.split('\n')[0]; });
