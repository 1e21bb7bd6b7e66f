//! External service discovery (XEP-0215): the STUN and TURN servers (or any other
//! external service) that sm.xml's `<extdisco>` lists, told to the user's own clients.
//!
//! A service with a shared secret gets time-limited credentials as the TURN REST scheme
//! computes them (draft-uberti-behave-turn-rest; coturn's `use-auth-secret` with
//! `static-auth-secret`): username `EXPIRY:USER` (EXPIRY a UNIX time, `USER` the bare
//! JID), password base64(HMAC-SHA1(secret, username)); the TURN server checks them with
//! the same secret and no call to sm. They come with the list (`restricted='1'`) and
//! again, fresh, for a `<credentials/>` request. Services without a secret are listed as
//! configured. The secret is never logged and never in an error message.
//!
//! ```xml
//! <extdisco ttl='86400'>
//!   <service type='stun' host='turn.example.org' port='3478' transport='udp'/>
//!   <service type='turn' host='turn.example.org' port='3478' transport='udp'
//!            secret-file='/etc/jabberd-rs/turn-secret'/>
//! </extdisco>
//! ```
//!
//! The feature `urn:xmpp:extdisco:2` is advertised on the server, and its requests
//! answered, only when at least one service is configured.

use std::fmt;
use std::sync::Arc;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha1::Sha1;
use tracing::debug;
use xmpp_parsers::ns::EXT_DISCO;

use jrs_config::Node;
use jrs_stream::StanzaErrorCondition;

use crate::clock::{stamp, unix_now};
use crate::config::SmConfig;
use crate::host::{Declaration, Disco, Iq, IqKind, Module, Reply, Scope, User};
use crate::xml::Element;

/// How long credentials are good for when sm.xml does not say (coturn's suggestion).
const DEFAULT_TTL: u64 = 86_400;
/// The longest `ttl=` accepted: a year.
const MAX_TTL: u64 = 365 * 86_400;

pub struct ExtDisco {
    services: Vec<Service>,
}

