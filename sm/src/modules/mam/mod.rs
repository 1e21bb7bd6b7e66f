//! Message Archive Management (XEP-0313, `urn:xmpp:mam:2` with `#extended`) and
//! unique stanza ids (XEP-0359).
//!
//! Every message that qualifies (chat or normal with a body, or marked `<store/>`, or
//! end-to-end encrypted; never `<no-store/>` or `<no-permanent-store/>`, XEP-0334) is
//! archived once per user on both sides, as the user's preferences allow. What the
//! user receives is stamped `<stanza-id by='user@domain' id=..>` with the archive id
//! (forged stanza-ids by the user's JID are removed first), and the same copy goes to
//! offline storage, so both agree. Archive writes are sent at once and their answers
//! awaited off the message path; storage applies one user's requests in order, so a
//! query sees every message archived before it.
//!
//! Storage: the archive operations of the storage protocol (`jrs_xdb::archive`), on the
//! archive `urn:xmpp:mam:2`; preferences in `prefs`. Ids are the archive time in
//! microseconds as 16 hex digits, kept increasing per user.

mod prefs;
mod query;
mod writer;

use std::sync::Arc;

use jid::Jid;
use tracing::{debug, warn};
use xmpp_parsers::mam_prefs::{DefaultPrefs, Prefs};
use xmpp_parsers::ns::{MAM as NS_MAM, SID as NS_SID};

use jrs_stream::StanzaErrorCondition;
use jrs_xdb::archive::{Query, Retention};
use jrs_xdb::{Flush, XdbError};

use crate::clock::{now_micros, stamp_micros};
use crate::config::{positive, SmConfig};
use crate::host::{
    storage_error, Declaration, Disco, Flow, Hook, Iq, IqKind, Module, Packet, Reply, Scope,
    SessionKey, Stanzas, User,
};
use crate::xml::Element;

/// The archive's name in storage.
pub const ARCHIVE: &str = NS_MAM;
const NS_HINTS: &str = "urn:xmpp:hints";
/// End-to-end encrypted payloads: archived though they carry no body.
const ENCRYPTED: [(&str, &str); 3] = [
    ("encrypted", "eu.siacs.conversations.axolotl"),
    ("encrypted", "urn:xmpp:omemo:2"),
    ("openpgp", "urn:xmpp:openpgp:0"),
];

const OWN_AND_OTHERS: &[Scope] = &[Scope::Own, Scope::Contact];

pub struct Mam {
    default: DefaultPrefs,
    retention: Retention,
    page_size: usize,
    writer: Arc<writer::Writer>,
}

pub fn load_module(config: &SmConfig) -> jrs_config::Result<Arc<dyn Module>> {
    let (mut default, mut retention, mut page_size) =
        (DefaultPrefs::Always, Retention::default(), 50);
    // Archive copies go to disk within a second of storage's answer, not before it:
    // nothing waits for them (the message itself was delivered, or stored offline
    // durably), and a disk flush per message was half of what a lone message cost the
    // whole server (docs/benchmarks.md, "Writes nothing waits for").
    let mut flush = Flush::Later;
    if let Some(n) = config.module_settings("mam")? {
        n.allow(
            &["default", "max-messages", "max-days", "page-size", "flush"],
            &[],
        )?;
        flush = match n.attr("flush") {
            None | Some("later") => Flush::Later,
            Some("now") => Flush::Now,
            Some(other) => {
                return Err(n.error(format!(
                    "attribute 'flush' = '{other}': expected later or now"
                )))
            }
        };
        if let Some(d) = n.attr("default") {
            default = match d {
                "always" => DefaultPrefs::Always,
                "never" => DefaultPrefs::Never,
                "roster" => DefaultPrefs::Roster,
                other => {
                    return Err(n.error(format!(
                        "attribute 'default' = '{other}': expected always, never or roster"
                    )))
                }
            };
        }
        if n.attr("max-messages").is_some() {
            retention.max_items = Some(positive(n, "max-messages", 1)? as u64);
        }
        if n.attr("max-days").is_some() {
            retention.max_age = Some(positive(n, "max-days", 1)? as u64 * 86_400);
        }
        page_size = positive(n, "page-size", page_size)?.min(jrs_xdb::archive::MAX_PAGE);
    }
    Ok(Arc::new(Mam {
        default,
        retention,
        page_size,
        writer: Arc::new(writer::Writer::new(retention, flush)),
    }))
}

