//! Service discovery (XEP-0030) of the server and of accounts, built from the loaded
//! modules: a feature is listed exactly when the module that answers it runs. The
//! server's items are the components connected to the router under the served domain
//! (`conference.D`, `upload.D`, a gateway), kept current as they connect and go, plus
//! `<disco><item/></disco>` from sm.xml, minus `<hide/>`.
//!
//! The server's disco#info also carries the data forms of sm.xml (XEP-0128): contact
//! addresses (`<contact type='admin-addresses'>xmpp:admin@example.org</contact>`, the
//! XEP-0157 form `http://jabber.org/network/serverinfo`) and any other form
//! (`<form type='urn:..'><field var='x'>value</field></form>`); accounts' do not. A
//! disco#info of the server's own entity capabilities node (`CAPS_NODE#VER`, XEP-0115)
//! is answered like one without a node.

use std::sync::Arc;

use jid::Jid;
use xmpp_parsers::data_forms::{DataForm, DataFormType, Field, FieldType};
use xmpp_parsers::disco::{
    DiscoInfoQuery, DiscoInfoResult, DiscoItemsQuery, DiscoItemsResult, Identity as DiscoIdentity,
    Item,
};
use xmpp_parsers::ns::{DISCO_INFO, DISCO_ITEMS, SERVER_INFO};

use jrs_config::Node;
use jrs_stream::StanzaErrorCondition;

use crate::config::SmConfig;
use crate::host::{Ctx, Declaration, Disco, Identity, Iq, IqKind, Module, Reply, Scope, User};

/// The node of the server's entity capabilities (XEP-0115): a disco#info for
/// `CAPS_NODE#VER` is answered like one without a node, the node echoed.
pub const CAPS_NODE: &str = jrs_sx::caps::NODE;

/// The fields of the XEP-0157 form (FORM_TYPE `http://jabber.org/network/serverinfo`),
/// each a list of URIs (`mailto:`, `xmpp:`, `https:`, ...).
pub const CONTACT_FIELDS: [&str; 7] = [
    "abuse-addresses",
    "admin-addresses",
    "feedback-addresses",
    "sales-addresses",
    "security-addresses",
    "status-addresses",
    "support-addresses",
];

pub struct DiscoModule {
    /// Items sm.xml adds to every served domain's list: (jid, name).
    extra: Vec<(Jid, Option<String>)>,
    /// JIDs sm.xml keeps out of the list.
    hidden: Vec<Jid>,
    /// The server's extended information (XEP-0128): data forms from sm.xml.
    forms: Vec<DataForm>,
}

pub fn load_module(config: &SmConfig) -> jrs_config::Result<Arc<dyn Module>> {
    let mut m = DiscoModule {
        extra: vec![],
        hidden: vec![],
        forms: vec![],
    };
    if let Some(n) = config.module_settings("disco")? {
        n.allow(&[], &["item", "hide", "contact", "form"])?;
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
        m.forms = forms_from(n)?;
    }
    Ok(Arc::new(m))
}

/// The data forms of `<disco>`: `<contact>`s make the XEP-0157 form, each `<form>` one
/// more (a `<form>` with the XEP-0157 FORM_TYPE adds fields to that form).
fn forms_from(n: &Node) -> jrs_config::Result<Vec<DataForm>> {
    let mut forms: Vec<DataForm> = vec![];
    for c in n.children("contact") {
        c.allow(&["type"], &[])?;
        let kind = c.required_attr("type")?.trim();
        if !CONTACT_FIELDS.contains(&kind) {
            return Err(c.error(format!(
                "type '{kind}' is not an XEP-0157 address type (one of {}); other fields go \
                 in <form type='{SERVER_INFO}'><field var='..'>..</field></form>",
                CONTACT_FIELDS.join(", ")
            )));
        }
        let uri = c.text.trim();
        if !is_uri(uri) {
            return Err(c.error(format!(
                "'{uri}' is not an address URI: write it as mailto:.., xmpp:.., https:.., tel:.."
            )));
        }
        let form = form_of(&mut forms, SERVER_INFO);
        match form
            .fields
            .iter_mut()
            .find(|f| f.var.as_deref() == Some(kind))
        {
            Some(f) => f.values.push(uri.to_owned()),
            None => form
                .fields
                .push(Field::new(kind, FieldType::ListMulti).with_value(uri)),
        }
    }
    let mut seen: Vec<&str> = vec![];
    for f in n.children("form") {
        f.allow(&["type"], &["field"])?;
        let form_type = f.required_attr("type")?.trim();
        if seen.contains(&form_type) {
            return Err(f.error(format!(
                "a second <form type='{form_type}'>: XEP-0128 allows one form per type; \
                 put all its fields in one"
            )));
        }
        seen.push(form_type);
        if f.children("field").next().is_none() {
            return Err(f.error("a form needs at least one <field var='..'>"));
        }
        let contacts = form_type == SERVER_INFO;
        let form = form_of(&mut forms, form_type);
        for field in f.children("field") {
            form.fields.push(field_from(field, contacts, &form.fields)?);
        }
    }
    Ok(forms)
}

