//! Entity capabilities (XEP-0115): what a client supports, announced in its presence as
//! a hash (`<c hash node ver/>`) of its disco#info. sm asks a client's disco#info once
//! per unknown `ver` (never once per login: the cache is shared by every user of the
//! process), checks that the answer hashes to `ver`, and keeps it; PEP reads a
//! session's `+notify` interests from it.
//!
//! The wait for an answer never blocks a user's task: `lookup` answers `Pending` and
//! wakes the asking module on the user's task (`Event::Wake` with [`Resolved`]) when
//! the answer is in.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jid::{BareJid, Jid};
use lru::LruCache;
use tracing::{debug, info, warn};
use xmpp_parsers::disco::DiscoInfoResult;
use xmpp_parsers::ns::DISCO_INFO;

use jrs_stream::xml::escape;

use crate::config::{count, SmConfig};
use crate::host::registry::{Event, Wake};
use crate::host::shared::Shared;
use crate::host::{Declaration, Module, Packet, User};
use crate::xml::Element;

pub use jrs_sx::caps::{NS_CAPS, NS_ECAPS2};

/// How long a client has to answer a disco#info query.
const ANSWER_WAIT: Duration = Duration::from_secs(10);
/// How long a `ver` whose query to one entity failed (no answer, wrong hash) is not
/// asked of that entity again. Others announcing it are asked: one client cannot make
/// a `ver` fail for everyone.
const FAILED_FOR: Duration = Duration::from_secs(300);

/// The capabilities a presence announces, as something to verify: a XEP-0390 `<c
/// xmlns='urn:xmpp:caps'>` hash (preferred: SHA-1 is weak), else a XEP-0115 `<c/>` with a
/// hash (a legacy `<c/>` without one is not verifiable and is ignored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caps {
    /// What names these capabilities in the cache: the XEP-0115 `ver`, or
    /// `ALGO.HASH` for XEP-0390.
    pub ver: String,
    /// The disco#info node to ask.
    pub node: String,
    pub scheme: Scheme,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scheme {
    /// XEP-0115 with this XEP-0300 hash algorithm.
    Caps { algo: String, ver: String },
    /// XEP-0390 with this algorithm and hash.
    Ecaps2 { algo: String, hash: String },
}

impl Caps {
    fn of(c: &Element) -> Option<Caps> {
        let (algo, node, ver) = (c.attr("hash")?, c.attr("node")?, c.attr("ver")?);
        let caps = Caps {
            ver: ver.to_owned(),
            node: format!("{node}#{ver}"),
            scheme: Scheme::Caps {
                algo: algo.to_owned(),
                ver: ver.to_owned(),
            },
        };
        (!ver.is_empty() && ver.len() <= 256 && node.len() <= 1024).then_some(caps)
    }

    /// The first XEP-0390 hash of an algorithm we can check.
    fn of_ecaps2(c: &Element) -> Option<Caps> {
        c.elements()
            .filter(|h| h.local_name() == "hash")
            .filter_map(|h| Some((h.attr("algo")?.to_owned(), h.text().trim().to_owned())))
            .find(|(algo, hash)| {
                matches!(
                    algo.as_str(),
                    "sha-256" | "sha-512" | "sha3-256" | "sha3-512"
                ) && !hash.is_empty()
                    && hash.len() <= 256
            })
            .map(|(algo, hash)| Caps {
                ver: format!("{algo}.{hash}"),
                node: format!("{NS_ECAPS2}#{algo}.{hash}"),
                scheme: Scheme::Ecaps2 { algo, hash },
            })
    }

    /// The caps of a presence packet.
    pub fn of_packet(p: &Packet) -> Option<Caps> {
        let parse = |ns: &str| {
            let child = p.child("c", ns)?;
            Element::parse(p.child_bytes(child), "").ok()
        };
        if let Some(c) = parse(NS_ECAPS2).as_ref().and_then(Caps::of_ecaps2) {
            return Some(c);
        }
        Caps::of(&parse(NS_CAPS)?)
    }

    /// Whether `info` is what these capabilities hash.
    fn verifies(&self, info: &DiscoInfoResult) -> bool {
        let (hash, expected) = match &self.scheme {
            Scheme::Caps { algo, ver } => (jrs_sx::caps::ver(info, algo), ver),
            Scheme::Ecaps2 { algo, hash } => (jrs_sx::caps::ecaps2(info, algo), hash),
        };
        hash.as_deref() == Some(expected.as_str())
    }
}

