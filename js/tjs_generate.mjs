// Greedy generation with transformers.js (Node) from an export folder, loaded unchanged:
//   node tjs_generate.mjs OUT_DIR '[prompt ids]' MAX_NEW_TOKENS
// Prints one JSON line: {version, ids (prompt + generated)}.
import path from 'node:path';
import * as transformers from '@huggingface/transformers';
import { greedyIds } from './tjs_greedy.mjs';

const [folder, idsJson, maxNew] = process.argv.slice(2);
transformers.env.allowRemoteModels = false;
transformers.env.localModelPath = path.dirname(path.resolve(folder));
const ids = await greedyIds(transformers, path.basename(path.resolve(folder)), JSON.parse(idsJson),
  Number(maxNew));
console.log(JSON.stringify({ version: transformers.env.version, ids }));
