// Headless Chromium for the pages under js/ and samples/web/, driven by playwright-core.
// The browser is the system's (Debian's `chromium`, or SINQ_CHROMIUM): playwright-core ships
// no browser. WebGPU without a GPU runs on Chromium's software adapter (SwiftShader).
import fs from 'node:fs';
import { chromium } from 'playwright-core';

export function chromiumPath() {
  const candidates = [process.env.SINQ_CHROMIUM, '/usr/bin/chromium', '/usr/bin/chromium-browser',
    '/usr/bin/google-chrome'].filter(Boolean);
  const found = candidates.find((p) => fs.existsSync(p));
  if (!found) {
    throw new Error('no Chromium: `apt-get install -y chromium` or set SINQ_CHROMIUM to its path');
  }
  return found;
}

export const WEBGPU_FLAGS = ['--enable-unsafe-webgpu', '--enable-unsafe-swiftshader',
  '--use-webgpu-adapter=swiftshader', '--enable-features=Vulkan'];

export async function launch({ webgpu = false } = {}) {
  const args = ['--disable-background-networking', '--disable-component-update',
    '--disable-default-apps', '--disable-sync', '--no-first-run', '--disable-extensions'];
  if (typeof process.getuid === 'function' && process.getuid() === 0) args.push('--no-sandbox');
  if (webgpu) args.push(...WEBGPU_FLAGS);
  return chromium.launch({ executablePath: chromiumPath(), headless: true, args });
}

// Open `url`, wait for the page to set window.__result (or window.__error), return it.
// The page's console goes to stderr so a failure names its cause.
export async function runPage(url, { webgpu = false, timeoutMs = 600000, onConsole } = {}) {
  const browser = await launch({ webgpu });
  try {
    const page = await browser.newPage();
    // Everything a page needs is served from 127.0.0.1 (no CDN): a request elsewhere is
    // refused and fails the run, naming it.
    const outside = [];
    await page.route((u) => u.protocol.startsWith('http') && u.hostname !== '127.0.0.1',
      (route) => { outside.push(route.request().url()); return route.abort(); });
    page.on('console', (msg) => (onConsole ?? ((m) => process.stderr.write(`[page] ${m}\n`)))(
      msg.text()));
    page.on('pageerror', (err) => process.stderr.write(`[page error] ${err.message}\n`));
    await page.goto(url);
    await page.waitForFunction(() => window.__result || window.__error, null,
      { timeout: timeoutMs, polling: 250 });
    const { result, error } = await page.evaluate(() => ({ result: window.__result,
      error: window.__error }));
    if (outside.length) throw new Error(`the page fetched from outside 127.0.0.1: ${outside[0]}`);
    if (error) throw new Error(error);
    return result;
  } finally {
    await browser.close();
  }
}
