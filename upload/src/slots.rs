//! The XMPP side: service discovery and slot requests (XEP-0363), on the router link.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jid::Jid;
use jrs_component::{ComponentReader, Outbox};
use jrs_stream::children::children;
use jrs_stream::xml::escape;
use jrs_stream::{Stanza, StanzaErrorCondition};
use tracing::{debug, info};

use crate::config::UploadConfig;
use crate::sign::{new_slot_id, normalize_content_type, sanitize_name, Signer, Slot};
use crate::store::Store;

pub const NS_UPLOAD: &str = "urn:xmpp:http:upload:0";
const NS_DISCO_INFO: &str = "http://jabber.org/protocol/disco#info";
const NS_DISCO_ITEMS: &str = "http://jabber.org/protocol/disco#items";
const NS_PING: &str = "urn:xmpp:ping";

pub struct Service {
    pub config: UploadConfig,
    pub signer: Signer,
    pub store: Arc<Store>,
    /// Per user: the sizes granted within the quota window, oldest first.
    granted: Mutex<HashMap<String, VecDeque<(Instant, u64)>>>,
}

/// Why a slot is refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    NotAllowed,
    BadRequest(&'static str),
    TooLarge(u64),
    /// The quota is used up; when enough of it frees again (if ever, for this size).
    Quota(Option<SystemTime>),
    Disk,
}

impl Service {
    pub fn new(config: UploadConfig, signer: Signer, store: Arc<Store>) -> Service {
        Service {
            config,
            signer,
            store,
            granted: Mutex::new(HashMap::new()),
        }
    }

    /// Checks a request and grants the slot (counting it against the quota and budget).
    pub fn grant(
        &self,
        user: &jid::BareJid,
        filename: &str,
        size: Option<u64>,
        content_type: Option<&str>,
    ) -> Result<Slot, Refusal> {
        if !self.config.allows(user) {
            return Err(Refusal::NotAllowed);
        }
        let size = size.ok_or(Refusal::BadRequest("'size' must be a number of bytes"))?;
        if filename.trim().is_empty() {
            return Err(Refusal::BadRequest("'filename' is required"));
        }
        if size == 0 {
            return Err(Refusal::BadRequest("'size' must be more than 0"));
        }
        if size > self.config.max_file_size {
            return Err(Refusal::TooLarge(self.config.max_file_size));
        }
        let content_type = match content_type.map(str::trim).filter(|c| !c.is_empty()) {
            // No type asked for: the PUT may send any, the file is served as
            // application/octet-stream.
            None => String::new(),
            Some(c) => normalize_content_type(c)
                .ok_or(Refusal::BadRequest("'content-type' is not a MIME type"))?,
        };
        let id = new_slot_id();
        let lifetime = self.config.slot_lifetime.max(Duration::from_secs(1));
        {
            let mut granted = self.granted.lock().expect("quota lock");
            let now = Instant::now();
            let window = self.config.quota_window;
            granted.retain(|_, q| {
                while q
                    .front()
                    .is_some_and(|(t, _)| now.duration_since(*t) > window)
                {
                    q.pop_front();
                }
                !q.is_empty()
            });
            let quota = self.config.quota_bytes;
            if quota > 0 {
                let q = granted.get(user.as_str());
                let used: u64 = q.map_or(0, |q| q.iter().map(|(_, s)| s).sum());
                if used.saturating_add(size) > quota {
                    return Err(Refusal::Quota(
                        q.and_then(|q| retry_at(q, size, quota, window)),
                    ));
                }
            }
            if !self
                .store
                .reserve(&id, size, self.config.disk_budget, now + lifetime)
            {
                return Err(Refusal::Disk);
            }
            // Without a quota nothing is recorded.
            if quota > 0 {
                granted
                    .entry(user.to_string())
                    .or_default()
                    .push_back((now, size));
            }
        }
        let expires = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs()
            + lifetime.as_secs();
        Ok(Slot {
            id,
            name: sanitize_name(filename),
            size,
            content_type,
            expires,
        })
    }