/// What the module keeps about a user while the user's task runs.
#[derive(Default)]
struct ArchiveState {
    /// The time (and id) of the newest item, once learnt from storage.
    newest: Option<u64>,
}

/// Whether XEP-0313 section 5 (with XEP-0334 hints) puts message `p` in an archive.
pub fn archivable(p: &Packet) -> bool {
    if p.name() != "message" || !matches!(p.kind().unwrap_or("normal"), "chat" | "normal") {
        return false;
    }
    if p.has("no-store", NS_HINTS) || p.has("no-permanent-store", NS_HINTS) {
        return false;
    }
    // Copies of other messages (carbons, archive results) are not archived again.
    if p.has_ns(xmpp_parsers::ns::CARBONS) || p.has("result", NS_MAM) {
        return false;
    }
    p.has_body() || p.has("store", NS_HINTS) || ENCRYPTED.iter().any(|(name, ns)| p.has(name, ns))
}

/// The stanza-id element for archive id `id` of `by`.
fn stanza_id(by: &str, id: &str) -> String {
    // By hand, not `format!`: one of these for every message archived.
    let (by, id) = (jrs_stream::xml::escape(by), jrs_stream::xml::escape(id));
    let parts = [
        "<stanza-id xmlns='",
        NS_SID,
        "' by='",
        &by,
        "' id='",
        &id,
        "'/>",
    ];
    let mut out = String::with_capacity(parts.iter().map(|p| p.len()).sum());
    for part in parts {
        out.push_str(part);
    }
    out
}

/// `n` as 16 lowercase hex digits (archive ids: they sort as their times do).
fn hex16(n: u64) -> String {
    // By hand: `format!("{n:016x}")` went through the formatting machinery for every
    // message archived, a twentieth of sm's time under load.
    // Into bytes, then one string: collecting `char`s grew and encoded the string a
    // character at a time.
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 16];
    for (i, digit) in out.iter_mut().enumerate() {
        *digit = DIGITS[((n >> (4 * (15 - i))) & 0xf) as usize];
    }
    String::from_utf8(out.to_vec()).expect("hex digits are ASCII")
}

impl Mam {
    /// A new id and time for the user's archive: now, but after the newest item (learnt
    /// from storage the first time), so ids always increase.
    async fn next_id(&self, u: &mut User) -> Result<(String, u64), XdbError> {
        if u.state.entry::<ArchiveState>().newest.is_none() {
            self.writer.flush(&u.ctx);
            let meta = u
                .ctx
                .store
                .archive_query(&u.bare, ARCHIVE, &Query::default())
                .await?;
            u.state.entry::<ArchiveState>().newest = Some(meta.newest.map_or(0, |(_, t)| t));
        }
        let state = u.state.entry::<ArchiveState>();
        let time = now_micros().max(state.newest.unwrap_or(0) + 1);
        state.newest = Some(time);
        Ok((hex16(time), time))
    }

    /// An id and time for a message with `with`, if the user's preferences archive it.
    async fn id_for(&self, u: &mut User, with: &Jid) -> Option<(String, u64)> {
        match prefs::archives(u, &self.default, with).await {
            Ok(true) => {}
            Ok(false) => return None,
            Err(e) => {
                warn!("message not archived, preferences unavailable: {e}");
                return None;
            }
        }
        match self.next_id(u).await {
            Ok(x) => Some(x),
            Err(e) => {
                warn!("message not archived, the archive is unavailable: {e}");
                None
            }
        }
    }
}

