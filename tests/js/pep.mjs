#!/usr/bin/env node
// End-to-end check of entity capabilities (XEP-0115) and personal eventing (XEP-0163)
// with xmpp.js (@xmpp/client) as a client independent of the Python (slixmpp) tests.
//
//   node tests/js/pep.mjs --port C2S_STARTTLS_PORT [--host 127.0.0.1] [--domain localhost]
//        [--user-a alice] [--user-b bob] [--mechanism PLAIN]
//   passwords: --password-a/--password-b or $PEP_PASSWORD_A/$PEP_PASSWORD_B
//   (every option also as $PEP_PORT, $PEP_HOST, $PEP_DOMAIN, $PEP_USER_A, $PEP_USER_B,
//   $PEP_MECHANISM)
//
// The server's certificate is checked like any other: the caller either trusts it
// (NODE_EXTRA_CA_CERTS=path/to/localhost.crt, what tests/py/test_pep_xmppjs.py does) or
// turns the check off for this process only (NODE_TLS_REJECT_UNAUTHORIZED=0).
//
// Steps: A and B log in over STARTTLS and send presence with capabilities whose
// disco#info (answered here) wants avatar metadata and OMEMO device list notifications;
// they subscribe to each other; A publishes a device list (publish-options
// access_model=open) and avatar metadata; B gets both notifications and fetches both
// items; B logs in a second time and gets the last items with a delay stamp.
//
// PEP_TRACE=1 prints every element sent and received on stderr.
//
// Exit status 0 and a JSON summary on stdout on success; 1 with the reason and every
// session's unhandled stanzas on stderr on a failure; 2 on the overall 10 s timeout.

import { createHash } from "node:crypto";
import { parseArgs } from "node:util";

import { client, xml } from "@xmpp/client";

const NS_CAPS = "http://jabber.org/protocol/caps";
const NS_DISCO_INFO = "http://jabber.org/protocol/disco#info";
const NS_ROSTER = "jabber:iq:roster";
const NS_PING = "urn:xmpp:ping";
const NS_PUBSUB = "http://jabber.org/protocol/pubsub";
const NS_EVENT = "http://jabber.org/protocol/pubsub#event";
const NS_DATA = "jabber:x:data";
const NS_DELAY = "urn:xmpp:delay";
const AVATAR_META = "urn:xmpp:avatar:metadata";
const NS_AXOLOTL = "eu.siacs.conversations.axolotl";
const DEVICELIST = `${NS_AXOLOTL}.devicelist`;

const OVERALL_MS = 10_000;
const STEP_MS = 5_000;
const CAPS_NODE = "urn:jabberd-rs:tests:xmppjs";

// -- options -------------------------------------------------------------------------------

const { values: opt } = parseArgs({
  options: {
    port: { type: "string", default: process.env.PEP_PORT },
    host: { type: "string", default: process.env.PEP_HOST || "127.0.0.1" },
    domain: { type: "string", default: process.env.PEP_DOMAIN || "localhost" },
    "user-a": { type: "string", default: process.env.PEP_USER_A || "alice" },
    "password-a": { type: "string", default: process.env.PEP_PASSWORD_A },
    "user-b": { type: "string", default: process.env.PEP_USER_B || "bob" },
    "password-b": { type: "string", default: process.env.PEP_PASSWORD_B },
    mechanism: { type: "string", default: process.env.PEP_MECHANISM || "PLAIN" },
  },
  strict: true,
});
for (const name of ["port", "password-a", "password-b"]) {
  if (!opt[name]) {
    console.error(`pep.mjs: --${name} (or $PEP_${name.toUpperCase().replace("-", "_")}) is required`);
    process.exit(64);
  }
}
const service = `xmpp://${opt.host}:${opt.port}`;
const domain = opt.domain;

// -- failure reporting -------------------------------------------------------------------

const started = Date.now();
const steps = [];
const sessions = [];
let lastStep = "(start)";

function step(name) {
  lastStep = name;
  steps.push({ step: name, ms: Date.now() - started });
}

class Failure extends Error {}

function fail(message) {
  throw new Failure(message);
}

function check(condition, message) {
  if (!condition) fail(message);
}

