// Browser test of the dashboard: `orchestrator serve --agents 1` on a fresh SQLite file, driven through
// its pages only by Debian's chromium (playwright-core). Screenshots go to target/ui-screenshots/.
//
//   node ui-tests/dashboard.test.mjs [path/to/orchestrator]
//
// Environment: ORCH_BIN (the binary, default target/debug/orchestrator), CHROMIUM (default
// /usr/bin/chromium), SCREENSHOTS (default target/ui-screenshots).
import { chromium } from "playwright-core";
import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, mkdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const bin = path.resolve(process.argv[2] || process.env.ORCH_BIN || path.join(root, "target/debug/orchestrator"));
const shots = path.resolve(process.env.SCREENSHOTS || path.join(root, "target/ui-screenshots"));
mkdirSync(shots, { recursive: true });

const TOKENS = {
  alice: "alice-admin-token-0123456789", // admin: approves
  bob: "bob-operator-token-0123456789", // operator: creates
  vic: "vic-viewer-token-0123456789", // viewer: reads
};
const started = Date.now();
const step = (s) => console.log(`[${((Date.now() - started) / 1000).toFixed(1)}s] ${s}`);

// ---- the server, on a fresh SQLite file in a temporary directory, with a git repository to change ----
const dir = mkdtempSync(path.join(tmpdir(), "orch-ui-"));
const git = (cwd, ...args) =>
  execFileSync("git", ["-c", "user.name=ui test", "-c", "user.email=ui@localhost", ...args], { cwd, stdio: "pipe" });
const work = path.join(dir, "work");
mkdirSync(work);
writeFileSync(path.join(work, "README.md"), "# Demo\n");
git(work, "init", "--quiet", "--initial-branch=main");
git(work, "add", ".");
git(work, "commit", "--quiet", "-m", "init");
const repo = path.join(dir, "demo.git");
git(dir, "clone", "--quiet", "--bare", work, repo);

const server = spawn(bin, ["serve", "--agents", "1", "--bind", "127.0.0.1:0"], {
  cwd: dir,
  env: {
    ...process.env,
    ORCH_API_TOKENS: `alice:admin:${TOKENS.alice},bob:operator:${TOKENS.bob},vic:viewer:${TOKENS.vic}`,
    ORCH_REQUIRE_APPROVAL: "true",
    ORCH_ALLOW_SELF_APPROVAL: "false",
    AGENT_POLL_INTERVAL_MS: "200",
    RUST_LOG: process.env.RUST_LOG || "warn",
  },
  stdio: ["ignore", "pipe", "pipe"],
});
let serverOut = "";
server.stderr.on("data", (d) => (serverOut += d));
const base = await new Promise((resolve, reject) => {
  const timer = setTimeout(() => reject(new Error("the server did not start within 60 s:\n" + serverOut)), 60_000);
  let buf = "";
  server.stdout.on("data", (d) => {
    buf += d;
    serverOut += d;
    const m = buf.match(/dashboard: (http:\/\/\S+)\/ui/);
    if (m) {
      clearTimeout(timer);
      resolve(m[1]);
    }
  });
  server.on("exit", (code) => reject(new Error(`the server exited (${code}):\n${serverOut}`)));
});
step(`server at ${base}`);

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
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

let failed = false;
try {
  await run();
  step("all checks passed");
} catch (e) {
  failed = true;
  console.error("FAILED:", e);
  for (const [i, c] of browser.contexts().entries()) {
    for (const [j, p] of c.pages().entries()) {
      await p.screenshot({ path: path.join(shots, `failure-${i}-${j}.png`), fullPage: true }).catch(() => {});
    }
  }
  console.error("--- server output ---\n" + serverOut.slice(-4000));
} finally {
  await browser.close().catch(() => {});
  server.kill("SIGTERM");
  await new Promise((r) => setTimeout(r, 300));
  rmSync(dir, { recursive: true, force: true });
}
process.exit(failed ? 1 : 0);

async function shot(page, name) {
  await page.screenshot({ path: path.join(shots, `${name}.png`), fullPage: true });
}

