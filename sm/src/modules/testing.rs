//! Driving modules without sockets: a `Ctx` with storage in memory, users with
//! sessions, stanzas in, and what the handlers produced read back from `User::out`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use jid::{BareJid, FullJid, Jid};

use jrs_stream::Stanza;

use crate::config::SmConfig;
use crate::host::out::Output;
use crate::host::registry::Event;
use crate::host::session::SessionRef;
use crate::host::store::{memory::Memory, Store};
use crate::host::task;
use crate::host::{Ctx, SessionKey, User};

/// A context running `modules` (None: the default set) with `settings` (sm.xml elements).
pub fn ctx(modules: Option<&[&str]>, settings: &str) -> Arc<Ctx> {
    let list = modules
        .map(|m| {
            let items: String = m.iter().map(|n| format!("<module name='{n}'/>")).collect();
            format!("<modules>{items}</modules>")
        })
        .unwrap_or_default();
    let xml =
        format!("<sm><router name='sm' secret='s'/><host>localhost</host>{list}{settings}</sm>");
    let root = jrs_config::Node::parse_str(&xml, Arc::new(PathBuf::from("sm.xml"))).unwrap();
    let config = SmConfig::from_node(&root, &super::names(), super::DEFAULT).unwrap();
    let modules = super::load(&config).unwrap();
    let store = Store::Memory(Mutex::new(Memory::default()));
    Arc::new(Ctx::new(config, "sm".into(), store, modules))
}

/// The settings of one module read by its `load` from an sm.xml holding `settings` on
/// its second line: the module, or the configuration error.
pub fn load_with(
    load: super::Load,
    settings: &str,
) -> jrs_config::Result<Arc<dyn crate::host::Module>> {
    let xml = format!("<sm><router name='sm' secret='s'/><host>localhost</host>\n{settings}</sm>");
    let root = jrs_config::Node::parse_str(&xml, Arc::new(PathBuf::from("sm.xml")))?;
    let config = SmConfig::from_node(&root, &super::names(), super::DEFAULT)?;
    load(&config)
}

/// Each of `cases` (settings, part of the expected message) is refused by `load` with a
/// `sm.xml:2: <element>: ...` error naming the problem; the returned texts for more checks.
pub fn refused_settings(load: super::Load, cases: &[(&str, &str)]) -> Vec<String> {
    cases
        .iter()
        .map(|(settings, expected)| {
            let e = load_with(load, settings)
                .err()
                .unwrap_or_else(|| panic!("accepted: {settings}"));
            let text = e.to_string();
            assert!(text.starts_with("sm.xml:2: <"), "{settings}: {text}");
            assert!(text.contains(expected), "{settings}: {text}");
            text
        })
        .collect()
}

/// A user whose account exists.
pub fn user(ctx: &Arc<Ctx>, bare: &str) -> User {
    ctx.accounts.remember(bare, true);
    User::new(ctx.clone(), BareJid::new(bare).unwrap())
}

pub fn reference(u: &User, resource: &str) -> SessionRef {
    SessionRef {
        c2s: "c2s".into(),
        sid: resource.into(),
        jid: FullJid::new(&format!("{}/{resource}", u.bare)).unwrap(),
    }
}

/// Starts session `resource` (through the session protocol and the modules' hooks).
pub async fn start(u: &mut User, resource: &str) -> SessionKey {
    let r = reference(u, resource);
    task::handle(u, Event::Start(r.clone())).await;
    u.find(&r).expect("started")
}

/// What the client of session `resource` sends.
pub async fn send(u: &mut User, resource: &str, xml: &str) {
    let r = reference(u, resource);
    let stanza = Stanza::parse(Bytes::from(xml.to_owned())).unwrap();
    task::handle(u, Event::Stanza(r, stanza)).await;
}

/// Starts session `resource` and sends initial presence with `priority`.
pub async fn online(u: &mut User, resource: &str, priority: i32) -> SessionKey {
    let key = start(u, resource).await;
    send(
        u,
        resource,
        &format!("<presence><priority>{priority}</priority></presence>"),
    )
    .await;
    key
}

/// A stanza from the network to the user.
pub async fn inbound(u: &mut User, xml: &str) {
    let stanza = Stanza::parse(Bytes::from(xml.to_owned())).unwrap();
    let to = stanza.attr("to").map(|t| Jid::new(&t).unwrap());
    let from = stanza.attr("from").and_then(|f| Jid::new(&f).ok());
    task::inbound(u, crate::host::Packet::new(stanza, to, from)).await;
}

/// What the handlers produced since the last call: (resource or "", stanza text), the
/// empty resource for what goes to the router.
pub fn take(u: &mut User) -> Vec<(String, String)> {
    u.out
        .take()
        .into_iter()
        .map(|o| match o {
            Output::Deliver { to, stanza, .. } => (
                to.jid.resource().as_str().to_owned(),
                String::from_utf8_lossy(&stanza).into_owned(),
            ),
            Output::Route(b) => (String::new(), String::from_utf8_lossy(&b).into_owned()),
            Output::RouteStanza(s) => (
                String::new(),
                String::from_utf8_lossy(s.bytes()).into_owned(),
            ),
        })
        .collect()
}

/// The stanzas for session `resource` among `out` that contain every one of `parts`.
pub fn to<'a>(out: &'a [(String, String)], resource: &str, parts: &[&str]) -> Vec<&'a str> {
    out.iter()
        .filter(|(r, s)| r == resource && parts.iter().all(|p| s.contains(p)))
        .map(|(_, s)| s.as_str())
        .collect()
}