/// A shared secret. Its `Debug` does not show it, so no log line can.
struct Secret(Vec<u8>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// One `<service/>` of sm.xml.
#[derive(Debug)]
struct Service {
    /// `stun`, `turn`, `stuns`, `turns`, or another registered type.
    kind: String,
    host: String,
    port: Option<u16>,
    transport: Option<&'static str>,
    name: Option<String>,
    /// The TURN REST shared secret: credentials per user.
    secret: Option<Secret>,
    /// Seconds the credentials are good for.
    ttl: u64,
}

pub fn load_module(config: &SmConfig) -> jrs_config::Result<Arc<dyn Module>> {
    let mut services: Vec<Service> = vec![];
    if let Some(n) = config.module_settings("extdisco")? {
        n.allow(&["ttl"], &["service"])?;
        let ttl = ttl_attr(n)?.unwrap_or(DEFAULT_TTL);
        for s in n.children("service") {
            let service = Service::from_node(s, ttl)?;
            if services.iter().any(|o| o.same_as(&service)) {
                return Err(s.error(format!(
                    "the {} service at {} (same port and transport) is listed twice",
                    service.kind, service.host
                )));
            }
            services.push(service);
        }
    }
    Ok(Arc::new(ExtDisco { services }))
}

/// `ttl=`: whole seconds, 1 to a year.
fn ttl_attr(n: &Node) -> jrs_config::Result<Option<u64>> {
    let ttl: Option<u64> = n.parse_attr("ttl", "a whole number of seconds")?;
    match ttl {
        Some(t) if !(1..=MAX_TTL).contains(&t) => Err(n.error(format!(
            "attribute 'ttl' = '{t}': expected 1 to {MAX_TTL} seconds"
        ))),
        other => Ok(other),
    }
}

impl Service {
    fn from_node(s: &Node, default_ttl: u64) -> jrs_config::Result<Service> {
        s.allow(
            &[
                "type",
                "host",
                "port",
                "transport",
                "name",
                "secret",
                "secret-file",
                "ttl",
            ],
            &[],
        )?;
        let kind = s.required_attr("type")?.trim();
        if !kind
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-+._".contains(&b))
        {
            return Err(s.error(format!(
                "type '{kind}' is not a service type (stun, stuns, turn, turns, or another \
                 name of the XEP-0215 registry)"
            )));
        }
        let host = s.required_attr("host")?.trim();
        if !valid_host(host) {
            return Err(s.error(format!(
                "host '{host}' is neither a domain name nor an IP address"
            )));
        }
        let port: Option<u16> = s.parse_attr("port", "a port number (1-65535)")?;
        if port == Some(0) {
            return Err(s.error("attribute 'port' = '0': expected a port number (1-65535)"));
        }
        let transport = match s.attr("transport").map(str::trim) {
            None => None,
            Some("tcp") => Some("tcp"),
            Some("udp") => Some("udp"),
            Some(other) => {
                return Err(s.error(format!(
                    "attribute 'transport' = '{other}': expected tcp or udp"
                )))
            }
        };
        // Never put the secret's value into a message.
        let secret = match (s.attr("secret"), s.attr("secret-file")) {
            (Some(_), Some(_)) => {
                return Err(s.error("give either 'secret' or 'secret-file', not both"));
            }
            (Some(v), None) if v.trim().is_empty() => {
                return Err(s.error("attribute 'secret' is empty"));
            }
            (Some(v), None) => Some(Secret(v.trim().as_bytes().to_vec())),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path.trim()).map_err(|e| {
                    s.error(format!(
                        "cannot read the secret-file '{}': {e}",
                        path.trim()
                    ))
                })?;
                let text = text.trim();
                if text.is_empty() {
                    return Err(s.error(format!("the secret-file '{}' is empty", path.trim())));
                }
                Some(Secret(text.as_bytes().to_vec()))
            }
            (None, None) => None,
        };
        let ttl = ttl_attr(s)?;
        if ttl.is_some() && secret.is_none() {
            return Err(s.error(
                "attribute 'ttl' is how long credentials last: it needs 'secret' or 'secret-file'",
            ));
        }
        Ok(Service {
            kind: kind.to_owned(),
            host: host.to_owned(),
            port,
            transport,
            name: s
                .attr("name")
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .map(str::to_owned),
            secret,
            ttl: ttl.unwrap_or(default_ttl),
        })
    }

    fn same_as(&self, other: &Service) -> bool {
        (&self.kind, &self.host, self.port, self.transport)
            == (&other.kind, &other.host, other.port, other.transport)
    }

    /// `<service/>` for `user` at `now` (UNIX seconds), with credentials if it has a
    /// secret.
    fn element(&self, user: &str, now: u64) -> Element {
        let mut e = Element::new("service", EXT_DISCO)
            .with_attr("type", self.kind.as_str())
            .with_attr("host", self.host.as_str());
        if let Some(port) = self.port {
            e.set_attr("port", port.to_string());
        }
        if let Some(t) = self.transport {
            e.set_attr("transport", t);
        }
        if let Some(name) = &self.name {
            e.set_attr("name", name.as_str());
        }
        if let Some(secret) = &self.secret {
            let expiry = now.saturating_add(self.ttl);
            let username = format!("{expiry}:{user}");
            let password = turn_password(&secret.0, &username);
            e.set_attr("restricted", "1");
            e.set_attr("username", username);
            e.set_attr("password", password);
            e.set_attr("expires", stamp(expiry));
        }
        e
    }
}