function report(message, status) {
  const lines = [`FAIL: ${message}`, `  after ${Date.now() - started} ms; last step: ${lastStep}`];
  for (const s of sessions) {
    lines.push(`  ${s.label}: status ${s.xmpp.status}; unhandled stanzas:`);
    lines.push(...(s.inbox.length ? s.inbox.map((st) => `    ${st}`) : ["    (none)"]));
    if (s.errors.length) lines.push(`  ${s.label} errors: ${s.errors.join("; ")}`);
  }
  console.error(lines.join("\n"));
  process.exit(status);
}

// Not unref()ed: it also keeps the process from ending silently while a step waits.
setTimeout(() => report(`timed out after ${OVERALL_MS / 1000} s`, 2), OVERALL_MS);

// -- XEP-0115 ------------------------------------------------------------------------------

const IDENTITIES = [{ category: "client", type: "bot", name: "jabberd-rs pep.mjs (xmpp.js)" }];
const FEATURES = [
  NS_DISCO_INFO,
  NS_CAPS,
  NS_PING,
  `${AVATAR_META}+notify`,
  `${DEVICELIST}+notify`,
];

/** Sorts strings by their UTF-8 octets (i;octet, XEP-0115 5.1). */
function octetSort(values) {
  return [...values].sort((a, b) => Buffer.compare(Buffer.from(a), Buffer.from(b)));
}

/** The verification string of XEP-0115 5.1 (no extended forms here), SHA-1, base64. */
function capsVer(identities, features) {
  let s = "";
  const ids = identities.map((i) => `${i.category}/${i.type}/${i.lang || ""}/${i.name || ""}`);
  for (const id of octetSort(ids)) s += `${id}<`;
  for (const f of octetSort(features)) s += `${f}<`;
  return createHash("sha1").update(s, "utf8").digest("base64");
}

const VER = capsVer(IDENTITIES, FEATURES);

function discoInfo(node) {
  return xml(
    "query",
    { xmlns: NS_DISCO_INFO, node },
    ...IDENTITIES.map((i) => xml("identity", { category: i.category, type: i.type, name: i.name })),
    ...FEATURES.map((f) => xml("feature", { var: f })),
  );
}

function capsElement() {
  return xml("c", { xmlns: NS_CAPS, hash: "sha-1", node: CAPS_NODE, ver: VER });
}

// -- a session -----------------------------------------------------------------------------

const bare = (jid) => String(jid).split("/")[0];

class Session {
  constructor(label, username, password, resource) {
    this.label = label;
    this.inbox = []; // received stanzas no expect() took yet
    this.errors = [];
    this.discoQueries = []; // the server's disco#info queries (attributes)
    this.rosterPushes = 0;
    this.waiters = new Set();
    this.closing = false;
    // The SASL mechanism is chosen here (PLAIN over the TLS stream by default) rather
    // than left to xmpp.js, whose first choice SCRAM-SHA-1 (npm sasl-scram-sha-1 1.4.0)
    // misparses a server nonce with a '"' in it (RFC 5802 allows any printable but ','):
    // it answers r=undefined and the login fails, about one login in four here.
    const credentials = async (authenticate, mechanisms) => {
      if (!mechanisms.includes(opt.mechanism)) {
        throw new Error(`the server does not offer ${opt.mechanism} (offers ${mechanisms.join(" ")})`);
      }
      await authenticate({ username, password }, opt.mechanism);
    };
    this.xmpp = client({ service, domain, username, credentials, resource });
    this.xmpp.reconnect.stop(); // a dropped stream is a failure here, not something to mend
    if (process.env.PEP_TRACE) {
      this.xmpp.on("element", (el) => console.error(`${label} <- ${el}`));
      this.xmpp.on("send", (el) => console.error(`${label} -> ${el}`));
    }
    this.xmpp.on("error", (err) => this.errors.push(String(err?.message || err)));
    this.xmpp.on("disconnect", () => {
      if (!this.closing) this.errors.push("the connection closed");
      this.wake();
    });
    this.xmpp.on("stanza", (stanza) => {
      // Queries go to the handlers below (which keep roster pushes), answers to iqCaller.
      if (stanza.is("iq")) return;
      this.inbox.push(stanza);
      this.wake();
    });
    // The server's capabilities query (XEP-0115 6.2): node#ver of the presence.
    this.xmpp.iqCallee.get(NS_DISCO_INFO, "query", (ctx) => {
      const { from } = ctx.stanza.attrs;
      const { node } = ctx.element.attrs;
      this.discoQueries.push({ from, node });
      this.wake();
      if (node !== `${CAPS_NODE}#${VER}`) {
        this.errors.push(`disco#info query for an unknown node ${node} from ${from}: ${ctx.stanza}`);
        return xml("error", { type: "cancel" },
          xml("item-not-found", { xmlns: "urn:ietf:params:xml:ns:xmpp-stanzas" }));
      }
      return discoInfo(node);
    });
    // Roster pushes (RFC 6121 2.1.6): acknowledged, and kept for expect().
    this.xmpp.iqCallee.set(NS_ROSTER, "query", (ctx) => {
      const { from } = ctx.stanza.attrs;
      if (from && bare(from) !== bare(this.xmpp.jid)) {
        this.errors.push(`roster push from a stranger: ${ctx.stanza}`);
        return xml("error", { type: "cancel" },
          xml("service-unavailable", { xmlns: "urn:ietf:params:xml:ns:xmpp-stanzas" }));
      }
      this.rosterPushes += 1;
      this.inbox.push(ctx.stanza);
      this.wake();
      return true;
    });
    sessions.push(this);
  }

