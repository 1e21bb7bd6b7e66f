#!/usr/bin/env node
// End-to-end check of the web edge of c2s with a real web client in a real browser:
// Converse.js (the built dist of the npm package converse.js) on a page served here on
// loopback, in headless Chromium driven by playwright-core.
//
//   node tests/js/converse.mjs --transport websocket|bosh --url SERVICE_URL
//        --jid alice@localhost --to bob@localhost --send TEXT --expect TEXT
//        --screenshot PATH [--page-port 0] [--chromium /usr/bin/chromium] [--timeout 15]
//   password: --password or $CONVERSE_PASSWORD
//   (SERVICE_URL: ws://HOST:PORT/xmpp-websocket for websocket, http://HOST:PORT/http-bind
//   for bosh)
//
// Steps: serve a page (node's http module, on 127.0.0.1:--page-port, 0 for any) that
// loads Converse.js from node_modules/converse.js/dist and initialises it with
// auto_login and only the given connection method (no XEP-0156 discovery); launch
// Chromium once, in a fresh context (no storage survives the run); wait until Converse
// says it is connected (its 'connected' event, seen by a small plugin that exposes the
// private API to the page); open a chat with --to, type --send into the chat's text
// area and press Enter (the UI path a user takes); wait until a message with --expect
// from --to shows in that chat (the peer's answer, sent by the caller); screenshot the
// chat; log out.
//
// CONVERSE_TRACE=1 prints the browser console (Converse at loglevel debug logs every
// stanza) on stderr as it comes.
//
// Exit status 0 and a JSON summary on stdout on success; 1 with the reason, the browser
// console and the page's errors on stderr on a failure; 2 on the overall timeout; 64 on
// a usage error.

import { createReadStream, statSync } from "node:fs";
import http from "node:http";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

import { chromium } from "playwright-core";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const DIST = path.join(HERE, "node_modules", "converse.js", "dist");

// -- options -------------------------------------------------------------------------------

const { values: opt } = parseArgs({
  options: {
    transport: { type: "string", default: "websocket" },
    url: { type: "string" },
    jid: { type: "string", default: "alice@localhost" },
    password: { type: "string", default: process.env.CONVERSE_PASSWORD },
    to: { type: "string", default: "bob@localhost" },
    send: { type: "string" },
    expect: { type: "string" },
    screenshot: { type: "string" },
    "page-port": { type: "string", default: "0" },
    chromium: { type: "string", default: process.env.CHROMIUM || "/usr/bin/chromium" },
    timeout: { type: "string", default: "15" },
  },
  strict: true,
});
function usage(message) {
  console.error(`converse.mjs: ${message}`);
  process.exit(64);
}
for (const name of ["url", "password", "send", "expect", "screenshot"]) {
  if (!opt[name]) usage(`--${name} is required${name === "password" ? " (or $CONVERSE_PASSWORD)" : ""}`);
}
if (!["websocket", "bosh"].includes(opt.transport)) usage("--transport is websocket or bosh");
const OVERALL_MS = Number(opt.timeout) * 1000;
const STEP_MS = Math.min(10_000, OVERALL_MS);

// -- failure reporting -------------------------------------------------------------------

const started = Date.now();
const steps = [];
const consoleLines = []; // the browser console, in order
const pageErrors = []; // uncaught exceptions in the page
const failedRequests = [];
let lastStep = "(start)";
let browser = null;
let server = null;

function step(name) {
  lastStep = name;
  steps.push({ step: name, ms: Date.now() - started });
}

class Failure extends Error {}

function fail(message) {
  throw new Failure(message);
}

async function report(message, status) {
  const lines = [`FAIL: ${message}`, `  after ${Date.now() - started} ms; last step: ${lastStep}`];
  lines.push("  page errors:", ...(pageErrors.length ? pageErrors.map((e) => `    ${e}`) : ["    (none)"]));
  if (failedRequests.length) lines.push("  failed requests:", ...failedRequests.map((r) => `    ${r}`));
  lines.push("  browser console:", ...(consoleLines.length ? consoleLines.map((l) => `    ${l}`) : ["    (empty)"]));
  console.error(lines.join("\n"));
  // The browser is a child process: it must not outlive us.
  await Promise.race([browser?.close().catch(() => {}), new Promise((r) => setTimeout(r, 2000))]);
  process.exit(status);
}