/// A domain name (letters, digits, `-`, `_` in dot-separated labels) or an IP address.
fn valid_host(host: &str) -> bool {
    if host.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// The TURN REST password of `username`: base64(HMAC-SHA1(secret, username)).
fn turn_password(secret: &[u8], username: &str) -> String {
    let mut mac = Hmac::<Sha1>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

#[async_trait::async_trait]
impl Module for ExtDisco {
    fn name(&self) -> &'static str {
        "extdisco"
    }

    fn declare(&self) -> Declaration {
        if self.services.is_empty() {
            // Nothing to tell: not advertised, and the requests are service-unavailable.
            return Declaration::default();
        }
        Declaration::default()
            .iq(IqKind::Get, &[Scope::Server], EXT_DISCO, "services")
            .iq(IqKind::Get, &[Scope::Server], EXT_DISCO, "credentials")
            .feature(Disco::Server, EXT_DISCO)
    }

    async fn iq(&self, u: &mut User, iq: &Iq) -> Reply {
        if iq.session.is_none() {
            return Reply::error(
                StanzaErrorCondition::Forbidden,
                "external services are for this server's own users",
            );
        }
        let now = unix_now();
        if iq.payload.name() == "services" {
            let wanted = iq.payload.attr("type");
            let mut list = Element::new("services", EXT_DISCO);
            if let Some(t) = wanted {
                list.set_attr("type", t);
            }
            for s in self
                .services
                .iter()
                .filter(|s| wanted.is_none_or(|t| t == s.kind))
            {
                list.push(s.element(&u.bare, now));
            }
            debug!(
                kind = wanted.unwrap_or("*"),
                count = list.elements().count(),
                "external services listed"
            );
            return Reply::with(list);
        }
        self.credentials(u, iq, now)
    }
}

impl ExtDisco {
    /// `<credentials><service host= type= [port=]/></credentials>`: the services named,
    /// with fresh credentials (XEP-0215 section 3.3).
    fn credentials(&self, u: &User, iq: &Iq, now: u64) -> Reply {
        let mut answer = Element::new("credentials", EXT_DISCO);
        let mut asked = 0;
        for want in iq.payload.children().filter(|c| c.is("service", EXT_DISCO)) {
            asked += 1;
            let (Some(host), Some(kind)) = (want.attr("host"), want.attr("type")) else {
                return Reply::error(
                    StanzaErrorCondition::BadRequest,
                    "a <service/> of <credentials/> needs 'host' and 'type'",
                );
            };
            let port = match want.attr("port").map(str::parse::<u16>) {
                None => None,
                Some(Ok(p)) => Some(p),
                Some(Err(_)) => {
                    return Reply::error(StanzaErrorCondition::BadRequest, "'port' is not a port")
                }
            };
            let mut found = false;
            for s in self.services.iter().filter(|s| {
                s.host == host && s.kind == kind && port.is_none_or(|p| s.port == Some(p))
            }) {
                found = true;
                answer.push(s.element(&u.bare, now));
            }
            if !found {
                return Reply::error(
                    StanzaErrorCondition::ItemNotFound,
                    format!("no {kind} service at {host}"),
                );
            }
        }
        if asked == 0 {
            return Reply::error(
                StanzaErrorCondition::BadRequest,
                "name the service: <credentials><service host='..' type='..'/></credentials>",
            );
        }
        debug!(
            count = answer.elements().count(),
            "external service credentials"
        );
        Reply::with(answer)
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::host::IqKind;
    use crate::modules::testing::*;

    const SECRET: &str = "s3cret-for-turn";

    fn settings() -> String {
        format!(
            "<extdisco ttl='3600'>\
               <service type='stun' host='stun.example.org' port='3478' transport='udp'/>\
               <service type='turn' host='turn.example.org' port='3478' transport='udp' \
                 secret='{SECRET}' name='Relay'/>\
               <service type='turns' host='turn.example.org' port='5349' transport='tcp' \
                 secret='{SECRET}' ttl='60'/>\
             </extdisco>"
        )
    }

    const MODULES: &[&str] = &["disco", "extdisco"];

    async fn ask(xml: &str, settings: &str) -> String {
        let ctx = ctx(Some(MODULES), settings);
        let mut u = user(&ctx, "alice@localhost");
        start(&mut u, "phone").await;
        send(&mut u, "phone", xml).await;
        let out = take(&mut u);
        let answer = to(&out, "phone", &["id='q'"]);
        assert_eq!(answer.len(), 1, "{out:?}");
        answer[0].to_owned()
    }

    fn services_of(answer: &str) -> Vec<minidom::Element> {
        let iq: minidom::Element = answer
            .replace("<iq ", "<iq xmlns='jabber:client' ")
            .parse()
            .unwrap();
        let list = iq.children().next().expect("a payload");
        list.children().cloned().collect()
    }

    #[tokio::test]
    async fn services_are_listed_and_filtered_by_type() {
        let all = ask(
            "<iq type='get' id='q' to='localhost'><services xmlns='urn:xmpp:extdisco:2'/></iq>",
            &settings(),
        )
        .await;
        assert!(all.contains("type='result'"), "{all}");
        let services = services_of(&all);
        let kinds: Vec<&str> = services.iter().map(|s| s.attr("type").unwrap()).collect();
        assert_eq!(kinds, ["stun", "turn", "turns"], "{all}");
        // Without a secret: as configured, no credentials.
        let stun = &services[0];
        assert_eq!(stun.attr("host"), Some("stun.example.org"));
        assert_eq!(stun.attr("port"), Some("3478"));
        assert_eq!(stun.attr("transport"), Some("udp"));
        assert!(stun.attr("username").is_none() && stun.attr("restricted").is_none());
        assert_eq!(services[1].attr("name"), Some("Relay"));
        assert!(!all.contains(SECRET), "{all}");

        // Without `to` (the server answers for the account, RFC 6120 10.3.3) and filtered.
        let turn = ask(
            "<iq type='get' id='q'><services xmlns='urn:xmpp:extdisco:2' type='turn'/></iq>",
            &settings(),
        )
        .await;
        assert!(
            turn.contains("<services xmlns='urn:xmpp:extdisco:2' type='turn'>"),
            "{turn}"
        );
        let services = services_of(&turn);
        assert_eq!(services.len(), 1, "{turn}");
        assert_eq!(services[0].attr("host"), Some("turn.example.org"));

        let none = ask(
            "<iq type='get' id='q' to='localhost'><services xmlns='urn:xmpp:extdisco:2' type='ftp'/></iq>",
            &settings(),
        )
        .await;
        assert!(
            none.contains("type='result'") && services_of(&none).is_empty(),
            "{none}"
        );
    }

    /// Recomputes what a TURN server with `static-auth-secret` checks.
    fn verify(service: &minidom::Element, user: &str, ttl: u64) {
        let now = unix_now();
        let username = service.attr("username").expect("a username");
        let (expiry, who) = username.split_once(':').expect("EXPIRY:USER");
        assert_eq!(who, user);
        let expiry: u64 = expiry.parse().unwrap();
        assert!(
            expiry > now && expiry <= now + ttl + 1,
            "{expiry} vs {now} + {ttl}"
        );
        assert_eq!(service.attr("expires"), Some(stamp(expiry).as_str()));
        assert_eq!(service.attr("restricted"), Some("1"));
        let mut mac = Hmac::<Sha1>::new_from_slice(SECRET.as_bytes()).unwrap();
        mac.update(username.as_bytes());
        let expected =
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        assert_eq!(service.attr("password"), Some(expected.as_str()));
    }

    #[tokio::test]
    async fn turn_credentials_verify_with_the_shared_secret() {
        let all = ask(
            "<iq type='get' id='q' to='localhost'><services xmlns='urn:xmpp:extdisco:2'/></iq>",
            &settings(),
        )
        .await;
        let services = services_of(&all);
        verify(&services[1], "alice@localhost", 3600);
        verify(&services[2], "alice@localhost", 60);

        let creds = ask(
            "<iq type='get' id='q' to='localhost'><credentials xmlns='urn:xmpp:extdisco:2'>\
             <service type='turn' host='turn.example.org'/></credentials></iq>",
            &settings(),
        )
        .await;
        assert!(
            creds.contains("<credentials xmlns='urn:xmpp:extdisco:2'>"),
            "{creds}"
        );
        let services = services_of(&creds);
        assert_eq!(services.len(), 1, "{creds}");
        verify(&services[0], "alice@localhost", 3600);

        let missing = ask(
            "<iq type='get' id='q' to='localhost'><credentials xmlns='urn:xmpp:extdisco:2'>\
             <service type='turn' host='other.example.org'/></credentials></iq>",
            &settings(),
        )
        .await;
        assert!(missing.contains("item-not-found"), "{missing}");
        let empty = ask(
            "<iq type='get' id='q' to='localhost'><credentials xmlns='urn:xmpp:extdisco:2'/></iq>",
            &settings(),
        )
        .await;
        assert!(empty.contains("bad-request"), "{empty}");
    }

    #[test]
    fn the_password_is_the_turn_rest_hmac() {
        // RFC 2202 test case 2: HMAC-SHA1("Jefe", "what do ya want for nothing?").
        let hex = "effcdf6ae5eb2fa2d27416d5f184df9c259a7c79";
        let bytes: Vec<u8> = (0..20)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        assert_eq!(
            turn_password(b"Jefe", "what do ya want for nothing?"),
            base64::engine::general_purpose::STANDARD.encode(bytes)
        );
        assert_eq!(format!("{:?}", Secret(b"hidden".to_vec())), "Secret(..)");
    }

    #[tokio::test]
    async fn requests_from_the_network_are_forbidden() {
        let ctx = ctx(Some(MODULES), &settings());
        let mut u = user(&ctx, "localhost");
        let m = ctx
            .modules
            .iq_handler(IqKind::Get, Scope::Server, EXT_DISCO, "services")
            .unwrap()
            .clone();
        let xml = "<iq type='get' id='q' from='eve@example.com/x' to='localhost'>\
                   <services xmlns='urn:xmpp:extdisco:2'/></iq>";
        let stanza = jrs_stream::Stanza::parse(bytes::Bytes::from(xml)).unwrap();
        let iq = Iq {
            stanza,
            kind: IqKind::Get,
            scope: Scope::Server,
            session: None,
            from: jid::Jid::new("eve@example.com/x").ok(),
            payload: "<services xmlns='urn:xmpp:extdisco:2'/>".parse().unwrap(),
        };
        match m.iq(&mut u, &iq).await {
            Reply::Error { condition, .. } => {
                assert_eq!(condition, StanzaErrorCondition::Forbidden)
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn no_feature_and_no_answer_without_services() {
        let info = "<iq type='get' id='q' to='localhost'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>";
        for settings in ["", "<extdisco/>"] {
            let answer = ask(info, settings).await;
            assert!(answer.contains("type='result'"), "{answer}");
            assert!(!answer.contains(EXT_DISCO), "{answer}");
            let services = ask(
                "<iq type='get' id='q' to='localhost'><services xmlns='urn:xmpp:extdisco:2'/></iq>",
                settings,
            )
            .await;
            assert!(services.contains("service-unavailable"), "{services}");
        }
        let answer = ask(info, &settings()).await;
        assert!(answer.contains("var='urn:xmpp:extdisco:2'"), "{answer}");
        // Not an account's feature.
        let own = ask(
            "<iq type='get' id='q' to='alice@localhost'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>",
            &settings(),
        )
        .await;
        assert!(!own.contains(EXT_DISCO), "{own}");
    }

    fn load(settings: &str) -> jrs_config::Result<Arc<dyn Module>> {
        crate::modules::testing::load_with(load_module, settings)
    }

    #[test]
    fn bad_settings_are_refused_clearly_and_never_show_the_secret() {
        let cases = [
            (
                "<extdisco><service host='a.example'/></extdisco>",
                "'type' is required",
            ),
            (
                "<extdisco><service type='turn'/></extdisco>",
                "'host' is required",
            ),
            (
                "<extdisco><service type='turn udp' host='a.example'/></extdisco>",
                "is not a service type",
            ),
            (
                "<extdisco><service type='turn' host='a example' secret='TOPSECRET'/></extdisco>",
                "neither a domain name nor an IP address",
            ),
            (
                "<extdisco><service type='turn' host='a.example' port='70000'/></extdisco>",
                "expected a port number",
            ),
            (
                "<extdisco><service type='turn' host='a.example' transport='sctp'/></extdisco>",
                "expected tcp or udp",
            ),
            (
                "<extdisco><service type='turn' host='a.example' secret='TOPSECRET' \
                 secret-file='/x'/></extdisco>",
                "not both",
            ),
            (
                "<extdisco><service type='turn' host='a.example' secret=' '/></extdisco>",
                "'secret' is empty",
            ),
            (
                "<extdisco><service type='turn' host='a.example' \
                 secret-file='/nonexistent/turn-secret'/></extdisco>",
                "cannot read the secret-file '/nonexistent/turn-secret'",
            ),
            (
                "<extdisco><service type='turn' host='a.example' ttl='60'/></extdisco>",
                "needs 'secret' or 'secret-file'",
            ),
            (
                "<extdisco ttl='0'><service type='turn' host='a.example'/></extdisco>",
                "expected 1 to",
            ),
            (
                "<extdisco><service type='turn' host='a.example' secret='TOPSECRET' \
                 ttl='soon'/></extdisco>",
                "a whole number of seconds",
            ),
            (
                "<extdisco><service type='turn' host='a.example' secret='TOPSECRET' \
                 password='TOPSECRET'/></extdisco>",
                "unknown attribute 'password'",
            ),
            (
                "<extdisco><service type='stun' host='a.example' port='3478'/>\
                 <service type='stun' host='a.example' port='3478'/></extdisco>",
                "listed twice",
            ),
            (
                "<extdisco><server type='stun' host='a.example'/></extdisco>",
                "unknown element",
            ),
        ];
        for text in crate::modules::testing::refused_settings(load_module, &cases) {
            assert!(!text.contains("TOPSECRET"), "{text}");
        }
        assert!(load(&settings()).is_ok());
    }

    #[tokio::test]
    async fn the_secret_can_come_from_a_file() {
        let dir = std::env::temp_dir().join(format!("sm-extdisco-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("turn-secret");
        std::fs::write(&file, format!("{SECRET}\n")).unwrap();
        let settings = format!(
            "<extdisco><service type='turn' host='turn.example.org' secret-file='{}'/></extdisco>",
            file.display()
        );
        let all = ask(
            "<iq type='get' id='q' to='localhost'><services xmlns='urn:xmpp:extdisco:2'/></iq>",
            &settings,
        )
        .await;
        // The file's newline is not part of the secret.
        verify(&services_of(&all)[0], "alice@localhost", DEFAULT_TTL);
        std::fs::write(&file, "\n").unwrap();
        let e = load(&settings).err().unwrap();
        assert!(e.to_string().contains("is empty"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();

        let s = Service {
            kind: "turn".into(),
            host: "turn.example.org".into(),
            port: None,
            transport: None,
            name: None,
            secret: Some(Secret(SECRET.as_bytes().to_vec())),
            ttl: 10,
        };
        let e = s.element("bob@localhost", 1_700_000_000);
        assert_eq!(e.attr("username"), Some("1700000010:bob@localhost"));
        assert_eq!(e.attr("expires"), Some("2023-11-14T22:13:30Z"));
        assert_eq!(
            e.attr("password"),
            Some(turn_password(SECRET.as_bytes(), "1700000010:bob@localhost").as_str())
        );
    }
}
