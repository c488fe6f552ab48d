// Drives the knutepunkt web console in Debian's headless Chromium (run by tests/console.rs).
//
//   node tests/browser/console.mjs <base-url> <screenshot-dir> [dead-lettered-event-id]
//
// Loads the overview, lanes, dead letters and quarantine pages; finds the dead-lettered event on
// the dead letters page (the given id, else the first row), clicks its Replay button, checks the
// notice, finds the event with the search box, and reloads the event page until its audit trail
// shows it delivered after the replay. Writes a PNG of each main page to <screenshot-dir>.
// With CONSOLE_PATIENT_ID set, also checks that no page shows that identifier unmasked.
// Exit code 0 on success; 1 with a message on stderr otherwise.

import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const [base, shotDir, wantedId] = process.argv.slice(2);
if (!base || !shotDir) {
  console.error("usage: console.mjs <base-url> <screenshot-dir> [event-id]");
  process.exit(2);
}
const patient = process.env.CONSOLE_PATIENT_ID || "";
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";

function fail(msg) {
  throw new Error(msg);
}

mkdirSync(shotDir, { recursive: true });
const profile = mkdtempSync(join(tmpdir(), "knutepunkt-console-chromium-"));
let context;
const problems = [];
try {
  context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    viewport: { width: 1366, height: 768 },
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
  const page = context.pages()[0] ?? (await context.newPage());
  page.setDefaultTimeout(15000);
  // Console errors include CSP violations: the pages must need nothing but their own assets.
  page.on("console", (m) => {
    if (m.type() === "error") problems.push(`console error: ${m.text()}`);
  });
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  page.on("dialog", (d) => d.accept());

  async function visit(path, title) {
    const resp = await page.goto(base + path);
    if (!resp || resp.status() !== 200) fail(`${path}: HTTP ${resp && resp.status()}`);
    const h1 = (await page.textContent("h1")) || "";
    if (!h1.includes(title)) fail(`${path}: heading ${JSON.stringify(h1)}, wanted ${title}`);
    await checkMasked(path);
  }
  async function checkMasked(where) {
    if (patient && (await page.content()).includes(patient)) {
      fail(`${where}: patient identifier shown unmasked`);
    }
  }
  async function shot(name) {
    await page.screenshot({ path: join(shotDir, name), fullPage: true });
    console.log(`screenshot ${join(shotDir, name)}`);
  }

  // Overview: the destination with a dead letter is flagged in red.
  await visit("/console", "Overview");
  const deadCell = page.locator("#destinations tbody tr", { hasText: "epj" }).locator("td.bad").first();
  if ((await deadCell.count()) === 0) fail("overview: destination epj not flagged in red");
  await shot("overview.png");

  await visit("/console/lanes", "Lanes");
  await shot("lanes.png");

  await visit("/console/quarantine", "Quarantine");
  await shot("quarantine.png");

  // Dead letters: find the event's row and replay it.
  await visit("/console/dead-letters", "Dead letters");
  const row = wantedId
    ? page.locator(`#dead-letters tbody tr[data-event-id="${wantedId}"]`)
    : page.locator("#dead-letters tbody tr[data-event-id]").first();
  if ((await row.count()) === 0) fail(`dead letters: no row for event ${wantedId ?? "(any)"}`);
  const eventId = await row.getAttribute("data-event-id");
  console.log(`dead-lettered event ${eventId}`);
  await shot("dead-letters.png");
  await Promise.all([page.waitForNavigation(), row.locator("button.replay").click()]);
  if (!/\/console\/dead-letters\?.*notice=/.test(page.url())) {
    fail(`replay ended at ${page.url()}: ${(await page.textContent("main")) || ""}`);
  }

  const notice = (await page.textContent("#notice")) || "";
  if (!notice.includes(`Replayed event ${eventId}`)) fail(`replay notice: ${JSON.stringify(notice)}`);
  await shot("dead-letters-after-replay.png");

  // Find it with the search box and wait until the audit shows it delivered after the replay.
  await page.fill("header .search input[name=id]", eventId);
  await Promise.all([page.waitForURL(/\/console\/events\/[^?]+$/), page.click("header .search button")]);
  const deadline = Date.now() + 20000;
  for (;;) {
    const kinds = await page.locator("#audit li").evaluateAll((lis) => lis.map((li) => li.dataset.kind));
    const replayedAt = kinds.indexOf("replayed");
    if (replayedAt >= 0 && kinds.indexOf("delivered", replayedAt) > replayedAt) {
      console.log(`audit: ${kinds.join(" > ")}`);
      break;
    }
    if (Date.now() > deadline) fail(`event never delivered after replay; audit: ${kinds.join(" > ")}`);
    await page.waitForTimeout(250);
    await page.reload();
  }
  await checkMasked("event page");
  const states = await page.locator("#deliveries td.state").allTextContents();
  if (!states.includes("delivered") || !states.includes("replayed")) {
    fail(`deliveries table states: ${states.join(", ")}`);
  }
  await shot("event.png");
  await page.click("#fhir summary");
  await checkMasked("event page (FHIR open)");
  await shot("event-fhir.png");

  // Audit search for the event: its whole path with the replay, patient masked.
  await visit(`/console/audit?event_id=${encodeURIComponent(eventId)}`, "Audit trail");
  const steps = await page.locator("#audit tbody tr td:nth-child(3)").allTextContents();
  if (!steps.includes("replayed") || !steps.includes("delivered")) {
    fail(`audit page steps: ${steps.join(", ")}`);
  }
  await shot("audit.png");

  // The overview no longer counts the replayed dead letter for epj.
  await visit("/console", "Overview");
  await shot("overview-after-replay.png");

  if (problems.length) fail(problems.join("\n"));
  console.log("console browser test passed");
} catch (e) {
  console.error(`console browser test FAILED: ${e.message}`);
  if (problems.length) console.error(problems.join("\n"));
  process.exitCode = 1;
} finally {
  if (context) await context.close();
  rmSync(profile, { recursive: true, force: true });
}