  get jid() {
    return String(this.xmpp.jid);
  }

  get bare() {
    return bare(this.xmpp.jid);
  }

  wake() {
    for (const w of this.waiters) w();
  }

  /** Resolves when `probe()` returns something truthy; fails after `ms`. */
  async until(what, probe, ms = STEP_MS) {
    const deadline = Date.now() + ms;
    for (;;) {
      const value = probe();
      if (value) return value;
      if (this.errors.length) fail(`${this.label}: ${this.errors.join("; ")} (while waiting for ${what})`);
      const left = deadline - Date.now();
      if (left <= 0) fail(`${this.label}: no ${what} within ${ms / 1000} s`);
      await new Promise((resolve) => {
        const w = () => {
          clearTimeout(timer);
          this.waiters.delete(w);
          resolve();
        };
        const timer = setTimeout(w, left);
        this.waiters.add(w);
      });
    }
  }

  /** Takes the first received stanza for which predicate(stanza) is true. */
  async expect(what, predicate, ms = STEP_MS) {
    return this.until(what, () => {
      const i = this.inbox.findIndex(predicate);
      return i < 0 ? null : this.inbox.splice(i, 1)[0];
    }, ms);
  }

  async login() {
    try {
      await this.xmpp.start();
    } catch (err) {
      fail(`${this.label}: login failed: ${err?.message || err}${this.errors.length ? ` (${this.errors.join("; ")})` : ""}`);
    }
    check(this.xmpp.isSecure(), `${this.label}: logged in without TLS`);
  }

  async iq(type, child, to) {
    try {
      return await this.xmpp.iqCaller.request(xml("iq", { type, to }, child), STEP_MS);
    } catch (err) {
      const detail = err?.element ? String(err.element) : "";
      fail(`${this.label}: iq ${type} ${child.name} ${child.attrs.xmlns} to ${to || "(account)"} failed: ${err?.message || err} ${detail}`);
    }
  }

  async roster() {
    return this.iq("get", xml("query", { xmlns: NS_ROSTER }));
  }

  async presence() {
    await this.xmpp.send(xml("presence", {}, capsElement()));
  }

  /** Returns once sm handled everything this user sent before (sm answers the ping to the
   * own bare JID after that). */
  async settle() {
    await this.iq("get", xml("ping", { xmlns: NS_PING }), this.bare);
  }

  async close() {
    this.closing = true;
    await Promise.race([this.xmpp.stop().catch(() => {}), new Promise((r) => setTimeout(r, 2000))]);
  }
}

// -- predicates ----------------------------------------------------------------------------

function isPresence(type, from) {
  return (s) => s.is("presence") && s.attrs.type === type && bare(s.attrs.from) === from;
}

function pushSubscribedTo(contact) {
  return (s) => s.is("iq") && s.getChild("query", NS_ROSTER)?.getChildren("item")
    .some((i) => i.attrs.jid === contact && ["to", "both"].includes(i.attrs.subscription));
}