#[async_trait::async_trait]
impl Module for Mam {
    fn name(&self) -> &'static str {
        "mam"
    }

    async fn stopping(&self, ctx: &Arc<crate::host::Ctx>) {
        self.writer.drain(ctx).await;
    }

    fn declare(&self) -> Declaration {
        Declaration::default()
            .requires("roster")
            // Others asking about a user's archive are answered `forbidden` (9.1).
            .iq(IqKind::Get, OWN_AND_OTHERS, NS_MAM, "query")
            .iq(IqKind::Set, OWN_AND_OTHERS, NS_MAM, "query")
            .iq(IqKind::Get, OWN_AND_OTHERS, NS_MAM, "prefs")
            .iq(IqKind::Set, OWN_AND_OTHERS, NS_MAM, "prefs")
            .iq(IqKind::Get, OWN_AND_OTHERS, NS_MAM, "metadata")
            .feature(Disco::Account, NS_MAM)
            .feature(Disco::Account, "urn:xmpp:mam:2#extended")
            .feature(Disco::Account, NS_SID)
            // After blocking (a refused message is not archived), before delivery and
            // offline storage (which get the stanza-id).
            .stanzas(Hook::Outbound, Stanzas::Message, 400)
            .stanzas(Hook::Inbound, Stanzas::Message, 400)
            .hook(Hook::SessionStarted, 0)
    }

    async fn session_started(&self, u: &mut User, _s: SessionKey) {
        if self.retention == Retention::default() || u.sessions.len() > 1 {
            return;
        }
        // Retention by age also reaches users who receive nothing new.
        if let Err(e) = u
            .ctx
            .store
            .archive_trim(&u.bare, ARCHIVE, self.retention)
            .await
        {
            warn!("archive retention not applied: {e}");
        }
    }

    async fn outbound(&self, u: &mut User, _from: SessionKey, p: &mut Packet) -> Flow {
        let Some(to) = p.to.clone() else {
            return Flow::Pass;
        };
        // To the user's own account it is archived once, on receipt.
        if !u.is_same_user(&to) && archivable(p) {
            if let Some(id) = self.id_for(u, &to).await {
                self.writer.push(u, id, &to, p);
            }
        }
        Flow::Pass
    }

    async fn inbound(&self, u: &mut User, p: &mut Packet) -> Flow {
        // XEP-0359 section 5: only this server says what ids it gave.
        let bare = u.bare.clone();
        p.remove_children(|p, c| {
            c.name == "stanza-id"
                && c.ns == NS_SID
                && attr(p.child_bytes(c), "by").is_some_and(|by| by == bare)
        });
        let Some(from) = p.from.clone() else {
            return Flow::Pass;
        };
        if !archivable(p) {
            return Flow::Pass;
        }
        if let Some(id) = self.id_for(u, &from).await {
            // The stanza-id goes into the archived copy too: it is the message as
            // delivered (and as stored offline).
            p.push_child(&stanza_id(&bare, &id.0));
            self.writer.push(u, id, &from, p);
        }
        Flow::Pass
    }

    async fn iq(&self, u: &mut User, iq: &Iq) -> Reply {
        if iq.scope != Scope::Own {
            return Reply::error(
                StanzaErrorCondition::Forbidden,
                "only its owner may use a user's archive",
            );
        }
        match (iq.payload.name(), iq.kind) {
            ("query", IqKind::Get) => Reply::typed(jrs_xdb::mam::form_query()),
            ("query", IqKind::Set) => self.query(u, iq).await,
            ("prefs", IqKind::Get) => match prefs::load(u, &self.default).await {
                Ok(p) => Reply::typed(p.clone()),
                Err(e) => storage_error(&e),
            },
            ("prefs", IqKind::Set) => {
                let new: Prefs = match iq.parse() {
                    Ok(p) => p,
                    Err(r) => return r,
                };
                match prefs::save(u, new.clone()).await {
                    Ok(()) => Reply::typed(new),
                    Err(e) => storage_error(&e),
                }
            }
            _ => self.metadata(u).await,
        }
    }
}

impl Mam {
    async fn query(&self, u: &mut User, iq: &Iq) -> Reply {
        let Some(key) = iq.session else {
            return Reply::not_handled();
        };
        // Room for the answer on sm's link, with the storage answer's own wrapping.
        let max_bytes = u.ctx.config.fragment_max().saturating_sub(4096).max(1024);
        let q = match query::read(&iq.payload, self.page_size, max_bytes) {
            Ok(q) => q,
            Err(r) => return r,
        };
        self.writer.flush(&u.ctx);
        let page = match u.ctx.store.archive_query(&u.bare, ARCHIVE, &q.query).await {
            Ok(p) => p,
            Err(XdbError::Refused(r)) if r.condition == StanzaErrorCondition::ItemNotFound => {
                return Reply::error(StanzaErrorCondition::ItemNotFound, r.text)
            }
            Err(e) => return storage_error(&e),
        };
        let Some(to) = u.session(key).map(|s| s.full.clone()) else {
            return Reply::Done;
        };
        debug!(
            count = page.count,
            returned = page.items.len(),
            "archive query"
        );
        let mut results: Vec<_> = page
            .items
            .iter()
            .map(|item| query::result_message(&u.bare, &to, q.queryid.as_deref(), item))
            .collect();
        if q.flip_page {
            results.reverse();
        }
        for m in results {
            u.deliver(key, m);
        }
        Reply::typed(query::fin(&page))
    }