// Not unref()ed: it also keeps the process from ending silently while a step waits.
setTimeout(() => report(`timed out after ${OVERALL_MS / 1000} s`, 2), OVERALL_MS);

// -- the page ------------------------------------------------------------------------------

const TYPES = {
  ".js": "text/javascript; charset=utf-8",
  ".mjs": "text/javascript; charset=utf-8",
  ".css": "text/css; charset=utf-8",
  ".json": "application/json",
  ".wasm": "application/wasm",
  ".map": "application/json",
  ".svg": "image/svg+xml",
  ".png": "image/png",
  ".woff": "font/woff",
  ".woff2": "font/woff2",
  ".ttf": "font/ttf",
  ".mp3": "audio/mpeg",
  ".ogg": "audio/ogg",
};

function settings() {
  const connection = opt.transport === "websocket"
    ? { websocket_url: opt.url }
    : { bosh_service_url: opt.url };
  return {
    ...connection,
    jid: opt.jid,
    password: opt.password,
    auto_login: true,
    discover_connection_methods: false,
    auto_reconnect: false, // a dropped connection is a failure here, not something to mend
    assets_path: "/dist/",
    i18n: "en",
    loglevel: process.env.CONVERSE_TRACE ? "debug" : "info",
    // Nothing kept for a next run (the browser context is fresh anyway): no SCRAM keys,
    // no cache after logout, the session's data in the page's storage only.
    reuse_scram_keys: false,
    clear_cache_on_logout: true,
    persistent_store: "localStorage",
    allow_url_history_change: false,
    play_sounds: false,
    show_desktop_notifications: false,
    view_mode: "fullscreen",
    whitelisted_plugins: ["jabberd-test"],
  };
}

// The plugin is the documented way to the private API (converse.plugins.add); it makes
// the page's state observable from here through window.__test.
function page() {
  const json = JSON.stringify(settings()).replace(/</g, "\\u003c");
  return `<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>jabberd-rs: Converse.js (${opt.transport})</title>
  <link rel="stylesheet" href="/dist/converse.min.css">
  <script type="module" src="/dist/converse.min.js"></script>
</head>
<body class="converse-fullscreen">
<!-- The dist is an ES module; module scripts run in order, after the document parsed. -->
<script type="module">
  window.__test = { connected: 0, disconnected: 0, events: [], api: null };
  converse.plugins.add("jabberd-test", {
    initialize() {
      const api = this._converse.api;
      window.__test.api = api;
      for (const name of ["connected", "reconnected", "disconnected", "connectionInitialized"]) {
        api.listen.on(name, () => window.__test.events.push(name));
      }
      api.listen.on("connected", () => { window.__test.connected += 1; });
      api.listen.on("disconnected", () => { window.__test.disconnected += 1; });
    },
  });
  converse.initialize(${json}).catch((e) => { window.__test.initError = String(e && e.stack || e); });
</script>
</body>
</html>
`;
}

function serve(req, res) {
  const url = new URL(req.url, "http://page");
  if (req.method !== "GET" && req.method !== "HEAD") {
    res.writeHead(405).end();
    return;
  }
  if (url.pathname === "/" || url.pathname === "/index.html") {
    res.writeHead(200, { "Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-store" });
    res.end(page());
    return;
  }
  if (url.pathname === "/favicon.ico") {
    res.writeHead(204).end();
    return;
  }
  if (url.pathname.startsWith("/dist/")) {
    const file = path.normalize(path.join(DIST, decodeURIComponent(url.pathname.slice("/dist/".length))));
    if (file.startsWith(DIST + path.sep)) {
      let st = null;
      try {
        st = statSync(file);
      } catch {}
      if (st?.isFile()) {
        res.writeHead(200, {
          "Content-Type": TYPES[path.extname(file)] || "application/octet-stream",
          "Content-Length": st.size,
        });
        if (req.method === "HEAD") res.end();
        else createReadStream(file).pipe(res);
        return;
      }
    }
  }
  res.writeHead(404, { "Content-Type": "text/plain" }).end("not found\n");
}