/// The form of type `form_type` in `forms`, added if there is none.
fn form_of<'a>(forms: &'a mut Vec<DataForm>, form_type: &str) -> &'a mut DataForm {
    let at = match forms.iter().position(|f| f.form_type() == Some(form_type)) {
        Some(at) => at,
        None => {
            forms.push(DataForm::new(DataFormType::Result_, form_type, vec![]));
            forms.len() - 1
        }
    };
    &mut forms[at]
}

/// `<field var='x' [type='..']>value</field>`, or with several `<value>`s.
fn field_from(n: &Node, contacts: bool, others: &[Field]) -> jrs_config::Result<Field> {
    n.allow(&["var", "type"], &["value"])?;
    let var = n.required_attr("var")?.trim();
    if var == "FORM_TYPE" {
        return Err(n.error("FORM_TYPE is the 'type' of the <form>, not a field"));
    }
    if others.iter().any(|f| f.var.as_deref() == Some(var)) {
        return Err(n.error(format!(
            "field '{var}' is set twice in this form (give one field several <value>s)"
        )));
    }
    let mut values: Vec<String> = vec![];
    for v in n.children("value") {
        v.allow(&[], &[])?;
        values.push(v.text.clone());
    }
    if !n.text.is_empty() {
        if !values.is_empty() {
            return Err(n.error("give the value as text or as <value>s, not both"));
        }
        values.push(n.text.clone());
    }
    let kind = match n.attr("type").map(str::trim) {
        Some(t) => t.parse::<FieldType>().map_err(|_| {
            n.error(format!(
                "attribute 'type' = '{t}': expected a XEP-0004 field type (text-single, \
                 text-multi, list-single, list-multi, jid-single, jid-multi, boolean, fixed, \
                 hidden, text-private)"
            ))
        })?,
        // XEP-0157 registers its fields as list-multi.
        None if contacts || values.len() > 1 => FieldType::ListMulti,
        None => FieldType::TextSingle,
    };
    let single = matches!(
        kind,
        FieldType::TextSingle
            | FieldType::TextPrivate
            | FieldType::ListSingle
            | FieldType::JidSingle
            | FieldType::Boolean
            | FieldType::Hidden
    );
    if single && values.len() > 1 {
        let kind = n.attr("type").unwrap_or("").trim();
        return Err(n.error(format!("a {kind} field takes one value")));
    }
    let mut field = Field::new(var, kind);
    field.values = values;
    Ok(field)
}