    fn me(&self) -> &str {
        &self.config.router.name
    }

    fn disco_info(&self) -> String {
        format!(
            "<query xmlns='{NS_DISCO_INFO}'>\
             <identity category='store' type='file' name='HTTP File Upload'/>\
             <feature var='{NS_DISCO_INFO}'/><feature var='{NS_DISCO_ITEMS}'/>\
             <feature var='{NS_PING}'/><feature var='{NS_UPLOAD}'/>\
             <x xmlns='jabber:x:data' type='result'>\
             <field var='FORM_TYPE' type='hidden'><value>{NS_UPLOAD}</value></field>\
             <field var='max-file-size'><value>{}</value></field></x></query>",
            self.config.max_file_size
        )
    }

    /// The answer to one stanza from the router, if any.
    pub fn answer(&self, stanza: &Stanza) -> Option<bytes::Bytes> {
        if stanza.name() != "iq" || !matches!(stanza.kind(), Some("get" | "set")) {
            return None;
        }
        let kids = children(stanza);
        let Some(child) = kids.first().filter(|_| kids.len() == 1) else {
            return stanza.error_reply(StanzaErrorCondition::BadRequest, "one child expected");
        };
        let raw = &stanza.as_slice()[child.span.clone()];
        let el = Stanza::parse_slice(raw).ok()?;
        let get = stanza.kind() == Some("get");
        let result = |content: &str| {
            let mut s = format!(
                "<iq type='result' from='{}' id='{}'",
                escape(self.me()),
                escape(stanza.id().unwrap_or(""))
            );
            if let Some(from) = stanza.attr("from") {
                s.push_str(&format!(" to='{}'", escape(&from)));
            }
            s.push('>');
            s.push_str(content);
            s.push_str("</iq>");
            Some(bytes::Bytes::from(s))
        };
        let to_me = stanza
            .attr("to")
            .is_some_and(|t| t.eq_ignore_ascii_case(self.me()));
        match (child.ns.as_str(), child.name.as_str(), get) {
            (_, _, _) if !to_me => stanza.error_reply(StanzaErrorCondition::ServiceUnavailable, ""),
            (NS_DISCO_INFO, "query", true) => match el.attr("node") {
                Some(_) => stanza.error_reply(StanzaErrorCondition::ItemNotFound, "no such node"),
                None => result(&self.disco_info()),
            },
            (NS_DISCO_ITEMS, "query", true) => match el.attr("node") {
                Some(_) => stanza.error_reply(StanzaErrorCondition::ItemNotFound, "no such node"),
                None => result(&format!("<query xmlns='{NS_DISCO_ITEMS}'/>")),
            },
            (NS_PING, "ping", true) => result(""),
            (NS_UPLOAD, "request", true) => self.request(stanza, &el, result),
            _ => stanza.error_reply(StanzaErrorCondition::ServiceUnavailable, ""),
        }
    }

