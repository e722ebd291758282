// Opens a URL in headless Chromium (Debian's, not a downloaded one) and prints what the page
// left in `window.__result` as one JSON line. Usage: node browser.mjs <url> [timeout-ms]
import { chromium } from "playwright-core";

const [url, timeout = "20000"] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM_PATH ?? "/usr/bin/chromium",
  headless: true,
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
try {
  const context = await browser.newContext(); // a fresh profile each run
  const page = await context.newPage();
  const console_ = [];
  page.on("console", (message) => console_.push(`${message.type()}: ${message.text()}`));
  await page.goto(url);
  await page.waitForFunction(() => window.__result !== undefined, null, {
    timeout: Number(timeout),
  });
  const result = await page.evaluate(() => window.__result);
  console.log(JSON.stringify({ ...result, console: console_ }));
} finally {
  await browser.close();
}
