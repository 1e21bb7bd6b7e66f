//! Archiving preferences (XEP-0313 section 6): the user's default (`always`, `never`,
//! `roster`) and the JIDs always or never archived. Stored under
//! `urn:xmpp:mam:2#prefs` as the `<prefs xmlns='urn:xmpp:mam:2'>` element itself.

use jid::Jid;
use tracing::warn;
use xmpp_parsers::mam_prefs::{DefaultPrefs, Prefs};

use jrs_xdb::XdbError;

use crate::host::User;
use crate::modules::roster;

pub const NS_PREFS: &str = "urn:xmpp:mam:2#prefs";

/// The user's preferences, once loaded.
pub struct Loaded(pub Prefs);

/// The preferences, from storage on first use (`default` when none are stored).
pub async fn load<'a>(u: &'a mut User, default: &DefaultPrefs) -> Result<&'a Prefs, XdbError> {
    if u.state.get::<Loaded>().is_none() {
        let stored = u.ctx.store.get(&u.bare, NS_PREFS).await?;
        let prefs = parse(&stored).unwrap_or_else(|| Prefs {
            default_: default.clone(),
            always: vec![],
            never: vec![],
        });
        u.state.insert(Loaded(prefs));
    }
    Ok(&u.state.get::<Loaded>().expect("loaded above").0)
}

fn parse(stored: &[u8]) -> Option<Prefs> {
    if stored.iter().all(u8::is_ascii_whitespace) {
        return None;
    }
    let parsed = minidom::Element::from_reader(stored)
        .map_err(|e| e.to_string())
        .and_then(|e| Prefs::try_from(e).map_err(|e| e.to_string()));
    match parsed {
        Ok(p) => Some(p),
        Err(e) => {
            warn!("stored archiving preferences unreadable, defaults used: {e}");
            None
        }
    }
}

/// Replaces the preferences.
pub async fn save(u: &mut User, prefs: Prefs) -> Result<(), XdbError> {
    let xml = String::from(&minidom::Element::from(prefs.clone()));
    u.ctx.store.set(&u.bare, NS_PREFS, xml).await?;
    u.state.insert(Loaded(prefs));
    Ok(())
}

fn listed(list: &[Jid], with: &Jid) -> bool {
    list.iter()
        .any(|j| j == with || (j.resource().is_none() && j.to_bare() == with.to_bare()))
}

/// Whether a message with `with` goes into the archive.
pub async fn archives(u: &mut User, default: &DefaultPrefs, with: &Jid) -> Result<bool, XdbError> {
    let prefs = load(u, default).await?;
    if listed(&prefs.never, with) {
        return Ok(false);
    }
    if listed(&prefs.always, with) {
        return Ok(true);
    }
    Ok(match prefs.default_ {
        DefaultPrefs::Always => true,
        DefaultPrefs::Never => false,
        DefaultPrefs::Roster => {
            let contact = with.to_bare().to_string();
            roster::load(u)
                .await?
                .get(&contact)
                .is_some_and(|i| !i.hidden)
        }
    })
}
