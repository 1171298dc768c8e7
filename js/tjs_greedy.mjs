// Greedy generation with transformers.js from prompt token ids, shared by Node
// (tjs_generate.mjs) and the browser (tjs_page.mjs); the caller passes the transformers.js
// module it imported, with `env` already pointed at the folder that holds the export.
// Returns the prompt ids followed by exactly `maxNew` generated ones.
export async function greedyIds(transformers, name, ids, maxNew, options = {}) {
  const { AutoModelForCausalLM, Tensor } = transformers;
  const model = await AutoModelForCausalLM.from_pretrained(name, options);
  try {
    const out = await model.generate({
      input_ids: new Tensor('int64', BigInt64Array.from(ids.map(BigInt)), [1, ids.length]),
      attention_mask: new Tensor('int64', new BigInt64Array(ids.length).fill(1n), [1, ids.length]),
      max_new_tokens: maxNew, min_new_tokens: maxNew, do_sample: false,
    });
    return Array.from(out.data, Number);
  } finally {
    await model.dispose();
  }
}
