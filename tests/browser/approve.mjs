// Answers a promotion's approval form in the Prefect UI, as a person would, in Debian's Chromium
// driven by Playwright (playwright-core from npm, installed under .tools/npm by scripts/setup.sh).
//
//   node tests/browser/approve.mjs --url <flow run page> --approver <name> [--comment <text>]
//        [--reject] --screenshot <png>
//
// Opens the suspended run's page, clicks "Resume", fills the form (Approve, Your name, Comment),
// keeps a screenshot of the filled form and submits it. Prints one JSON line: what the form showed.
// The machine has no internet: Chromium is started without any of its background traffic.

import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

const here = path.dirname(fileURLToPath(import.meta.url));
const require = createRequire(path.join(here, '..', '..', '.tools', 'npm', 'package.json'));
const { chromium } = require('playwright-core');

function args(argv) {
  const out = { reject: false, comment: '' };
  for (let i = 0; i < argv.length; i++) {
    const key = argv[i].replace(/^--/, '');
    if (key === 'reject') out.reject = true;
    else out[key] = argv[++i];
  }
  for (const need of ['url', 'approver', 'screenshot']) {
    if (!out[need]) throw new Error(`--${need} is required`);
  }
  return out;
}

const opts = args(process.argv.slice(2));
const browser = await chromium.launch({
  executablePath: process.env.DELIVERY_CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
    '--disable-component-update', '--disable-sync', '--no-first-run'],
});
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
  page.setDefaultTimeout(60_000);
  await page.goto(opts.url, { waitUntil: 'domcontentloaded' });
  // The page shows "Resume" for a run that waits for input.
  await page.getByRole('button', { name: /^\s*Resume\s*$/ }).first().click();
  const dialog = page.getByRole('dialog').filter({ hasText: 'Resume Flow Run' });
  await dialog.waitFor();
  const field = (label) => dialog.locator('.schema-form-property').filter({
    has: page.locator('.schema-form-property__label', { hasText: new RegExp(`^\\s*${label}\\b`) }),
  });
  const toggle = field('Approve').getByRole('switch');
  await toggle.waitFor();
  if (!opts.reject) {
    await toggle.click();
    if ((await toggle.getAttribute('aria-checked')) !== 'true') throw new Error('the Approve switch did not turn on');
  }
  await field('Your name').locator('textarea').fill(opts.approver);
  await field('Comment').locator('textarea').fill(opts.comment);
  const shown = await dialog.innerText();
  await page.screenshot({ path: opts.screenshot, fullPage: true });
  await dialog.getByRole('button', { name: 'Submit' }).click();
  await dialog.waitFor({ state: 'detached' });
  console.log(JSON.stringify({ submitted: true, approved: !opts.reject, form: shown }));
} finally {
  await browser.close();
}
