//! The feature modules: one file (or folder) per feature, each a [`Module`] that says
//! what it handles. `<modules>` in sm.xml picks which run; [`ALL`] is what sm has.
//! docs/sm.md, "Writing a module", shows how to add one.

pub mod blocking;
pub mod carbons;
pub mod disco;
pub mod last;
pub mod mam;
pub mod messages;
pub mod offline;
pub mod ping;
pub mod presence;
pub mod private;
pub mod register;
pub mod roster;
pub mod subscription;
pub mod time;
pub mod vcard;
pub mod version;

use std::sync::Arc;

use crate::config::SmConfig;
use crate::host::{Module, Modules};

/// Makes a module from sm.xml (its settings are the element of its name).
type Load = fn(&SmConfig) -> jrs_config::Result<Arc<dyn Module>>;

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