/// A signed-in page of its own browser context (its own cookie jar).
async function signIn(who, viewport = { width: 1280, height: 900 }) {
  const context = await browser.newContext({ viewport });
  const page = await context.newPage();
  page.setDefaultTimeout(20_000);
  page.on("pageerror", (e) => {
    throw new Error(`script error on ${page.url()}: ${e}`);
  });
  await page.goto(base + "/"); // `/` redirects to /ui, which asks to sign in
  assert.match(page.url(), /\/ui\/sign-in/);
  await page.getByLabel("API token").fill(TOKENS[who]);
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.waitForURL(/\/ui$/);
  await page.getByTestId("who").filter({ hasText: who }).waitFor();
  return page;
}

async function noHorizontalScroll(page, what) {
  const { sw, w } = await page.evaluate(() => ({ sw: document.documentElement.scrollWidth, w: window.innerWidth }));
  assert.ok(sw <= w, `${what}: horizontal scroll at ${w} px (content is ${sw} px wide)`);
}

async function run() {
  // ---- sign-in page (screenshot before signing in) ----
  {
    const ctx = await browser.newContext({ viewport: { width: 1280, height: 700 } });
    const p = await ctx.newPage();
    await p.goto(base + "/ui/projects");
    await p.waitForURL(/sign-in\?next=/);
    await shot(p, "01-sign-in");
    await p.getByLabel("API token").fill("wrong-token");
    await p.getByRole("button", { name: "Sign in" }).click();
    await p.getByText("Unknown token.").waitFor();
    await ctx.close();
  }

  const bob = await signIn("bob");
  const alice = await signIn("alice");
  step("bob (operator) and alice (admin) signed in");

  // ---- a project with a repository, its vision, requirements ----
  await bob.getByRole("link", { name: "Projects", exact: true }).click();
  await bob.getByLabel("Name").fill("Web shop");
  await bob.getByLabel("Description").fill("The shop's storefront.");
  await bob.getByLabel("Repository URL (optional)").fill(repo);
  await bob.getByLabel("Base branch (optional)").fill("main");
  await bob.getByRole("button", { name: "Create project" }).click();
  await bob.waitForURL(/\/ui\/projects\/[0-9a-f-]+$/);
  const projectUrl = bob.url();
  await bob.getByText("Edit the vision").click();
  await bob.getByRole("textbox", { name: "Vision" }).fill("A shop people enjoy.");
  await bob.getByRole("button", { name: "Save a new version" }).click();
  await bob.getByTestId("vision").filter({ hasText: "A shop people enjoy." }).waitFor();
  await bob.getByText("Edit the vision").click();
  await bob.getByRole("textbox", { name: "Vision" }).fill("A shop people enjoy, on every phone.");
  await bob.getByRole("button", { name: "Save a new version" }).click();
  await bob.getByText("Version history (2)").waitFor();
  step("project created, vision at v2");

  await bob.getByText("Propose requirements").click();
  await bob.getByLabel("Requirements, one per line").fill("Login page\nLogout button");
  await bob.getByRole("button", { name: "Propose" }).click();
  const draft = bob.getByTestId("draft").first();
  await draft.getByTestId("state").filter({ hasText: "proposed" }).waitFor();
  // Bob may not approve what he proposed: the API's refusal shows in the page with its request id.
  await draft.getByRole("button", { name: "Approve requirements" }).click();
  const refusal = draft.locator(".form-error");
  await refusal.getByText(/another token must approve/).waitFor();
  await refusal.getByText(/request id \S+/).waitFor();
  await shot(bob, "03-project-self-approval-refused");
  // Alice approves them from the approvals inbox (content and hash shown).
  await alice.getByRole("link", { name: "Approvals", exact: true }).click();
  const card = alice.getByTestId("approval").filter({ hasText: "Login page" });
  await card.getByText("Content hash").waitFor();
  await shot(alice, "04-approvals-requirements");
  await card.getByRole("button", { name: "Approve", exact: true }).click();
  await alice.getByTestId("approval").filter({ hasText: "Login page" }).waitFor({ state: "detached" });
  // Bob's project page shows the approved draft and its work items without a reload.
  await draft.getByTestId("state").filter({ hasText: "approved" }).waitFor();
  await draft.getByRole("link", { name: "Login page" }).waitFor();
  await shot(bob, "02-project");
  step("requirements proposed by bob, approved by alice");

  // ---- a work item with a recipe asking for a secret ----
  await bob.getByRole("link", { name: "New work item" }).first().click();
  await bob.getByLabel("Title").fill("Write the release notes");
  await bob.getByLabel("Labels (comma separated; agents need these capabilities)").fill("");
  await bob.getByLabel("Priority (higher runs first)").fill("5");
  const recipe = bob.getByLabel("Recipe (YAML, optional)");
  await recipe.fill("name: notes\nsteps:\n  - run: echo hi\n    timeout: soon\n");
  await bob.getByRole("button", { name: "Create work item" }).click();
  await bob.locator(".form-error li").getByText(/^line 4, column \d+: steps\[0\].timeout/).waitFor();
  await shot(bob, "05-new-item-recipe-error");
  await recipe.fill(
    [
      "name: release-notes",
      "inputs:",
      "  - name: TOKEN",
      "    kind: secret",
      "    prompt: Deploy token for the release?",
      "steps:",
      '  - echo "preparing the notes"',
      "  - sleep 1",
      '  - echo "token has ${#TOKEN} characters"',
      "  - name: write",
      "    run: printf '# Release notes\\n\\nFirst release.\\n' > NOTES.md",
      '  - echo "notes written"',
    ].join("\n"),
  );
  await bob.getByRole("button", { name: "Create work item" }).click();
  await bob.waitForURL(/\/ui\/items\/[0-9a-f-]+$/);
  const itemUrl = bob.url();
  await bob.getByTestId("state").first().filter({ hasText: "awaiting approval" }).waitFor();
  step("work item created, awaiting approval");

  // Alice approves it; bob's item page turns ready by itself.
  await alice.getByRole("link", { name: "Approvals", exact: true }).click();
  const itemApproval = alice.getByTestId("approval").filter({ hasText: "Write the release notes" });
  await itemApproval.getByText("Recipe").click();
  await itemApproval.getByText("kind: secret").waitFor();
  await shot(alice, "06-approvals-item");
  await itemApproval.getByRole("button", { name: "Approve", exact: true }).click();
  await itemApproval.waitFor({ state: "detached" });
  await bob.reload(); // the actions depend on the state
  await bob.getByTestId("state").first().filter({ hasText: "ready" }).waitFor();
  await bob.getByLabel("Priority", { exact: true }).fill("7");
  await bob.getByRole("button", { name: "Enqueue" }).click();
  step("approved by alice, enqueued by bob");

  // The agent claims it and asks for the token: a run link appears on the item page without a reload.
  const runLink = bob.getByTestId("run-link").first();
  await runLink.waitFor({ timeout: 30_000 });
  await bob.getByTestId("state").first().filter({ hasText: "waiting input" }).waitFor({ timeout: 30_000 });
  await shot(bob, "07-item");
  await runLink.click();
  await bob.waitForURL(/\/ui\/runs\/[0-9a-f-]+$/);
  await bob.evaluate(() => (window.__sameDocument = true));
  await bob.getByText("Deploy token for the release?").waitFor();
  step("run waits for input; bob watches the run page");

  // Alice answers in the questions inbox, with a password field.
  await alice.getByRole("link", { name: "Questions", exact: true }).click();
  const q = alice.getByTestId("question").filter({ hasText: "Deploy token for the release?" });
  const answer = q.getByLabel(/Answer/);
  assert.equal(await answer.getAttribute("type"), "password");
  await answer.fill("s3cr3t-value");
  await shot(alice, "08-questions");
  await q.getByRole("button", { name: "Answer" }).click();
  await q.waitFor({ state: "detached" });
  step("alice answered the secret");

  // Bob's run page: the log arrives live (no reload), the run succeeds, its branch and diff show.
  const log = bob.getByTestId("log");
  await log.getByText("token has 12 characters").waitFor({ timeout: 60_000 });
  await log.getByText("notes written").waitFor({ timeout: 30_000 });
  await bob.locator('[data-testid="run-state"][data-state="succeeded"]').waitFor({ timeout: 30_000 });
  await bob.getByTestId("branch").waitFor({ timeout: 15_000 });
  await bob.getByTestId("diff").getByText("+First release.").waitFor();
  assert.equal(await bob.evaluate(() => window.__sameDocument), true, "the run page reloaded");
  const text = await bob.content();
  assert.ok(!text.includes("s3cr3t-value"), "the secret is shown back");
  await shot(bob, "09-run");
  step("log streamed live, run succeeded with a diff");

  // The board and the overview.
  await bob.getByRole("link", { name: "Work items", exact: true }).click();
  await bob.locator("#col-succeeded").getByText("Write the release notes").waitFor();
  await bob.getByLabel("Label").fill("none-such");
  await bob.getByRole("button", { name: "Filter" }).click();
  await bob.locator("#col-succeeded").getByText("Write the release notes").waitFor({ state: "detached" });
  await bob.goto(base + "/ui/items");
  await shot(bob, "10-board");
  await bob.getByRole("link", { name: "Overview", exact: true }).click();
  await bob.getByTestId("count-succeeded").filter({ hasText: "1" }).waitFor();
  await shot(bob, "11-overview");

  // ---- a viewer: no write controls, and a forged write with its cookie is refused ----
  const vic = await signIn("vic");
  for (const url of [projectUrl, itemUrl, base + "/ui/approvals", base + "/ui/questions", base + "/ui/projects", base + "/ui/items/new"]) {
    await vic.goto(url);
    assert.equal(await vic.locator("form.api").count(), 0, `a viewer sees a write control on ${url}`);
    assert.equal(await vic.getByRole("button", { name: /Approve|Enqueue|Cancel|Answer|Create/ }).count(), 0, url);
  }
  await vic.goto(base + "/ui/projects");
  await shot(vic, "12-viewer-projects");
  const forged = await vic.evaluate(async () => {
    const post = (headers) =>
      fetch("/projects", { method: "POST", headers: { "Content-Type": "application/json", ...headers }, body: '{"name":"forged"}' }).then(
        async (r) => ({ status: r.status, body: await r.json() }),
      );
    const csrf = document.querySelector('meta[name="csrf-token"]').content;
    return { noCsrf: await post({}), withCsrf: await post({ "X-CSRF-Token": csrf }) };
  });
  assert.equal(forged.noCsrf.status, 403, JSON.stringify(forged.noCsrf));
  assert.equal(forged.withCsrf.status, 403, JSON.stringify(forged.withCsrf));
  assert.match(forged.withCsrf.body.error.message, /viewer/);
  step("viewer: no write controls; forged writes refused (403)");
  // Sign-out ends the session.
  await vic.getByRole("button", { name: "Sign out" }).click();
  await vic.waitForURL(/sign-in/);
  const after = await vic.evaluate(() => fetch("/stats").then((r) => r.status));
  assert.equal(after, 401);

  // ---- 390 px wide: no horizontal scroll ----
  const phone = await signIn("bob", { width: 390, height: 844 });
  for (const [name, url] of [
    ["13-phone-overview", base + "/ui"],
    ["14-phone-board", base + "/ui/items"],
    ["15-phone-project", projectUrl],
    ["16-phone-item", itemUrl],
  ]) {
    await phone.goto(url);
    await noHorizontalScroll(phone, name);
    await shot(phone, name);
  }
  await phone.goto(itemUrl);
  await phone.getByTestId("run-link").first().click();
  await phone.getByTestId("log").getByText("notes written").waitFor();
  await noHorizontalScroll(phone, "phone run page");
  await shot(phone, "17-phone-run");
  // Keyboard: the skip link is the first stop and leads to the content.
  await phone.keyboard.press("Tab");
  assert.equal(await phone.evaluate(() => document.activeElement.textContent), "Skip to content");
  step("390 px pages have no horizontal scroll");
}