/// `scheme:rest` (RFC 3986 3.1): what XEP-0157 addresses are.
fn is_uri(s: &str) -> bool {
    let Some((scheme, rest)) = s.split_once(':') else {
        return false;
    };
    let mut chars = scheme.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        && !rest.is_empty()
        && !s.chars().any(char::is_whitespace)
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
            let Some(node) = q.node else {
                return Reply::typed(info(&u.ctx, at, &self.forms));
            };
            // XEP-0115 5.4: the server's own capabilities node, `CAPS_NODE#VER`; XEP-0390
            // 5: `urn:xmpp:caps#ALGO.HASH`.
            let caps = [CAPS_NODE, jrs_sx::caps::NS_ECAPS2].iter().any(|n| {
                node.strip_prefix(n)
                    .is_some_and(|rest| rest.starts_with('#'))
            });
            if at == Disco::Server && caps {
                let mut answer = info(&u.ctx, at, &self.forms);
                answer.node = Some(node);
                return Reply::typed(answer);
            }
            return Reply::error(StanzaErrorCondition::ItemNotFound, "no such node");
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

/// Identities and features of the loaded modules at `at`; `forms` only on the server.
fn info(ctx: &Ctx, at: Disco, forms: &[DataForm]) -> DiscoInfoResult {
    let modules = &ctx.modules;
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
        extensions: match at {
            Disco::Server => forms.to_vec(),
            Disco::Account => vec![],
        },
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

#[cfg(test)]
mod tests {

    use super::*;
    use crate::modules::testing::*;

    const SETTINGS: &str = "<disco>\
        <contact type='admin-addresses'>xmpp:admin@localhost</contact>\
        <contact type='abuse-addresses'>mailto:abuse@example.org</contact>\
        <contact type='admin-addresses'>mailto:admin@example.org</contact>\
        <form type='urn:example:server'>\
          <field var='rules'>https://example.org/rules</field>\
          <field var='langs'><value>en</value><value>de</value></field>\
        </form>\
        <form type='http://jabber.org/network/serverinfo'>\
          <field var='onion-addresses'>http://example.onion/</field>\
        </form>\
        </disco>";

    /// The answer to disco#info `to` (None: no `to`) with `node`, from alice's session.
    async fn ask(settings: &str, to: Option<&str>, node: Option<&str>) -> String {
        let ctx = ctx(Some(&["disco", "ping"]), settings);
        let mut u = user(&ctx, "alice@localhost");
        start(&mut u, "phone").await;
        let to = to.map(|t| format!(" to='{t}'")).unwrap_or_default();
        let node = node.map(|n| format!(" node='{n}'")).unwrap_or_default();
        let xml = format!("<iq type='get' id='q'{to}><query xmlns='{DISCO_INFO}'{node}/></iq>");
        send(&mut u, "phone", &xml).await;
        to_session(&take(&mut u))
    }

    fn to_session(out: &[(String, String)]) -> String {
        let answer = to(out, "phone", &["id='q'"]);
        assert_eq!(answer.len(), 1, "{out:?}");
        answer[0].to_owned()
    }

    fn parse_info(answer: &str) -> DiscoInfoResult {
        let iq: minidom::Element = answer
            .replacen("<iq ", "<iq xmlns='jabber:client' ", 1)
            .parse()
            .unwrap();
        DiscoInfoResult::try_from(iq.children().next().unwrap().clone()).unwrap()
    }

    fn values<'a>(form: &'a DataForm, var: &str) -> (&'a FieldType, Vec<&'a str>) {
        let f = form
            .fields
            .iter()
            .find(|f| f.var.as_deref() == Some(var))
            .unwrap_or_else(|| panic!("no field {var}"));
        (&f.type_, f.values.iter().map(String::as_str).collect())
    }

    #[tokio::test]
    async fn contact_addresses_and_forms_are_on_the_server_only() {
        let answer = ask(SETTINGS, Some("localhost"), None).await;
        let info = parse_info(&answer);
        assert_eq!(info.extensions.len(), 2, "{answer}");
        let contacts = &info.extensions[0];
        assert_eq!(contacts.form_type(), Some(SERVER_INFO));
        assert_eq!(
            values(contacts, "admin-addresses"),
            (
                &FieldType::ListMulti,
                vec!["xmpp:admin@localhost", "mailto:admin@example.org"]
            )
        );
        assert_eq!(
            values(contacts, "abuse-addresses").1,
            ["mailto:abuse@example.org"]
        );
        assert_eq!(
            values(contacts, "onion-addresses"),
            (&FieldType::ListMulti, vec!["http://example.onion/"])
        );
        let other = &info.extensions[1];
        assert_eq!(other.form_type(), Some("urn:example:server"));
        assert_eq!(
            values(other, "rules"),
            (&FieldType::TextSingle, vec!["https://example.org/rules"])
        );
        assert_eq!(values(other, "langs").1, ["en", "de"]);
        // The identities and features are still there.
        assert!(
            info.features.iter().any(|f| f == "urn:xmpp:ping"),
            "{answer}"
        );
        assert_eq!(info.identities[0].category, "server");

        // Accounts: the user's own (no `to` and the bare JID) and from the network.
        for to in [None, Some("alice@localhost")] {
            let answer = ask(SETTINGS, to, None).await;
            let info = parse_info(&answer);
            assert!(info.extensions.is_empty(), "{answer}");
            assert!(!answer.contains("jabber:x:data"), "{answer}");
        }
        let ctx = ctx(Some(&["disco", "ping"]), SETTINGS);
        let mut u = user(&ctx, "alice@localhost");
        inbound(
            &mut u,
            &format!(
                "<iq type='get' id='q' from='bob@example.com/x' to='alice@localhost'>\
                 <query xmlns='{DISCO_INFO}'/></iq>"
            ),
        )
        .await;
        let out = take(&mut u);
        let answer = &to(&out, "", &["id='q'"])[0];
        assert!(
            answer.contains("type='result'") && !answer.contains("jabber:x:data"),
            "{answer}"
        );
        // Without settings: no form.
        let answer = ask("", Some("localhost"), None).await;
        assert!(parse_info(&answer).extensions.is_empty(), "{answer}");
    }

    #[tokio::test]
    async fn the_caps_node_is_answered_like_no_node() {
        let plain = parse_info(&ask(SETTINGS, Some("localhost"), None).await);
        let node = format!("{CAPS_NODE}#Xy1+abc=");
        let answer = ask(SETTINGS, Some("localhost"), Some(&node)).await;
        assert!(answer.contains("type='result'"), "{answer}");
        let caps = parse_info(&answer);
        assert_eq!(caps.node.as_deref(), Some(node.as_str()));
        assert_eq!(caps.features, plain.features);
        assert_eq!(caps.identities, plain.identities);
        assert_eq!(caps.extensions, plain.extensions);
        for (to, node) in [
            (Some("localhost"), "urn:example:other#abc".to_owned()),
            (Some("localhost"), CAPS_NODE.to_owned()),
            (Some("localhost"), format!("{CAPS_NODE}x#abc")),
            (Some("alice@localhost"), node.clone()),
            (None, node.clone()),
        ] {
            let answer = ask(SETTINGS, to, Some(&node)).await;
            assert!(answer.contains("item-not-found"), "{to:?} {node}: {answer}");
        }
    }

    fn load(settings: &str) -> jrs_config::Result<Arc<dyn Module>> {
        crate::modules::testing::load_with(load_module, settings)
    }

    #[test]
    fn bad_forms_are_refused_clearly() {
        let cases = [
            ("<disco><contact>xmpp:a@b</contact></disco>", "'type' is required"),
            (
                "<disco><contact type='admin'>xmpp:a@b</contact></disco>",
                "type 'admin' is not an XEP-0157 address type (one of abuse-addresses,",
            ),
            (
                "<disco><contact type='admin-addresses'>admin@localhost</contact></disco>",
                "'admin@localhost' is not an address URI",
            ),
            (
                "<disco><contact type='admin-addresses'/></disco>",
                "is not an address URI",
            ),
            ("<disco><form><field var='x'>1</field></form></disco>", "'type' is required"),
            ("<disco><form type='urn:x'/></disco>", "at least one <field"),
            (
                "<disco><form type='urn:x'><field>1</field></form></disco>",
                "'var' is required",
            ),
            (
                "<disco><form type='urn:x'><field var='FORM_TYPE'>urn:y</field></form></disco>",
                "FORM_TYPE is the 'type' of the <form>",
            ),
            (
                "<disco><form type='urn:x'><field var='a'>1</field><field var='a'>2</field></form></disco>",
                "field 'a' is set twice",
            ),
            (
                "<disco><contact type='admin-addresses'>xmpp:a@b</contact>\
                 <form type='http://jabber.org/network/serverinfo'>\
                 <field var='admin-addresses'>xmpp:c@d</field></form></disco>",
                "field 'admin-addresses' is set twice",
            ),
            (
                "<disco><form type='urn:x'><field var='a'/></form>\
                 <form type='urn:x'><field var='b'/></form></disco>",
                "a second <form type='urn:x'>",
            ),
            (
                "<disco><form type='urn:x'><field var='a' type='text'>1</field></form></disco>",
                "expected a XEP-0004 field type",
            ),
            (
                "<disco><form type='urn:x'><field var='a' type='text-single'>\
                 <value>1</value><value>2</value></field></form></disco>",
                "a text-single field takes one value",
            ),
            (
                "<disco><form type='urn:x'><field var='a'>1<value>2</value></field></form></disco>",
                "as text or as <value>s, not both",
            ),
            (
                "<disco><form type='urn:x'><item var='a'/></form></disco>",
                "unknown element inside <form>",
            ),
        ];
        crate::modules::testing::refused_settings(load_module, &cases);
        assert!(load(SETTINGS).is_ok());
    }
}