    fn request(
        &self,
        stanza: &Stanza,
        el: &Stanza<&[u8]>,
        result: impl Fn(&str) -> Option<bytes::Bytes>,
    ) -> Option<bytes::Bytes> {
        let user = stanza
            .attr("from")
            .and_then(|f| Jid::new(&f).ok())
            .map(|j| j.to_bare());
        let Some(user) = user else {
            return stanza.error_reply(StanzaErrorCondition::NotAllowed, "who are you?");
        };
        let filename = el.attr("filename").unwrap_or_default();
        let size = el.attr("size").and_then(|s| s.trim().parse::<u64>().ok());
        let content_type = el.attr("content-type");
        match self.grant(&user, &filename, size, content_type.as_deref()) {
            Ok(slot) => {
                let (put, get) = self.signer.urls(&self.config.http.base_url, &slot);
                info!(slot = %slot.id, %user, size = slot.size, name = %slot.name, "slot granted");
                crate::SLOTS.by("granted").inc();
                result(&format!(
                    "<slot xmlns='{NS_UPLOAD}'><put url='{}'/><get url='{}'/></slot>",
                    escape(&put),
                    escape(&get)
                ))
            }
            Err(refusal) => {
                info!(%user, ?refusal, size, disk_used = self.store.used(), "slot refused");
                crate::SLOTS.by("refused").inc();
                match refusal {
                    Refusal::NotAllowed => stanza.error_reply(
                        StanzaErrorCondition::NotAllowed,
                        "only users of this server may upload",
                    ),
                    Refusal::BadRequest(why) => {
                        stanza.error_reply(StanzaErrorCondition::BadRequest, why)
                    }
                    Refusal::TooLarge(max) => stanza.error_reply_with(
                        StanzaErrorCondition::NotAcceptable,
                        &format!("the file is too large: at most {max} bytes"),
                        &format!(
                            "<file-too-large xmlns='{NS_UPLOAD}'>\
                             <max-file-size>{max}</max-file-size></file-too-large>"
                        ),
                    ),
                    Refusal::Quota(retry) => stanza.error_reply_with(
                        StanzaErrorCondition::ResourceConstraint,
                        "upload quota reached; try again later",
                        &retry.map_or(String::new(), |t| {
                            format!("<retry xmlns='{NS_UPLOAD}' stamp='{}'/>", stamp(t))
                        }),
                    ),
                    Refusal::Disk => stanza.error_reply(
                        StanzaErrorCondition::ResourceConstraint,
                        "the server's upload storage is full",
                    ),
                }
            }
        }
    }
}

/// When the grants `q` (oldest first) will have left the quota window far enough for
/// `size` more bytes within `quota`; `None` if `size` alone is over the quota.
fn retry_at(
    q: &VecDeque<(Instant, u64)>,
    size: u64,
    quota: u64,
    window: Duration,
) -> Option<SystemTime> {
    if size > quota {
        return None;
    }
    let mut used: u64 = q.iter().map(|(_, s)| s).sum();
    let (now, wall) = (Instant::now(), SystemTime::now());
    for (t, s) in q {
        used -= s;
        if used + size <= quota {
            // A grant leaves the window once it is more than `window` old.
            let at = (*t + window).saturating_duration_since(now) + Duration::from_secs(1);
            return Some(wall + at);
        }
    }
    None
}

