// Runs one parity job in onnxruntime-node: `node node_run.mjs JOB.json`.
// JOB: {graph: path of the .onnx file, data_dir: folder its external data lives in,
//       prefill: [ids], decode: n | [ids], pasts: [{name, dims}], threads, logits: out path}.
// Writes every step's logits (float32, rows x vocab, in order) to JOB.logits and prints one
// JSON line: {runtime, version, fed, vocab, rows, seconds}.
import fs from 'node:fs';
import ort from 'onnxruntime-node';
import { runParityJob } from './decoder.mjs';

const job = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const options = {
  executionProviders: ['cpu'],
  intraOpNumThreads: job.threads ?? 1,
  logSeverityLevel: 3,
  // a graph given as bytes (an accuracy-level override) finds its data in the export folder
  extra: { session: { model_external_initializers_file_folder_path: job.data_dir } },
};
const start = performance.now();
const session = await ort.InferenceSession.create(fs.readFileSync(job.graph), options);
const { fed, vocab, rows, chunks } = await runParityJob(ort, session, job);
fs.writeFileSync(job.logits, Buffer.concat(chunks.map((c) => Buffer.from(c.buffer))));
await session.release();
const version = JSON.parse(fs.readFileSync(new URL('./node_modules/onnxruntime-node/package.json',
  import.meta.url))).version;
console.log(JSON.stringify({
  runtime: 'onnxruntime-node', version, fed, vocab, rows,
  seconds: (performance.now() - start) / 1000,
}));