/** A pubsub event message about `node` with an item `id` from `from`. */
function isEvent(from, node, id) {
  return (s) => {
    if (!s.is("message") || bare(s.attrs.from || "") !== from) return false;
    const items = s.getChild("event", NS_EVENT)?.getChild("items");
    return items?.attrs.node === node && items.getChildren("item").some((i) => i.attrs.id === id);
  };
}

function eventItem(message) {
  return message.getChild("event", NS_EVENT).getChild("items").getChild("item");
}

// -- payloads ------------------------------------------------------------------------------

function publish(node, id, payload, options = {}) {
  const children = [xml("publish", { node }, xml("item", { id }, payload))];
  const fields = Object.entries(options);
  if (fields.length) {
    children.push(xml("publish-options", {},
      xml("x", { xmlns: NS_DATA, type: "submit" },
        xml("field", { var: "FORM_TYPE", type: "hidden" }, xml("value", {}, `${NS_PUBSUB}#publish-options`)),
        ...fields.map(([k, v]) => xml("field", { var: `pubsub#${k}` }, xml("value", {}, v))))));
  }
  return xml("pubsub", { xmlns: NS_PUBSUB }, ...children);
}

const DEVICE_ID = "31415";
const deviceList = () => xml("list", { xmlns: NS_AXOLOTL }, xml("device", { id: DEVICE_ID }));
const AVATAR_BYTES = Buffer.from("not really a PNG, but the metadata does not care");
const AVATAR_ID = createHash("sha1").update(AVATAR_BYTES).digest("hex");
const avatarMeta = () => xml("metadata", { xmlns: AVATAR_META },
  xml("info", { id: AVATAR_ID, bytes: String(AVATAR_BYTES.length), type: "image/png", width: "32", height: "32" }));

function checkDeviceList(where, item) {
  check(item?.attrs.id === "current", `${where}: the device list item is not 'current': ${item}`);
  const device = item.getChild("list", NS_AXOLOTL)?.getChild("device");
  check(device?.attrs.id === DEVICE_ID, `${where}: no device ${DEVICE_ID} in ${item}`);
}

function checkAvatarMeta(where, item) {
  check(item?.attrs.id === AVATAR_ID, `${where}: the avatar item is not ${AVATAR_ID}: ${item}`);
  const info = item.getChild("metadata", AVATAR_META)?.getChild("info");
  check(info?.attrs.id === AVATAR_ID && info.attrs.bytes === String(AVATAR_BYTES.length),
    `${where}: wrong avatar metadata in ${item}`);
}

// -- the test ------------------------------------------------------------------------------

