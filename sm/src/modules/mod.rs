//! The feature modules: one file (or folder) per feature, each a [`Module`] that says
//! what it handles. `<modules>` in sm.xml picks which run; [`ALL`] is what sm has.
//! docs/sm.md, "Writing a module", shows how to add one.

pub mod avatars;
pub mod blocking;
pub mod bookmarks;
pub mod caps;
pub mod carbons;
pub mod disco;
pub mod extdisco;
pub mod last;
pub mod mam;
pub mod messages;
pub mod offline;
pub mod pep;
pub mod ping;
pub mod presence;
pub mod private;
pub mod push;
pub mod register;
pub mod roster;
pub mod subscription;
pub mod time;
pub mod vcard;
pub mod version;

#[cfg(test)]
pub mod testing;

use std::sync::Arc;

use crate::config::SmConfig;
use crate::host::{Module, Modules};

/// Makes a module from sm.xml (its settings are the element of its name).
pub type Load = fn(&SmConfig) -> jrs_config::Result<Arc<dyn Module>>;

/// Every module sm has, by the name sm.xml uses.
pub const ALL: &[(&str, Load)] = &[
    ("roster", roster::load_module),
    ("presence", presence::load_module),
    ("subscription", subscription::load_module),
    ("messages", messages::load_module),
    ("offline", offline::load_module),
    ("carbons", carbons::load_module),
    ("blocking", blocking::load_module),
    ("mam", mam::load_module),
    ("disco", disco::load_module),
    ("extdisco", extdisco::load_module),
    ("caps", caps::load_module),
    ("pep", pep::load_module),
    ("bookmarks", bookmarks::load_module),
    ("avatars", avatars::load_module),
    ("push", push::load_module),
    ("ping", ping::load_module),
    ("version", version::load_module),
    ("time", time::load_module),
    ("last", last::load_module),
    ("vcard", vcard::load_module),
    ("private", private::load_module),
    ("register", register::load_module),
];

/// What runs without a `<modules>` element: everything but `register` (password change
/// and account removal by the user are the operator's choice).
pub const DEFAULT: &[&str] = &[
    "roster",
    "presence",
    "subscription",
    "messages",
    "offline",
    "carbons",
    "blocking",
    "mam",
    "disco",
    "extdisco",
    "caps",
    "pep",
    "bookmarks",
    "avatars",
    "push",
    "ping",
    "version",
    "time",
    "last",
    "vcard",
    "private",
];

pub fn names() -> Vec<&'static str> {
    ALL.iter().map(|(n, _)| *n).collect()
}

/// Loads the modules sm.xml lists, in its order.
pub fn load(config: &SmConfig) -> anyhow::Result<Modules> {
    let mut list = vec![];
    for name in &config.modules {
        let (_, load) = ALL
            .iter()
            .find(|(n, _)| n == name)
            .expect("config checked the names");
        list.push(load(config)?);
    }
    Modules::new(list).map_err(|e| anyhow::anyhow!("{}: {e}", config.root.file().display()))
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use crate::host::{Hook, Stanzas};

    #[test]
    fn modules_need_what_they_use() {
        let root = jrs_config::Node::parse_str(
            "<sm><router name='sm' secret='s'/><host>localhost</host><modules><module name='presence'/></modules></sm>",
            std::sync::Arc::new("sm.xml".into()),
        )
        .unwrap();
        let config =
            crate::config::SmConfig::from_node(&root, &super::names(), super::DEFAULT).unwrap();
        let e = super::load(&config).err().unwrap().to_string();
        assert!(e.contains("module 'presence' needs module 'roster'"), "{e}");
    }

    #[test]
    fn chains_run_by_priority() {
        let ctx = ctx(None, "");
        let names = |c: &[std::sync::Arc<dyn crate::host::Module>]| -> Vec<&'static str> {
            c.iter().map(|m| m.name()).collect()
        };
        let stanzas = |h, k| names(ctx.modules.stanza_chain(h, k));
        assert_eq!(
            stanzas(Hook::Outbound, Stanzas::Message),
            ["blocking", "carbons", "mam", "messages"]
        );
        assert_eq!(
            stanzas(Hook::Inbound, Stanzas::Message),
            ["blocking", "mam", "pep", "carbons", "push", "messages"]
        );
        assert_eq!(
            stanzas(Hook::Outbound, Stanzas::Presence),
            [
                "blocking",
                "avatars",
                "bookmarks",
                "pep",
                "subscription",
                "presence"
            ]
        );
        assert_eq!(
            stanzas(Hook::Outbound, Stanzas::Iq),
            ["blocking", "bookmarks"]
        );
        assert_eq!(stanzas(Hook::Inbound, Stanzas::Iq), ["blocking", "push"]);
        assert_eq!(
            names(ctx.modules.chain(Hook::InitialPresence)),
            ["subscription", "offline"]
        );
        assert_eq!(
            names(ctx.modules.chain(Hook::SessionEnded)),
            ["presence", "offline", "push", "last"]
        );
        assert_eq!(
            names(ctx.modules.chain(Hook::SessionStarted)),
            ["mam", "push"]
        );
        assert_eq!(
            names(ctx.modules.chain(Hook::Stored)),
            ["bookmarks", "avatars"]
        );
    }

    #[tokio::test]
    async fn a_module_left_out_is_not_advertised_and_not_answered() {
        let all = ctx(None, "");
        let without: Vec<&str> = super::DEFAULT
            .iter()
            .copied()
            .filter(|m| *m != "carbons")
            .collect();
        let some = ctx(Some(&without), "");
        for (ctx, loaded) in [(all, true), (some, false)] {
            let mut u = user(&ctx, "alice@localhost");
            start(&mut u, "phone").await;
            send(&mut u, "phone", "<iq type='get' id='d' to='localhost'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>").await;
            send(
                &mut u,
                "phone",
                "<iq type='set' id='c'><enable xmlns='urn:xmpp:carbons:2'/></iq>",
            )
            .await;
            let out = take(&mut u);
            let info = to(&out, "phone", &["id='d'"]);
            assert_eq!(info[0].contains("urn:xmpp:carbons:2"), loaded, "{info:?}");
            let answer = to(&out, "phone", &["id='c'"]);
            assert_eq!(answer[0].contains("type='result'"), loaded, "{answer:?}");
            assert_eq!(
                answer[0].contains("service-unavailable"),
                !loaded,
                "{answer:?}"
            );
        }
    }

    #[tokio::test]
    async fn disco_items_list_the_connected_components() {
        let ctx = ctx(None, "<disco><item jid='rooms.example.org' name='Rooms'/><hide jid='secret.localhost'/></disco>");
        ctx.components
            .bound("conference.localhost", "conference.localhost");
        ctx.components.bound("secret.localhost", "secret.localhost");
        ctx.components.bound("s2s", "*");
        let mut u = user(&ctx, "alice@localhost");
        start(&mut u, "phone").await;
        let items = "<iq type='get' id='i' to='localhost'><query xmlns='http://jabber.org/protocol/disco#items'/></iq>";
        send(&mut u, "phone", items).await;
        let out = take(&mut u);
        let r = to(&out, "phone", &["id='i'"])[0];
        assert!(
            r.contains("conference.localhost") && r.contains("rooms.example.org"),
            "{r}"
        );
        assert!(!r.contains("secret.localhost") && !r.contains("s2s"), "{r}");
        ctx.components.disconnected("conference.localhost");
        send(&mut u, "phone", items).await;
        assert!(!take(&mut u)[0].1.contains("conference.localhost"));
    }
}