async function listen() {
  server = http.createServer(serve);
  await new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(Number(opt["page-port"]), "127.0.0.1", resolve);
  });
  return server.address().port;
}

// -- the wire ------------------------------------------------------------------------------

/** The attributes of an XML start tag (the first one in `text`), by local name. */
function startTagAttrs(text) {
  const tag = /<(?:[\w.-]+:)?[\w.-]+((?:\s+[\w.:-]+\s*=\s*(?:'[^']*'|"[^"]*"))*)\s*\/?>/.exec(text || "");
  const attrs = {};
  for (const [, name, , v1, v2] of (tag?.[1] || "").matchAll(/([\w.:-]+)\s*=\s*('([^']*)'|"([^"]*)")/g)) {
    attrs[name] = v1 ?? v2;
  }
  return attrs;
}

class Wire {
  constructor() {
    this.loggingOut = false;
    this.bosh = []; // {rid, type, status, response, answeredInLogout}
    this.frames = []; // {dir, payload, inLogout}
    this.sockets = []; // {closed, inLogout}
    this.pending = new Map(); // BOSH request -> its entry
    this.reading = new Set(); // answers being read
  }

  watch(tab) {
    const isBosh = (req) => opt.transport === "bosh" && req.method() === "POST" && req.url() === opt.url;
    tab.on("request", (req) => {
      if (!isBosh(req)) return;
      const a = startTagAttrs(req.postData());
      const entry = { rid: a.rid, type: a.type ?? null, sentInLogout: this.loggingOut, status: null, response: null };
      this.bosh.push(entry);
      this.pending.set(req, entry);
    });
    tab.on("requestfinished", (req) => {
      const entry = this.pending.get(req);
      if (!entry) return;
      entry.answeredInLogout = this.loggingOut;
      const reading = (async () => {
        const res = await req.response();
        entry.status = res?.status() ?? null;
        entry.response = await res?.text().catch((e) => `(unreadable: ${e.message})`);
      })().finally(() => {
        this.pending.delete(req);
        this.reading.delete(reading);
      });
      this.reading.add(reading);
    });
    tab.on("requestfailed", (req) => {
      const entry = this.pending.get(req);
      if (!entry) return;
      entry.answeredInLogout = this.loggingOut;
      entry.failed = req.failure()?.errorText;
      this.pending.delete(req);
    });
    tab.on("websocket", (ws) => {
      const socket = { url: ws.url(), closed: false };
      this.sockets.push(socket);
      const add = (dir) => (f) => this.frames.push({ dir, payload: String(f.payload), inLogout: this.loggingOut });
      ws.on("framesent", add("sent"));
      ws.on("framereceived", add("received"));
      ws.on("close", () => { socket.closed = true; socket.closedInLogout = this.loggingOut; });
    });
  }

  /** Waits until every BOSH request has its answer read and every WebSocket closed. */
  async settle(ms) {
    const deadline = Date.now() + ms;
    while (Date.now() < deadline) {
      if (!this.pending.size && !this.reading.size && this.sockets.every((s) => s.closed)) return true;
      await new Promise((r) => setTimeout(r, 50));
    }
    return false;
  }

  /** What the logout looked like on the wire. */
  logout() {
    if (opt.transport === "bosh") {
      return {
        // Every answer that came once the logout began (the held request's among them).
        bosh_answers: this.bosh.filter((e) => e.answeredInLogout).map((e) => ({
          rid: e.rid,
          request_type: e.type,
          sent_in_logout: e.sentInLogout,
          status: e.status,
          failed: e.failed,
          body: e.response,
          attrs: e.response ? startTagAttrs(e.response) : null,
        })),
        unanswered: this.bosh.filter((e) => e.status === null && !e.failed).length,
      };
    }
    return {
      frames: this.frames.filter((f) => f.inLogout).map(({ dir, payload }) => ({ dir, payload })),
      sockets: this.sockets,
    };
  }
}

// -- the test ------------------------------------------------------------------------------

async function main() {
  try {
    statSync(path.join(DIST, "converse.min.js"));
  } catch {
    fail(`no Converse.js in ${DIST}: npm ci --prefix tests/js`);
  }
  const port = await listen();
  const pageUrl = `http://127.0.0.1:${port}/`;
  step(`page served at ${pageUrl}`);

  try {
    browser = await chromium.launch({
      executablePath: opt.chromium,
      // --no-sandbox: CI runs as root, where Chromium's sandbox cannot start.
      args: ["--no-sandbox", "--disable-dev-shm-usage"],
      timeout: STEP_MS,
    });
  } catch (err) {
    fail(`cannot launch Chromium at ${opt.chromium}: ${err?.message || err}`);
  }
  step(`Chromium ${browser.version()} launched`);
  // A fresh context: its own empty storage, gone with it.
  const context = await browser.newContext({ viewport: { width: 1000, height: 640 } });
  // Only loopback: the page and the server. Anything else (the sponsor logos of
  // Converse's fullscreen brand heading) is refused, and listed in the summary.
  const blocked = new Set();
  await context.route((url) => !["127.0.0.1", "localhost", "[::1]"].includes(url.hostname), (route) => {
    blocked.add(route.request().url());
    return route.abort("blockedbyclient");
  });
  const tab = await context.newPage();
  tab.setDefaultTimeout(STEP_MS);
  tab.on("console", (m) => {
    const line = `[${m.type()}] ${m.text()}`;
    consoleLines.push(line);
    if (process.env.CONVERSE_TRACE) console.error(`console ${line}`);
  });
  tab.on("pageerror", (e) => pageErrors.push(String(e?.stack || e)));
  tab.on("requestfailed", (r) => r.failure()?.errorText.startsWith("net::ERR_BLOCKED_BY_CLIENT") || failedRequests.push(`${r.method()} ${r.url()}: ${r.failure()?.errorText}`));
  tab.on("response", (r) => {
    if (r.status() >= 400) failedRequests.push(`${r.request().method()} ${r.url()}: HTTP ${r.status()}`);
  });

  // The transport as the browser sees it, for the logout: BOSH requests and their
  // answers (the server's side of XEP-0124 section 13), WebSocket frames (RFC 7395 3.6).
  const wire = new Wire();
  wire.watch(tab);

  await tab.goto(pageUrl, { waitUntil: "load" });
  step("page loaded");

  // Connected: Converse's 'connected' event (after SASL, binding and its session setup).
  const connected = await tab.waitForFunction(() => {
    const t = window.__test;
    if (t?.initError) return { error: t.initError };
    if (t?.disconnected) return { error: `disconnected (events: ${t.events.join(", ")})` };
    return t?.connected && t.api.connection.connected() ? { ok: true } : null;
  }, null, { timeout: STEP_MS, polling: 50 }).then((h) => h.jsonValue(), (e) => ({ error: `not connected: ${e.message.split("\n")[0]}` }));
  if (connected.error) fail(`Converse: ${connected.error}`);
  const session = await tab.evaluate(({ transport }) => {
    const api = window.__test.api;
    const conn = api.connection.get();
    return {
      jid: conn.jid,
      service: conn.service,
      is_websocket: api.connection.isType("websocket"),
      is_bosh: api.connection.isType("bosh"),
      is_transport: api.connection.isType(transport),
    };
  }, { transport: opt.transport });
  if (!session.is_transport) fail(`Converse connected, but not over ${opt.transport}: ${JSON.stringify(session)}`);
  if (session.service !== opt.url) fail(`Converse connected to ${session.service}, not to ${opt.url}`);
  if (!session.jid?.startsWith(`${opt.jid}/`)) fail(`Converse's JID is ${session.jid}, not a full JID of ${opt.jid}`);
  step(`connected over ${opt.transport} as ${session.jid}`);

  // A chat with the peer, then the message typed into it as a user would.
  await tab.evaluate((to) => window.__test.api.chats.open(to, {}, true), opt.to);
  const chat = tab.locator(`converse-chat[jid="${opt.to}"]`);
  const textarea = chat.locator("textarea.chat-textarea");
  await textarea.waitFor({ state: "visible" }).catch(() => fail(`no chat with ${opt.to} opened`));
  await textarea.fill(opt.send);
  await textarea.press("Enter");
  step(`typed the message to ${opt.to}`);
  const own = chat.locator("converse-chat-message .chat-msg__text", { hasText: opt.send });
  await own.first().waitFor({ state: "visible" }).catch(() => fail(`the sent message does not show in the chat`));
  // Sent: Converse's model has it, with the id the stanza carried.
  const sent = await tab.evaluate(async ({ to, text }) => {
    const chat = await window.__test.api.chats.get(to);
    const m = chat?.messages.findWhere({ body: text });
    return m ? { msgid: m.get("msgid"), sender: m.get("sender"), type: m.get("type") } : null;
  }, { to: opt.to, text: opt.send });
  if (!sent || sent.sender !== "me") fail(`the chat's model has no message of mine '${opt.send}': ${JSON.stringify(sent)}`);
  step("the sent message shows in the chat");

  // The answer (sent by the caller once the peer got our message) in the chat.
  const answer = chat.locator("converse-chat-message .chat-msg__text", { hasText: opt.expect });
  await answer.first().waitFor({ state: "visible" }).catch(() => fail(`no answer '${opt.expect}' in the chat with ${opt.to}`));
  const received = await tab.evaluate(async ({ to, text }) => {
    const chat = await window.__test.api.chats.get(to);
    const m = chat?.messages.find((m) => m.get("body")?.includes(text));
    return m ? { from: m.get("from"), sender: m.get("sender"), body: m.get("body"), type: m.get("type") } : null;
  }, { to: opt.to, text: opt.expect });
  if (!received || received.sender !== "them" || !received.from?.startsWith(opt.to)) {
    fail(`the answer in the chat is not from ${opt.to}: ${JSON.stringify(received)}`);
  }
  step("the answer shows in the chat");

  // The chat's box (<converse-chat> itself has no box of its own to measure).
  await chat.locator(".box-flyout").first().screenshot({ path: opt.screenshot, animations: "disabled" });
  step(`screenshot written to ${opt.screenshot}`);

  const messages = await chat.locator("converse-chat-message .chat-msg__text").allInnerTexts();
  wire.loggingOut = true;
  await tab.evaluate(() => window.__test.api.user.logout()).catch(() => {});
  await wire.settle(3000);
  step("logged out");
  const logout = wire.logout();
  await browser.close();
  browser = null;
  server.close();
  step("browser closed");

  // (Less the blocked requests' "Failed to load resource: net::ERR_BLOCKED_BY_CLIENT".)
  const errors = consoleLines.filter((l) => l.startsWith("[error]") && !l.includes("ERR_BLOCKED_BY_CLIENT"));
  console.log(JSON.stringify({
    ok: true,
    client: "converse.js",
    browser: "chromium",
    transport: opt.transport,
    url: opt.url,
    page: pageUrl,
    jid: session.jid,
    sent: { body: opt.send, ...sent },
    received,
    chat_messages: messages,
    screenshot: opt.screenshot,
    logout,
    console_errors: errors,
    blocked_requests: [...blocked],
    failed_requests: failedRequests,
    page_errors: pageErrors,
    ms: Date.now() - started,
    steps,
  }, null, 2));
}

main().then(
  () => process.exit(0),
  (err) => report(err instanceof Failure ? err.message : `unexpected error: ${err?.stack || err}`, 1),
);
