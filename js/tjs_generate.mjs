// Greedy generation with transformers.js (Node) from an export folder, loaded unchanged:
//   node tjs_generate.mjs OUT_DIR '[prompt ids]' MAX_NEW_TOKENS
// Prints one JSON line: {version, ids (prompt + generated), dtype, device}.
import path from 'node:path';
import { AutoModelForCausalLM, Tensor, env } from '@huggingface/transformers';

const [folder, idsJson, maxNew] = process.argv.slice(2);
env.allowRemoteModels = false;
env.localModelPath = path.dirname(path.resolve(folder));
const model = await AutoModelForCausalLM.from_pretrained(path.basename(path.resolve(folder)));
const ids = JSON.parse(idsJson);
const inputIds = new Tensor('int64', BigInt64Array.from(ids.map(BigInt)), [1, ids.length]);
const attentionMask = new Tensor('int64', new BigInt64Array(ids.length).fill(1n), [1, ids.length]);
const out = await model.generate({
  input_ids: inputIds, attention_mask: attentionMask, max_new_tokens: Number(maxNew),
  do_sample: false, min_new_tokens: Number(maxNew),
});
console.log(JSON.stringify({ version: env.version, ids: Array.from(out.data, Number) }));
await model.dispose();