async function main() {
  const a = new Session("A", opt["user-a"], opt["password-a"], "laptop");
  const b = new Session("B", opt["user-b"], opt["password-b"], "phone");
  const summary = { client: "@xmpp/client", sasl: opt.mechanism, caps: { node: CAPS_NODE, ver: VER } };

  // Logins, rosters (for the pushes), presence with capabilities.
  await a.login();
  await b.login();
  step("A and B logged in over STARTTLS");
  summary.jids = { a: a.jid, b: b.jid };
  for (const s of [a, b]) {
    await s.roster();
    await s.presence();
  }
  // A new hash: the server asks the first one that announced it.
  await a.until("disco#info query of the capabilities", () => a.discoQueries.length);
  check(a.discoQueries[0].from === domain,
    `A: the disco#info query came from ${a.discoQueries[0].from}, not from ${domain}`);
  await a.settle();
  await b.settle();
  step("presence with capabilities sent, disco#info answered");

  // Mutual subscription.
  for (const [x, y] of [[a, b], [b, a]]) {
    await x.xmpp.send(xml("presence", { to: y.bare, type: "subscribe" }));
    await y.expect(`subscription request from ${x.bare}`, isPresence("subscribe", x.bare));
    await y.xmpp.send(xml("presence", { to: x.bare, type: "subscribed" }));
    await x.expect(`roster push with a subscription to ${y.bare}`, pushSubscribedTo(y.bare));
  }
  step("A and B are mutual contacts");

  // A publishes.
  const published = {};
  for (const [node, id, payload, options] of [
    [DEVICELIST, "current", deviceList(), { access_model: "open" }],
    [AVATAR_META, AVATAR_ID, avatarMeta(), {}],
  ]) {
    const answer = await a.iq("set", publish(node, id, payload, options));
    check(answer.attrs.type === "result", `A: publishing to ${node}: ${answer}`);
    published[node] = answer.getChild("pubsub", NS_PUBSUB)?.getChild("publish")?.getChild("item")?.attrs.id ?? null;
  }
  step("A published the device list and the avatar metadata");

  // Notifications: B (a contact with +notify), A itself (its own +notify).
  const notifications = {};
  for (const [who, label] of [[b, "b"], [a, "a_own"]]) {
    const dl = await who.expect(`${a.bare}'s device list notification`, isEvent(a.bare, DEVICELIST, "current"));
    const av = await who.expect(`${a.bare}'s avatar metadata notification`, isEvent(a.bare, AVATAR_META, AVATAR_ID));
    for (const [m, what] of [[dl, "device list"], [av, "avatar metadata"]]) {
      check(m.attrs.type === "headline", `${who.label}: the ${what} notification is not a headline: ${m}`);
      check(!m.getChild("delay", NS_DELAY), `${who.label}: the live ${what} notification has a delay: ${m}`);
    }
    checkDeviceList(`${who.label} notification`, eventItem(dl));
    checkAvatarMeta(`${who.label} notification`, eventItem(av));
    notifications[label] = { devicelist: String(dl), avatar: String(av) };
  }
  step("B and A got both notifications");

  // B fetches A's items.
  const fetched = {};
  for (const [node, checker] of [[DEVICELIST, checkDeviceList], [AVATAR_META, checkAvatarMeta]]) {
    const answer = await b.iq("get", xml("pubsub", { xmlns: NS_PUBSUB }, xml("items", { node })), a.bare);
    const items = answer.getChild("pubsub", NS_PUBSUB)?.getChild("items");
    check(items?.attrs.node === node, `B: the items answer is not about ${node}: ${answer}`);
    check(items.getChildren("item").length === 1, `B: not exactly one item of ${node}: ${answer}`);
    checker(`B's items of ${node}`, items.getChild("item"));
    fetched[node] = String(answer);
  }
  step("B fetched both items");

  // B's second device: the last items on login, with a delay stamp.
  const tablet = new Session("B/tablet", opt["user-b"], opt["password-b"], "tablet");
  await tablet.login();
  await tablet.presence();
  const last = {};
  for (const [node, id, checker] of [[DEVICELIST, "current", checkDeviceList], [AVATAR_META, AVATAR_ID, checkAvatarMeta]]) {
    const m = await tablet.expect(`the last item of ${node} on login`, isEvent(a.bare, node, id));
    const delay = m.getChild("delay", NS_DELAY);
    check(delay?.attrs.stamp, `B/tablet: the last item of ${node} has no <delay stamp/>: ${m}`);
    checker(`B/tablet last item of ${node}`, eventItem(m));
    last[node] = String(m);
  }
  await tablet.settle();
  step("B's second login got both last items with a delay");

  // One capabilities hash, one query, whatever the number of logins (XEP-0115 caching).
  const queries = sessions.map((s) => ({ session: s.label, queries: s.discoQueries }));
  const total = sessions.reduce((n, s) => n + s.discoQueries.length, 0);
  check(total === 1, `the server asked ${total} times for the same capabilities: ${JSON.stringify(queries)}`);

  for (const s of sessions) {
    check(!s.errors.length, `${s.label}: ${s.errors.join("; ")}`);
  }
  for (const s of sessions) await s.close();
  step("disconnected");

  Object.assign(summary, {
    ok: true,
    ms: Date.now() - started,
    steps,
    disco_queries: queries,
    publish_results: published,
    notifications,
    fetched,
    last_items_on_login: last,
    roster_pushes: Object.fromEntries(sessions.map((s) => [s.label, s.rosterPushes])),
  });
  console.log(JSON.stringify(summary, null, 2));
}

main().then(
  () => process.exit(0),
  (err) => report(err instanceof Failure ? err.message : `unexpected error: ${err?.stack || err}`, 1),
);