/// What an entity supports, as its verified disco#info says.
#[derive(Debug, Default)]
pub struct Features(Vec<String>);

impl Features {
    /// Whether the entity wants PEP notifications of `node` (XEP-0163 `NODE+notify`).
    pub fn notifies(&self, node: &str) -> bool {
        self.0
            .iter()
            .any(|f| f.len() == node.len() + 7 && f.starts_with(node) && f.ends_with("+notify"))
    }
}

/// What [`lookup`] knows of a `ver`.
#[derive(Debug, Clone)]
pub enum Lookup {
    Known(Arc<Features>),
    /// Asked; the module is woken with [`Resolved`] when the answer is in.
    Pending,
    /// Not verifiable (asked recently, without a good answer).
    Failed,
}

/// What a module waiting on a `ver` is woken with.
#[derive(Debug)]
pub struct Resolved {
    pub ver: String,
}

/// The process-wide cache of verified capabilities.
pub struct Cache {
    inner: Mutex<Inner>,
    /// disco#info queries sent to clients (a benchmark figure: one per distinct `ver`).
    pub queries: AtomicU64,
}

struct Inner {
    known: LruCache<String, Arc<Features>>,
    /// (`ver`, entity) whose query failed.
    failed: LruCache<(String, String), Instant>,
    /// `ver`s being asked, and who waits: (user, module to wake).
    waiting: HashMap<String, Vec<(BareJid, &'static str)>>,
}

impl Cache {
    pub fn new(size: usize) -> Cache {
        let size = std::num::NonZeroUsize::new(size.max(1)).expect("at least one");
        Cache {
            inner: Mutex::new(Inner {
                known: LruCache::new(size),
                failed: LruCache::new(size),
                waiting: HashMap::new(),
            }),
            queries: AtomicU64::new(0),
        }
    }

    /// The features behind `ver` if they are known; no query is started.
    pub fn known(&self, ver: &str) -> Option<Arc<Features>> {
        self.inner
            .lock()
            .expect("caps lock")
            .known
            .get(ver)
            .cloned()
    }

    /// Adds what a test knows to be true.
    #[cfg(test)]
    pub fn insert(&self, ver: &str, features: Vec<String>) {
        let mut inner = self.inner.lock().expect("caps lock");
        inner
            .known
            .put(ver.to_owned(), Arc::new(Features(features)));
    }
}

pub struct CapsModule {
    cache_size: usize,
}

pub fn load_module(config: &SmConfig) -> jrs_config::Result<Arc<dyn Module>> {
    let mut cache_size = 10_000;
    if let Some(n) = config.module_settings("caps")? {
        n.allow(&["cache-size"], &[])?;
        cache_size = count(n, "cache-size", cache_size)?;
    }
    Ok(Arc::new(CapsModule { cache_size }))
}

#[async_trait::async_trait]
impl Module for CapsModule {
    fn name(&self) -> &'static str {
        "caps"
    }

    fn declare(&self) -> Declaration {
        Declaration::default()
    }

    fn install(&self, shared: &mut Shared) {
        shared.insert(Arc::new(Cache::new(self.cache_size)));
    }
}

