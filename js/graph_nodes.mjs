// The graph onnxruntime-web actually runs: creates a session for ?graph=URL (external data
// ?data=[{path, data}] JSON, backend ?backend=webgpu|wasm) with verbose logging and reads its
// node placement log, which lists every node left after the graph transformers (fusions) ran.
// window.__result gets {nodes: {EP name: {op type: count}}, fusions: {transformer: count}}.
import { loadOrt } from './web_ort.mjs';

const lines = [];
for (const level of ['log', 'info', 'warn', 'error']) {
  const original = console[level].bind(console);
  console[level] = (...args) => { lines.push(args.join(' ')); original(...args); };
}

function placements() {
  const nodes = {};
  let ep = null;
  for (const line of lines) {
    const header = /Node\(s\) placed on \[(\w+)\]/.exec(line);
    if (header) {
      ep = header[1];
      nodes[ep] = nodes[ep] ?? {};
      continue;
    }
    const node = /VerifyEachNodeIsAssignedToAnEp\]\s+(\S+) \(/.exec(line);
    if (node && ep) nodes[ep][node[1]] = (nodes[ep][node[1]] ?? 0) + 1;
  }
  return nodes;
}

function fusions() {
  const counts = {};
  for (const line of lines) {
    const fused = /\] (\w+): created fused node/.exec(line);
    if (fused) counts[fused[1]] = (counts[fused[1]] ?? 0) + 1;
  }
  return counts;
}

async function main() {
  const params = new URL(location.href).searchParams;
  const backend = params.get('backend') ?? 'webgpu';
  const ort = await loadOrt(backend, 1);
  ort.env.logLevel = 'verbose';
  const session = await ort.InferenceSession.create(params.get('graph'), {
    executionProviders: [backend], externalData: JSON.parse(params.get('data') ?? '[]'),
    logSeverityLevel: 0, logVerbosityLevel: 0,
  });
  await session.release();
  window.__result = { nodes: placements(), fusions: fusions() };
}

main().catch((err) => { window.__error = `${err?.message ?? err}`.split('\n')[0]; });
