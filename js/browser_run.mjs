// Runs one parity job page in headless Chromium: `node browser_run.mjs URL [webgpu]`.
// Prints the page's result as one JSON line; exit 1 with one line on stderr on failure.
import { runPage } from './browser.mjs';

const [url, backend] = process.argv.slice(2);
try {
  const result = await runPage(url, { webgpu: backend === 'webgpu',
    timeoutMs: Number(process.env.SINQ_PAGE_TIMEOUT_MS ?? 1800000) });
  console.log(JSON.stringify(result));
} catch (err) {
  process.stderr.write(`${err.message.split('\n')[0]}\n`);
  process.exit(1);
}
