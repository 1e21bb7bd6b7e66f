#!/usr/bin/env node
// End-to-end check of the WebSocket endpoint (RFC 7395) with xmpp.js (@xmpp/client),
// a client independent of the Python tests.
//
//   node [--experimental-websocket] tests/js/websocket.mjs --ws URL --wss URL
//        [--domain localhost] [--user-a alice] [--user-b bob]
//   passwords: $WS_PASSWORD_A / $WS_PASSWORD_B
//
// A logs in over ws:// and B over wss:// (the caller trusts the server's certificate
// with NODE_EXTRA_CA_CERTS), each with SASL PLAIN, resource binding and stream
// management as xmpp.js negotiates them; A sends B a message, B answers, both close
// their streams (<close/>). Node 20 needs --experimental-websocket for the global
// WebSocket that @xmpp/websocket uses.
//
// Exit status 0 and a JSON summary on stdout on success; 1 with the reason on stderr;
// 2 on the overall 10 s timeout.

import { parseArgs } from "node:util";

import { client, xml } from "@xmpp/client";

const OVERALL_MS = 10_000;

const { values: opt } = parseArgs({
  options: {
    ws: { type: "string" },
    wss: { type: "string" },
    domain: { type: "string", default: "localhost" },
    "user-a": { type: "string", default: "alice" },
    "user-b": { type: "string", default: "bob" },
  },
  strict: true,
});
if (!opt.ws || !opt.wss || !process.env.WS_PASSWORD_A || !process.env.WS_PASSWORD_B) {
  console.error("websocket.mjs: --ws, --wss, $WS_PASSWORD_A and $WS_PASSWORD_B are required");
  process.exit(64);
}
if (typeof globalThis.WebSocket !== "function") {
  console.error("websocket.mjs: no global WebSocket (Node 20: run with --experimental-websocket)");
  process.exit(64);
}

setTimeout(() => {
  console.error("websocket.mjs: timed out");
  process.exit(2);
}, OVERALL_MS).unref();

function login(service, username, password, resource) {
  const credentials = async (authenticate, mechanisms) => {
    if (!mechanisms.includes("PLAIN")) {
      throw new Error(`PLAIN not offered (offers ${mechanisms.join(" ")})`);
    }
    await authenticate({ username, password }, "PLAIN");
  };
  const xmpp = client({ service, domain: opt.domain, username, credentials, resource });
  xmpp.on("error", (e) => console.error(`${username}: ${e}`));
  const messages = [];
  const waiting = [];
  xmpp.on("stanza", (s) => {
    if (!s.is("message")) return;
    messages.push(s);
    while (waiting.length) waiting.shift()();
  });
  const nextMessage = async () => {
    while (!messages.length) await new Promise((resolve) => waiting.push(resolve));
    return messages.shift();
  };
  return { xmpp, nextMessage };
}

async function main() {
  const a = login(opt.ws, opt["user-a"], process.env.WS_PASSWORD_A, "web");
  const b = login(opt.wss, opt["user-b"], process.env.WS_PASSWORD_B, "secure-web");
  const [jidA, jidB] = await Promise.all([a.xmpp.start(), b.xmpp.start()]);
  await a.xmpp.send(xml("presence"));
  await b.xmpp.send(xml("presence"));
  await a.xmpp.send(xml("message", { to: jidB.toString(), type: "chat", id: "m1" }, xml("body", {}, "hello over ws")));
  const got = await b.nextMessage();
  if (got.getChildText("body") !== "hello over ws" || got.attrs.from !== jidA.toString()) {
    throw new Error(`B got ${got.toString()}`);
  }
  await b.xmpp.send(xml("message", { to: jidA.toString(), type: "chat", id: "m2" }, xml("body", {}, "hello over wss")));
  const back = await a.nextMessage();
  if (back.getChildText("body") !== "hello over wss") {
    throw new Error(`A got ${back.toString()}`);
  }
  const sm = { a: a.xmpp.streamManagement?.enabled ?? false, b: b.xmpp.streamManagement?.enabled ?? false };
  await Promise.all([a.xmpp.stop(), b.xmpp.stop()]);
  console.log(JSON.stringify({ ok: true, jids: { a: jidA.toString(), b: jidB.toString() }, sm }));
  process.exit(0);
}

main().catch((e) => {
  console.error(`websocket.mjs: ${e?.stack || e}`);
  process.exit(1);
});