/// The features behind `caps`, which `entity` announced: from the cache, else a
/// disco#info query to `entity` starts (one per `ver` at a time, whoever else waits for
/// it) and `module` is woken on this user's task when the answer is in.
pub fn lookup(u: &User, caps: &Caps, entity: &Jid, module: &'static str) -> Lookup {
    let Some(cache) = u.ctx.shared.get::<Cache>() else {
        return Lookup::Failed;
    };
    let mut inner = cache.inner.lock().expect("caps lock");
    if let Some(f) = inner.known.get(&caps.ver) {
        return Lookup::Known(f.clone());
    }
    let failure = (caps.ver.clone(), entity.to_string());
    if let Some(when) = inner.failed.get(&failure) {
        if when.elapsed() < FAILED_FOR {
            return Lookup::Failed;
        }
    }
    let first = !inner.waiting.contains_key(&caps.ver);
    let waiters = inner.waiting.entry(caps.ver.clone()).or_default();
    if !waiters.iter().any(|(j, m)| j == &u.jid && *m == module) {
        waiters.push((u.jid.clone(), module));
    }
    drop(inner);
    if first {
        cache.queries.fetch_add(1, Ordering::Relaxed);
        let ctx = u.ctx.clone();
        let (caps, entity) = (caps.clone(), entity.clone());
        let from = u.jid.domain().as_str().to_owned();
        tokio::spawn(async move {
            let features = ask(&ctx, &from, &entity, &caps).await;
            let waiters = {
                let mut inner = cache.inner.lock().expect("caps lock");
                match features {
                    Some(f) => {
                        inner.known.put(caps.ver.clone(), Arc::new(Features(f)));
                    }
                    None => {
                        inner.failed.put(failure, Instant::now());
                    }
                }
                inner.waiting.remove(&caps.ver).unwrap_or_default()
            };
            for (user, module) in waiters {
                let data = Wake(Box::new(Resolved {
                    ver: caps.ver.clone(),
                }));
                crate::host::task::dispatch(&ctx, &user, Event::Wake { module, data });
            }
        });
    }
    Lookup::Pending
}

/// Asks `entity` for the disco#info of `caps` and checks it against the hash.
async fn ask(
    ctx: &Arc<crate::host::Ctx>,
    from: &str,
    entity: &Jid,
    caps: &Caps,
) -> Option<Vec<String>> {
    let query = format!(
        "<query xmlns='{DISCO_INFO}' node='{}'/>",
        escape(&caps.node)
    );
    let Some(answer) = ctx
        .ask("get", from, entity.as_str(), &query, ANSWER_WAIT)
        .await
    else {
        info!(%entity, ver = %caps.ver, "no answer to a capabilities query");
        return None;
    };
    if answer.kind() != Some("result") {
        debug!(%entity, ver = %caps.ver, "capabilities query refused");
        return None;
    }
    let iq = crate::stanzas::parse(&answer).ok()?;
    let query = iq.child("query", DISCO_INFO)?;
    let el: minidom::Element = query.to_xml().parse().ok()?;
    let info = match DiscoInfoResult::try_from(el) {
        Ok(i) => i,
        Err(e) => {
            warn!(%entity, "unreadable disco#info for capabilities: {e}");
            return None;
        }
    };
    if query.attr("node") != Some(caps.node.as_str()) || !caps.verifies(&info) {
        warn!(%entity, ver = %caps.ver, "capabilities do not match their hash: ignored");
        return None;
    }
    debug!(%entity, ver = %caps.ver, features = info.features.len(), "capabilities verified");
    Some(info.features.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_interest_is_the_node_and_plus_notify() {
        let f = Features(vec![
            "urn:xmpp:avatar:metadata+notify".into(),
            "urn:xmpp:avatar:data".into(),
        ]);
        assert!(f.notifies("urn:xmpp:avatar:metadata"));
        assert!(!f.notifies("urn:xmpp:avatar:data"));
        assert!(!f.notifies("urn:xmpp:avatar"));
    }

    #[test]
    fn caps_need_a_hash() {
        let p = Element::parse(
            b"<presence xmlns='jabber:client'><c xmlns='http://jabber.org/protocol/caps' hash='sha-1' node='n' ver='v='/></presence>",
            "",
        )
        .unwrap();
        let of = |p: &Element| Caps::of(p.child("c", NS_CAPS)?);
        assert_eq!(of(&p).unwrap().ver, "v=");
        assert_eq!(of(&p).unwrap().node, "n#v=");
        let legacy = Element::parse(
            b"<presence xmlns='jabber:client'><c xmlns='http://jabber.org/protocol/caps' node='n' ver='1.0'/></presence>",
            "",
        )
        .unwrap();
        assert!(of(&legacy).is_none());
    }

    #[test]
    fn ecaps2_takes_a_strong_hash() {
        let c = Element::parse(
            b"<c xmlns='urn:xmpp:caps'><hash xmlns='urn:xmpp:hashes:2' algo='sha-1'>weak=</hash><hash xmlns='urn:xmpp:hashes:2' algo='sha-256'>strong=</hash></c>",
            "",
        )
        .unwrap();
        let caps = Caps::of_ecaps2(&c).unwrap();
        assert_eq!(caps.ver, "sha-256.strong=");
        assert_eq!(caps.node, "urn:xmpp:caps#sha-256.strong=");
    }
}
