#!/usr/bin/env node
// SASL2 (XEP-0388), Bind 2 (XEP-0386) and FAST (XEP-0484) with xmpp.js.
//
//   node tests/js/fast.mjs --port C2S_STARTTLS_PORT [--host 127.0.0.1] [--domain localhost]
//        --user alice   (password: $FAST_PASSWORD)
//
// 1. logs in with the password over SASL2 + Bind 2 and asks for a FAST token;
// 2. logs in again with the token only (HT-SHA-256-NONE, one round trip, no SCRAM);
// 3. logs in with a wrong token: refused, then xmpp.js falls back to the password.
// Prints a JSON summary; exit status 0 on success.

import { parseArgs } from "node:util";

import { client, xml } from "@xmpp/client";

const { values: opt } = parseArgs({
  options: {
    port: { type: "string" },
    host: { type: "string", default: "127.0.0.1" },
    domain: { type: "string", default: "localhost" },
    user: { type: "string", default: "alice" },
    mechanism: { type: "string", default: "PLAIN" },
  },
  strict: true,
});
const password = process.env.FAST_PASSWORD;
const service = `xmpp://${opt.host}:${opt.port}`;
const userAgent = () =>
  xml("user-agent", { id: "7d1e2b8a-fast-mjs" }, xml("software", {}, "fast.mjs"));

setTimeout(() => {
  console.error("timeout");
  process.exit(2);
}, 20_000).unref();

// One login; `token` (if any) is offered first. Returns what happened.
async function login(token, withPassword) {
  const sent = [];
  const received = [];
  let saved = null;
  const credentials = async (authenticate, mechanisms) => {
    const mech = mechanisms.includes(opt.mechanism) ? opt.mechanism : mechanisms[0];
    await authenticate(
      { username: opt.user, password: withPassword ? password : undefined, token },
      mech,
      userAgent(),
    );
  };
  const xmpp = client({ service, domain: opt.domain, credentials, resource: "fastjs" });
  xmpp.reconnect.stop();
  xmpp.fast.saveToken = async (t) => {
    saved = t;
  };
  xmpp.on("send", (el) => sent.push(el.toString()));
  xmpp.on("element", (el) => received.push(el.toString()));
  xmpp.on("error", () => {});
  const address = await xmpp.start();
  await xmpp.stop();
  return {
    jid: address.toString(),
    saved,
    authenticates: sent.filter((s) => s.startsWith("<authenticate")),
    failures: received.filter((s) => s.startsWith("<failure")),
    successes: received.filter((s) => s.startsWith("<success")),
  };
}

try {
  const first = await login(null, true);
  if (!first.saved?.token) throw new Error(`no token: ${JSON.stringify(first)}`);
  if (!first.authenticates[0].includes("request-token")) throw new Error("no token requested");
  const second = await login(first.saved, false);
  const mechs = second.authenticates.map((a) => /mechanism="([^"]+)"/.exec(a)?.[1]);
  if (mechs.length !== 1 || mechs[0] !== "HT-SHA-256-NONE")
    throw new Error(`expected one HT authentication: ${JSON.stringify(second)}`);
  const wrong = await login({ ...first.saved, token: "x".repeat(90) }, true);
  if (!wrong.failures.some((f) => f.includes("not-authorized")))
    throw new Error(`wrong token not refused: ${JSON.stringify(wrong)}`);
  console.log(
    JSON.stringify({
      ok: true,
      first: { jid: first.jid, mechanism: /mechanism="([^"]+)"/.exec(first.authenticates[0])[1] },
      second: { jid: second.jid, mechanisms: mechs, success: second.successes[0] },
      wrong: { failure: wrong.failures[0], fallback: wrong.authenticates.length, jid: wrong.jid },
    }),
  );
  process.exit(0);
} catch (e) {
  console.error(e.stack || String(e));
  process.exit(1);
}
