//! Service discovery (XEP-0030) of the server and of accounts, built from the loaded
//! modules: a feature is listed exactly when the module that answers it runs. The
//! server's items are the components connected to the router under the served domain
//! (`conference.D`, `upload.D`, a gateway), kept current as they connect and go, plus
//! `<disco><item/></disco>` from sm.xml, minus `<hide/>`.

use std::sync::Arc;

use jid::Jid;
use xmpp_parsers::disco::{
    DiscoInfoQuery, DiscoInfoResult, DiscoItemsQuery, DiscoItemsResult, Identity as DiscoIdentity,
    Item,
};
use xmpp_parsers::ns::{DISCO_INFO, DISCO_ITEMS};

use jrs_stream::StanzaErrorCondition;

use crate::config::SmConfig;
use crate::host::{Declaration, Disco, Identity, Iq, IqKind, Module, Reply, Scope, User};

pub struct DiscoModule {
    /// Items sm.xml adds to every served domain's list: (jid, name).
    extra: Vec<(Jid, Option<String>)>,
    /// JIDs sm.xml keeps out of the list.
    hidden: Vec<Jid>,
}

pub fn load_module(config: &SmConfig) -> jrs_config::Result<Arc<dyn Module>> {
    let mut m = DiscoModule {
        extra: vec![],
        hidden: vec![],
    };
    if let Some(n) = config.module_settings("disco")? {
        n.allow(&[], &["item", "hide"])?;
        for item in n.children("item") {
            item.allow(&["jid", "name"], &[])?;
            let jid = item.required_attr("jid")?;
            let jid =
                Jid::new(jid).map_err(|e| item.error(format!("'{jid}' is not a JID: {e}")))?;
            m.extra.push((jid, item.attr("name").map(str::to_owned)));
        }
        for hide in n.children("hide") {
            hide.allow(&["jid"], &[])?;
            let jid = hide.required_attr("jid")?;
            m.hidden
                .push(Jid::new(jid).map_err(|e| hide.error(format!("'{jid}' is not a JID: {e}")))?);
        }
    }
    Ok(Arc::new(m))
}

const ALL: &[Scope] = &[Scope::Server, Scope::Own, Scope::Contact];

#[async_trait::async_trait]
impl Module for DiscoModule {
    fn name(&self) -> &'static str {
        "disco"
    }

    fn declare(&self) -> Declaration {
        Declaration::default()
            .iq(IqKind::Get, ALL, DISCO_INFO, "query")
            .iq(IqKind::Get, ALL, DISCO_ITEMS, "query")
            .feature(Disco::Server, DISCO_INFO)
            .feature(Disco::Server, DISCO_ITEMS)
            .feature(Disco::Account, DISCO_INFO)
            .feature(Disco::Account, DISCO_ITEMS)
            .identity(
                Disco::Server,
                Identity {
                    category: "server",
                    kind: "im",
                    name: Some("jabberd-rs"),
                },
            )
            .identity(
                Disco::Account,
                Identity {
                    category: "account",
                    kind: "registered",
                    name: None,
                },
            )
    }

    async fn iq(&self, u: &mut User, iq: &Iq) -> Reply {
        let at = if iq.scope == Scope::Server {
            Disco::Server
        } else {
            Disco::Account
        };
        if iq.payload.name() == "query" && iq.payload.ns() == DISCO_INFO {
            let q: DiscoInfoQuery = match iq.parse() {
                Ok(q) => q,
                Err(r) => return r,
            };
            if q.node.is_some() {
                return Reply::error(StanzaErrorCondition::ItemNotFound, "no such node");
            }
            return Reply::typed(info(u, at));
        }
        let q: DiscoItemsQuery = match iq.parse() {
            Ok(q) => q,
            Err(r) => return r,
        };
        if q.node.is_some() {
            return Reply::error(StanzaErrorCondition::ItemNotFound, "no such node");
        }
        let items = match at {
            Disco::Server => self.server_items(u),
            Disco::Account => vec![],
        };
        Reply::typed(DiscoItemsResult {
            node: None,
            items,
            rsm: None,
        })
    }
}

fn info(u: &User, at: Disco) -> DiscoInfoResult {
    let modules = &u.ctx.modules;
    DiscoInfoResult {
        node: None,
        identities: modules
            .identities(at)
            .map(|i| DiscoIdentity {
                category: i.category.into(),
                type_: i.kind.into(),
                lang: None,
                name: i.name.map(str::to_owned),
            })
            .collect(),
        features: modules.features(at).map(str::to_owned).collect(),
        extensions: vec![],
    }
}

impl DiscoModule {
    fn server_items(&self, u: &User) -> Vec<Item> {
        let domain = u.jid.domain().as_str();
        let mut items: Vec<Item> = u
            .ctx
            .components
            .subdomains_of(domain)
            .into_iter()
            .filter(|d| !u.ctx.config.serves(d))
            .filter_map(|d| Jid::new(&d).ok())
            .map(|jid| Item {
                jid,
                node: None,
                name: None,
            })
            .collect();
        for (jid, name) in &self.extra {
            if !items.iter().any(|i| &i.jid == jid) {
                items.push(Item {
                    jid: jid.clone(),
                    node: None,
                    name: name.clone(),
                });
            }
        }
        items.retain(|i| !self.hidden.contains(&i.jid));
        items
    }
}