/// An XEP-0082 UTC date and time, `YYYY-MM-DDThh:mm:ssZ`.
pub fn stamp(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Days since 1970-01-01 to a civil date (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
}

/// Serves one router link until it drops.
pub async fn serve(
    service: Arc<Service>,
    mut reader: ComponentReader,
    outbox: Outbox,
) -> anyhow::Result<()> {
    loop {
        let stanza = reader.next().await?;
        match service.answer(&stanza) {
            Some(reply) => {
                outbox.send(reply);
            }
            None => debug!(name = stanza.name(), "not answered"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn service(extra: &str) -> (Service, tempfile::TempDir) {
        let tmp = tempfile::tempdir().unwrap();
        let text = format!(
            "<upload><router name='upload.localhost' secret='s'/><host>localhost</host>\
             <http port='5280'/><secret>0123456789abcdef0123</secret><spool dir='x'/>{extra}</upload>"
        );
        let node = jrs_config::Node::parse_str(&text, Arc::new(PathBuf::from("u.xml"))).unwrap();
        let config = UploadConfig::from_node(&node).unwrap();
        let store = Arc::new(Store::new(
            tmp.path().to_path_buf(),
            Duration::from_secs(60),
            Duration::from_secs(60),
        ));
        (
            Service::new(config, Signer::new(b"0123456789abcdef0123"), store),
            tmp,
        )
    }

    fn iq(from: &str, body: &str) -> Stanza {
        Stanza::parse(bytes::Bytes::from(format!(
            "<iq type='get' id='i1' from='{from}' to='upload.localhost'>{body}</iq>"
        )))
        .unwrap()
    }

    fn answer(s: &Service, from: &str, body: &str) -> String {
        String::from_utf8(s.answer(&iq(from, body)).unwrap().to_vec()).unwrap()
    }

    #[test]
    fn disco_and_slots() {
        let (s, _tmp) = service("<files max-size='1000'/><quota bytes='1500' window='60'/>");
        let info = answer(
            &s,
            "a@localhost/r",
            &format!("<query xmlns='{NS_DISCO_INFO}'/>"),
        );
        assert!(
            info.contains("type='result'") && info.contains(NS_UPLOAD),
            "{info}"
        );
        assert!(info.contains("<field var='max-file-size'><value>1000</value>"));
        let req = |size: u64| {
            format!(
                "<request xmlns='{NS_UPLOAD}' filename='../a b.png' size='{size}' content-type='image/png'/>"
            )
        };
        let ok = answer(&s, "a@localhost/r", &req(800));
        assert!(ok.contains("<put url='http://127.0.0.1:5280/"), "{ok}");
        assert!(
            ok.contains("/a_b.png?size=800&amp;type=image%2Fpng&amp;expires="),
            "{ok}"
        );
        let big = answer(&s, "a@localhost/r", &req(1001));
        assert!(
            big.contains("not-acceptable") && big.contains("<max-file-size>1000</max-file-size>"),
            "{big}"
        );
        let quota = answer(&s, "a@localhost/r", &req(800));
        assert!(quota.contains("resource-constraint"), "{quota}");
        // Another user has a quota of their own.
        assert!(answer(&s, "b@localhost/r", &req(800)).contains("<slot"));
        let other = answer(&s, "c@example.net/r", &req(10));
        assert!(other.contains("not-allowed"), "{other}");
        let bad = answer(
            &s,
            "a@localhost/r",
            &format!("<request xmlns='{NS_UPLOAD}' filename='x' size='ten'/>"),
        );
        assert!(bad.contains("bad-request"), "{bad}");
        let unknown = answer(&s, "a@localhost/r", "<query xmlns='jabber:iq:version'/>");
        assert!(unknown.contains("service-unavailable"), "{unknown}");
    }

    #[test]
    fn disk_budget() {
        let (s, _tmp) = service("<files max-size='1000' disk-budget='1500'/>");
        let user = jid::BareJid::new("a@localhost").unwrap();
        assert!(s.grant(&user, "x", Some(1000), None).is_ok());
        assert_eq!(s.grant(&user, "x", Some(600), None), Err(Refusal::Disk));
        let slot = s.grant(&user, "x", Some(500), None).unwrap();
        assert_eq!(slot.content_type, "");
    }

    #[test]
    fn quota_answers_say_when_to_retry() {
        let (s, _tmp) = service("<files max-size='1000'/><quota bytes='1500' window='60'/>");
        let req =
            |size: u64| format!("<request xmlns='{NS_UPLOAD}' filename='a.bin' size='{size}'/>");
        assert!(answer(&s, "a@localhost/r", &req(800)).contains("<slot"));
        let before = SystemTime::now();
        let refused = answer(&s, "a@localhost/r", &req(800));
        assert!(
            refused.contains("resource-constraint") && refused.contains("type='wait'"),
            "{refused}"
        );
        // The first grant leaves the window in a minute.
        let expected = [0, 1, 2].map(|d| stamp(before + Duration::from_secs(60 + d)));
        assert!(
            expected
                .iter()
                .any(|e| refused.contains(&format!("<retry xmlns='{NS_UPLOAD}' stamp='{e}'/>"))),
            "{refused}"
        );
        assert_eq!(
            stamp(UNIX_EPOCH + Duration::from_secs(1_700_000_000)),
            "2023-11-14T22:13:20Z"
        );
        assert_eq!(
            stamp(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00Z"
        );
    }

    #[test]
    fn no_quota_records_nothing() {
        let (s, _tmp) = service("<files max-size='1000'/><quota bytes='0' window='60'/>");
        let user = jid::BareJid::new("a@localhost").unwrap();
        for _ in 0..10 {
            assert!(s.grant(&user, "x", Some(1000), None).is_ok());
        }
        assert!(s.granted.lock().unwrap().is_empty());
    }
}