    /// XEP-0313 section 7: the first and last item of the archive.
    async fn metadata(&self, u: &mut User) -> Reply {
        self.writer.flush(&u.ctx);
        let page = match u
            .ctx
            .store
            .archive_query(&u.bare, ARCHIVE, &Query::default())
            .await
        {
            Ok(p) => p,
            Err(e) => return storage_error(&e),
        };
        let mut m = Element::new("metadata", NS_MAM);
        for (name, bound) in [("start", &page.oldest), ("end", &page.newest)] {
            if let Some((id, time)) = bound {
                m.push(
                    Element::new(name, NS_MAM)
                        .with_attr("id", id.clone())
                        .with_attr("timestamp", stamp_micros(*time)),
                );
            }
        }
        Reply::with(m)
    }
}

/// An attribute of an element given as bytes (a child of a stanza, already checked).
fn attr(element: &[u8], name: &str) -> Option<String> {
    let s = jrs_stream::Stanza::parse(bytes::Bytes::copy_from_slice(element)).ok()?;
    s.attr(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::modules::offline::NS_OFFLINE;
    use crate::modules::testing::*;

    #[test]
    fn ids_are_sixteen_hex_digits_and_stanza_ids_are_escaped() {
        for n in [0u64, 1, 0xabc, 1_764_590_000_000_000, u64::MAX] {
            assert_eq!(hex16(n), format!("{n:016x}"));
        }
        assert_eq!(
            stanza_id("a@b", "x'y"),
            format!("<stanza-id xmlns='{NS_SID}' by='a@b' id='x&apos;y'/>")
        );
    }

    #[test]
    fn archive_flush_is_later_or_now() {
        for ok in ["", "<mam flush='now'/>", "<mam flush='later'/>"] {
            assert!(load_with(load_module, ok).is_ok(), "{ok}");
        }
        refused_settings(
            load_module,
            &[("<mam flush='never'/>", "expected later or now")],
        );
    }

    fn chat(n: usize) -> String {
        format!("<message from='bob@example.com/x' to='alice@localhost' type='chat' id='m{n}'><body>hello {n}</body></message>")
    }

    async fn archive_of(u: &User) -> Vec<jrs_xdb::archive::Item> {
        let page = u
            .ctx
            .store
            .archive_query(
                &u.bare,
                ARCHIVE,
                &Query {
                    paging: jrs_xdb::archive::Paging {
                        max: 250,
                        ..Default::default()
                    },
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        page.items
    }

    #[tokio::test]
    async fn both_sides_are_archived_and_received_copies_carry_the_id() {
        let ctx = ctx(None, "");
        let mut u = user(&ctx, "alice@localhost");
        online(&mut u, "phone", 0).await;
        take(&mut u);
        // A forged stanza-id by alice is removed; bob's own is kept.
        inbound(&mut u, &chat(1).replace("</message>", "<stanza-id xmlns='urn:xmpp:sid:0' by='alice@localhost' id='forged'/><stanza-id xmlns='urn:xmpp:sid:0' by='bob@example.com' id='theirs'/></message>")).await;
        let out = take(&mut u);
        let got = to(&out, "phone", &["hello 1"]);
        assert_eq!(got.len(), 1, "{out:?}");
        assert!(
            !got[0].contains("forged") && got[0].contains("id='theirs'"),
            "{}",
            got[0]
        );
        send(&mut u, "phone", "<message to='bob@example.com' type='chat' id='o1'><body>back</body><origin-id xmlns='urn:xmpp:sid:0' id='o1'/></message>").await;
        take(&mut u);
        let items = archive_of(&u).await;
        assert_eq!(items.len(), 2);
        assert!(
            got[0].contains(&format!(
                "<stanza-id xmlns='urn:xmpp:sid:0' by='alice@localhost' id='{}'/>",
                items[0].id
            )),
            "{}",
            got[0]
        );
        assert_eq!(items[0].with, "bob@example.com/x");
        assert_eq!(items[1].with, "bob@example.com");
        assert!(items[1].id > items[0].id && items[1].time > items[0].time);
        let sent = String::from_utf8_lossy(&items[1].payload);
        assert!(
            sent.starts_with("<message xmlns='jabber:client'") && sent.contains("origin-id"),
            "{sent}"
        );
        // Not archived: chat states alone, no-store, errors.
        inbound(&mut u, "<message from='bob@example.com/x' to='alice@localhost' type='chat'><active xmlns='http://jabber.org/protocol/chatstates'/></message>").await;
        inbound(
            &mut u,
            &chat(3).replace("</message>", "<no-store xmlns='urn:xmpp:hints'/></message>"),
        )
        .await;
        assert_eq!(archive_of(&u).await.len(), 2);
    }

    #[tokio::test]
    async fn offline_storage_and_the_archive_agree() {
        let ctx = ctx(None, "");
        let mut u = user(&ctx, "alice@localhost");
        inbound(&mut u, &chat(1)).await;
        let items = archive_of(&u).await;
        assert_eq!(items.len(), 1);
        let stored = ctx.store.get(&u.bare, NS_OFFLINE).await.unwrap();
        let stored = String::from_utf8_lossy(&stored);
        assert!(
            stored.contains(&format!("id='{}'", items[0].id)),
            "{stored}"
        );
    }

    #[tokio::test]
    async fn queries_page_and_answer_with_fin() {
        let ctx = ctx(None, "");
        let mut u = user(&ctx, "alice@localhost");
        online(&mut u, "phone", 0).await;
        for n in 0..5 {
            inbound(&mut u, &chat(n)).await;
        }
        take(&mut u);
        let ids: Vec<String> = archive_of(&u).await.into_iter().map(|i| i.id).collect();
        send(&mut u, "phone", "<iq type='set' id='q1'><query xmlns='urn:xmpp:mam:2' queryid='f1'><set xmlns='http://jabber.org/protocol/rsm'><max>2</max><before/></set></query></iq>").await;
        let out = take(&mut u);
        let results = to(
            &out,
            "phone",
            &["<result xmlns='urn:xmpp:mam:2' queryid='f1'"],
        );
        assert_eq!(results.len(), 2, "{out:?}");
        assert!(results[0].contains(&ids[3]) && results[1].contains(&ids[4]));
        assert!(
            results[0].contains("<delay xmlns='urn:xmpp:delay' stamp='")
                && results[0].contains("hello 3")
        );
        let fin = to(&out, "phone", &["id='q1'", "type='result'", "fin"]);
        assert_eq!(fin.len(), 1, "{out:?}");
        assert!(
            fin[0].contains(&ids[3])
                && fin[0].contains("<count>5</count>")
                && !fin[0].contains("complete='true'"),
            "{}",
            fin[0]
        );
        // Flipped: the same page, newest first.
        send(&mut u, "phone", "<iq type='set' id='q2'><query xmlns='urn:xmpp:mam:2'><set xmlns='http://jabber.org/protocol/rsm'><max>2</max><before/></set><flip-page/></query></iq>").await;
        let out = take(&mut u);
        let results = to(&out, "phone", &["<result xmlns='urn:xmpp:mam:2'"]);
        assert!(results[0].contains(&ids[4]) && results[1].contains(&ids[3]));
        // Forwards from an id to the end: complete.
        let q = format!("<iq type='set' id='q3'><query xmlns='urn:xmpp:mam:2'><set xmlns='http://jabber.org/protocol/rsm'><max>10</max><after>{}</after></set></query></iq>", ids[2]);
        send(&mut u, "phone", &q).await;
        let out = take(&mut u);
        assert_eq!(to(&out, "phone", &["<result "]).len(), 2);
        assert_eq!(
            to(&out, "phone", &["complete=", "true"]).len(),
            1,
            "{out:?}"
        );
        // An id the archive does not have.
        send(&mut u, "phone", "<iq type='set' id='q4'><query xmlns='urn:xmpp:mam:2'><set xmlns='http://jabber.org/protocol/rsm'><after>nope</after></set></query></iq>").await;
        assert_eq!(
            to(&take(&mut u), "phone", &["id='q4'", "item-not-found"]).len(),
            1
        );
        // Metadata: the first and last item.
        send(
            &mut u,
            "phone",
            "<iq type='get' id='q5'><metadata xmlns='urn:xmpp:mam:2'/></iq>",
        )
        .await;
        let out = take(&mut u);
        let meta = to(&out, "phone", &["id='q5'"]);
        assert!(
            meta[0].contains(&format!("<start id='{}'", ids[0]))
                && meta[0].contains(&format!("<end id='{}'", ids[4])),
            "{out:?}"
        );
    }

    #[tokio::test]
    async fn retention_keeps_the_newest() {
        let ctx = ctx(None, "<mam max-messages='3' max-days='30'/>");
        let mut u = user(&ctx, "alice@localhost");
        for n in 0..5 {
            inbound(&mut u, &chat(n)).await;
        }
        let kept: Vec<String> = archive_of(&u)
            .await
            .iter()
            .map(|i| String::from_utf8_lossy(&i.payload).into_owned())
            .collect();
        assert_eq!(kept.len(), 3);
        assert!(
            kept[0].contains("hello 2") && kept[2].contains("hello 4"),
            "{kept:?}"
        );
    }

    #[tokio::test]
    async fn the_form_for_the_owner_and_nothing_for_others() {
        let ctx = ctx(None, "");
        let mut u = user(&ctx, "alice@localhost");
        start(&mut u, "phone").await;
        send(
            &mut u,
            "phone",
            "<iq type='get' id='f'><query xmlns='urn:xmpp:mam:2'/></iq>",
        )
        .await;
        let out = take(&mut u);
        let form = to(&out, "phone", &["id='f'", "type='result'"]);
        assert!(
            form[0].contains("<query xmlns='urn:xmpp:mam:2'><x xmlns='jabber:x:data' type='form'>"),
            "{out:?}"
        );
        assert!(
            form[0].contains("var='with'") && form[0].contains("var='ids'"),
            "{out:?}"
        );
        inbound(&mut u, "<iq type='set' id='o' from='bob@example.com/x' to='alice@localhost'><query xmlns='urn:xmpp:mam:2'/></iq>").await;
        assert_eq!(to(&take(&mut u), "", &["id='o'", "forbidden"]).len(), 1);
    }

    #[tokio::test]
    async fn preferences_decide_what_is_archived() {
        let ctx = ctx(None, "");
        let mut u = user(&ctx, "alice@localhost");
        online(&mut u, "phone", 0).await;
        send(&mut u, "phone", "<iq type='set' id='p1'><prefs xmlns='urn:xmpp:mam:2' default='always'><always/><never><jid>bob@example.com</jid></never></prefs></iq>").await;
        let out = take(&mut u);
        assert_eq!(
            to(
                &out,
                "phone",
                &["id='p1'", "type='result'", "bob@example.com"]
            )
            .len(),
            1,
            "{out:?}"
        );
        inbound(&mut u, &chat(1)).await;
        let out = take(&mut u);
        assert!(!out[0].1.contains("stanza-id"), "{out:?}");
        inbound(
            &mut u,
            &chat(2).replace("bob@example.com", "carol@example.com"),
        )
        .await;
        assert_eq!(archive_of(&u).await.len(), 1);
        // Kept for the next task.
        let mut again = user(&ctx, "alice@localhost");
        inbound(&mut again, &chat(3)).await;
        assert_eq!(archive_of(&again).await.len(), 1);
        send(
            &mut u,
            "phone",
            "<iq type='get' id='p2'><prefs xmlns='urn:xmpp:mam:2'/></iq>",
        )
        .await;
        assert_eq!(
            to(
                &take(&mut u),
                "phone",
                &["id='p2'", "never", "bob@example.com"]
            )
            .len(),
            1
        );
    }

    fn packet(s: &str) -> Packet {
        Packet::new(
            jrs_stream::Stanza::parse(bytes::Bytes::from(s.to_owned())).unwrap(),
            None,
            None,
        )
    }

    #[test]
    fn what_is_archived() {
        assert!(archivable(&packet(
            "<message type='chat'><body>hi</body></message>"
        )));
        assert!(archivable(&packet("<message><body>hi</body></message>")));
        assert!(!archivable(&packet("<message type='chat'><active xmlns='http://jabber.org/protocol/chatstates'/></message>")));
        assert!(archivable(&packet("<message type='chat'><store xmlns='urn:xmpp:hints'/><received xmlns='urn:xmpp:receipts' id='1'/></message>")));
        assert!(archivable(&packet(
            "<message type='chat'><encrypted xmlns='eu.siacs.conversations.axolotl'/></message>"
        )));
        assert!(!archivable(&packet(
            "<message type='chat'><body>x</body><no-store xmlns='urn:xmpp:hints'/></message>"
        )));
        assert!(!archivable(&packet(
            "<message type='groupchat'><body>x</body></message>"
        )));
        assert!(!archivable(&packet(
            "<message type='error'><body>x</body></message>"
        )));
        assert!(!archivable(&packet(
            "<message type='headline'><body>x</body></message>"
        )));
        assert!(!archivable(&packet(
            "<message><sent xmlns='urn:xmpp:carbons:2'><forwarded xmlns='urn:xmpp:forward:0'/></sent><body>x</body></message>"
        )));
    }
}
