//! A PEP node's configuration (XEP-0060 16.4 `pubsub#node_config`, the subset PEP
//! needs): the form an owner reads and submits, the `publish-options` preconditions of
//! XEP-0223, and how it is kept in the user's index of nodes.

use xmpp_parsers::data_forms::{DataForm, DataFormType, Field, FieldType, Option_};

use crate::xml::Element;

pub const NODE_CONFIG: &str = "http://jabber.org/protocol/pubsub#node_config";

/// Who may read a node (XEP-0060 4.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone.
    Open,
    /// Contacts subscribed to the owner's presence (the PEP default).
    Presence,
    /// Contacts in the roster groups of `roster_groups_allowed`.
    Roster,
    /// The owner only.
    Whitelist,
}

impl Access {
    pub fn name(self) -> &'static str {
        match self {
            Access::Open => "open",
            Access::Presence => "presence",
            Access::Roster => "roster",
            Access::Whitelist => "whitelist",
        }
    }

    pub fn parse(s: &str) -> Option<Access> {
        Some(match s {
            "open" => Access::Open,
            "presence" => Access::Presence,
            "roster" => Access::Roster,
            "whitelist" => Access::Whitelist,
            _ => return None,
        })
    }
}

/// When the last item goes to a subscriber without being published anew.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendLast {
    Never,
    /// To a new subscriber.
    OnSub,
    /// To a new subscriber and to each contact resource that becomes available.
    OnSubAndPresence,
}

impl SendLast {
    pub fn name(self) -> &'static str {
        match self {
            SendLast::Never => "never",
            SendLast::OnSub => "on_sub",
            SendLast::OnSubAndPresence => "on_sub_and_presence",
        }
    }

    pub fn parse(s: &str) -> Option<SendLast> {
        Some(match s {
            "never" => SendLast::Never,
            "on_sub" => SendLast::OnSub,
            "on_sub_and_presence" => SendLast::OnSubAndPresence,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub access: Access,
    /// Items kept; `None`: `max`, the service's limit whatever it is now (so a node
    /// created with `max` still meets a `max` precondition after the limit changed).
    pub max_items: Option<usize>,
    /// Items kept in storage; when false only the last one is kept (for
    /// `send_last_published_item`).
    pub persist: bool,
    pub notify_retract: bool,
    pub send_last: SendLast,
    /// For [`Access::Roster`].
    pub groups: Vec<String>,
    pub title: Option<String>,
}

impl Default for Config {
    /// The PEP defaults (XEP-0163 4.1.2 and 8.2): presence access, one item.
    fn default() -> Config {
        Config {
            access: Access::Presence,
            max_items: Some(1),
            persist: true,
            notify_retract: true,
            send_last: SendLast::OnSubAndPresence,
            groups: vec![],
            title: None,
        }
    }
}

/// The fields of a submitted form: (var, values), FORM_TYPE left out.
pub type Submitted = Vec<(String, Vec<String>)>;

/// The fields of a `jabber:x:data` form of type submit (or the `<x/>` of a
/// publish-options); `Err` names what is wrong.
pub fn submitted(x: &minidom::Element) -> Result<Submitted, String> {
    let form = DataForm::try_from(x.clone()).map_err(|e| format!("unreadable form: {e}"))?;
    if !matches!(form.type_, DataFormType::Submit | DataFormType::Form) {
        return Err("the form is not of type submit".into());
    }
    Ok(form
        .fields
        .into_iter()
        .filter_map(|f| Some((f.var?, f.values)))
        .filter(|(var, _)| var != "FORM_TYPE")
        .collect())
}

fn one<'a>(var: &str, values: &'a [String]) -> Result<&'a str, String> {
    match values {
        [v] => Ok(v.trim()),
        [] => Err(format!("{var} has no value")),
        _ => Err(format!("{var} has more than one value")),
    }
}

fn boolean(var: &str, values: &[String]) -> Result<bool, String> {
    match one(var, values)? {
        "1" | "true" => Ok(true),
        "0" | "false" => Ok(false),
        other => Err(format!("{var}: '{other}' is not a boolean")),
    }
}

/// `pubsub#max_items`: a number up to `limit`, or `max` (`None`: the limit).
fn max_items(var: &str, values: &[String], limit: usize) -> Result<Option<usize>, String> {
    match one(var, values)? {
        "max" => Ok(None),
        v => match v.parse::<usize>() {
            Ok(n) if (1..=limit).contains(&n) => Ok(Some(n)),
            _ => Err(format!("{var} must be 1 to {limit} or 'max'")),
        },
    }
}

impl Config {
    /// How many items the node holds at most, `limit` being the service's.
    pub fn items(&self, limit: usize) -> usize {
        self.max_items.unwrap_or(limit).min(limit)
    }

    /// How many items are kept: [`Config::items`], or the last one alone when items
    /// do not persist.
    pub fn keep(&self, limit: usize) -> usize {
        if self.persist {
            self.items(limit)
        } else {
            1
        }
    }

    /// Applies a submitted configuration. Fields this server does not have are left
    /// alone (clients send many; none of them changes who can read what).
    pub fn apply(&mut self, fields: &Submitted, limit: usize) -> Result<(), String> {
        let mut next = self.clone();
        for (var, values) in fields {
            match var.as_str() {
                "pubsub#access_model" => {
                    let v = one(var, values)?;
                    next.access = Access::parse(v)
                        .ok_or_else(|| format!("access model '{v}' is not offered"))?;
                }
                "pubsub#max_items" => next.max_items = max_items(var, values, limit)?,
                "pubsub#persist_items" => next.persist = boolean(var, values)?,
                "pubsub#notify_retract" => next.notify_retract = boolean(var, values)?,
                "pubsub#send_last_published_item" => {
                    let v = one(var, values)?;
                    next.send_last = SendLast::parse(v)
                        .ok_or_else(|| format!("send_last_published_item '{v}' is not offered"))?;
                }
                "pubsub#roster_groups_allowed" => next.groups = values.clone(),
                "pubsub#title" => next.title = values.first().cloned(),
                _ => tracing::debug!(var, "node configuration field not supported: ignored"),
            }
        }
        *self = next;
        Ok(())
    }

    /// XEP-0223 preconditions: `Err` names the first field whose value differs from
    /// the node's configuration.
    pub fn meets(&self, fields: &Submitted, limit: usize) -> Result<(), String> {
        let mut wanted = self.clone();
        wanted.apply(fields, limit)?;
        let differs = |var: &str| fields.iter().any(|(v, _)| v == var);
        let checks: [(&str, bool); 6] = [
            ("pubsub#access_model", wanted.access != self.access),
            ("pubsub#max_items", wanted.items(limit) != self.items(limit)),
            ("pubsub#persist_items", wanted.persist != self.persist),
            (
                "pubsub#notify_retract",
                wanted.notify_retract != self.notify_retract,
            ),
            (
                "pubsub#send_last_published_item",
                wanted.send_last != self.send_last,
            ),
            ("pubsub#roster_groups_allowed", wanted.groups != self.groups),
        ];
        for (var, mismatch) in checks {
            if differs(var) && mismatch {
                return Err(var.to_owned());
            }
        }
        Ok(())
    }

    /// The configuration form (`pubsub#owner` configure, XEP-0060 8.2).
    pub fn form(&self, limit: usize) -> DataForm {
        let choice = |var: &str, value: &str, all: &[&str]| {
            let mut f = Field::new(var, FieldType::ListSingle).with_value(value);
            f.options = all
                .iter()
                .map(|v| Option_ {
                    label: None,
                    value: (*v).to_owned(),
                })
                .collect();
            f
        };
        let flag = |var: &str, on: bool| {
            Field::new(var, FieldType::Boolean).with_value(if on { "1" } else { "0" })
        };
        let mut groups = Field::new("pubsub#roster_groups_allowed", FieldType::ListMulti);
        groups.values = self.groups.clone();
        let mut fields = vec![
            choice(
                "pubsub#access_model",
                self.access.name(),
                &["open", "presence", "roster", "whitelist"],
            ),
            Field::text_single("pubsub#max_items", &self.items(limit).to_string()),
            flag("pubsub#persist_items", self.persist),
            flag("pubsub#notify_retract", self.notify_retract),
            choice(
                "pubsub#send_last_published_item",
                self.send_last.name(),
                &["never", "on_sub", "on_sub_and_presence"],
            ),
            groups,
            Field::text_single("pubsub#title", self.title.as_deref().unwrap_or("")),
        ];
        fields[1].desc = Some(format!("at most {limit}, or 'max'"));
        DataForm::new(DataFormType::Form, NODE_CONFIG, fields)
    }

    /// As kept in the user's index of nodes.
    pub fn write(&self, node: &mut Element) {
        node.set_attr("access", self.access.name());
        let max = self.max_items.map_or("max".to_owned(), |n| n.to_string());
        node.set_attr("max-items", max);
        node.set_attr("persist", if self.persist { "1" } else { "0" });
        node.set_attr(
            "notify-retract",
            if self.notify_retract { "1" } else { "0" },
        );
        node.set_attr("send-last", self.send_last.name());
        if let Some(t) = &self.title {
            node.set_attr("title", t.clone());
        }
        for g in &self.groups {
            node.push(Element::new("group", &node.ns.clone()).with_text(g.clone()));
        }
    }

    /// Read back from the index (missing or unknown values: the defaults).
    pub fn read(node: &Element) -> Config {
        let d = Config::default();
        let flag = |k: &str, d: bool| node.attr(k).map(|v| v == "1").unwrap_or(d);
        Config {
            access: node
                .attr("access")
                .and_then(Access::parse)
                .unwrap_or(d.access),
            max_items: match node.attr("max-items") {
                Some("max") => None,
                v => v.and_then(|v| v.parse().ok()).or(d.max_items),
            },
            persist: flag("persist", d.persist),
            notify_retract: flag("notify-retract", d.notify_retract),
            send_last: node
                .attr("send-last")
                .and_then(SendLast::parse)
                .unwrap_or(d.send_last),
            groups: node
                .elements()
                .filter(|e| e.local_name() == "group")
                .map(|e| e.text())
                .collect(),
            title: node.attr("title").map(str::to_owned),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(f: &[(&str, &str)]) -> Submitted {
        f.iter()
            .map(|(k, v)| (k.to_string(), vec![v.to_string()]))
            .collect()
    }

    #[test]
    fn publish_options_that_match_pass_and_others_name_the_field() {
        let mut c = Config::default();
        c.apply(
            &fields(&[("pubsub#access_model", "open"), ("pubsub#max_items", "max")]),
            256,
        )
        .unwrap();
        assert_eq!(
            (c.access, c.max_items, c.items(256)),
            (Access::Open, None, 256)
        );
        assert!(c
            .meets(&fields(&[("pubsub#access_model", "open")]), 256)
            .is_ok());
        assert!(c
            .meets(&fields(&[("pubsub#persist_items", "true")]), 256)
            .is_ok());
        assert_eq!(
            c.meets(&fields(&[("pubsub#access_model", "whitelist")]), 256),
            Err("pubsub#access_model".into())
        );
        assert!(c.apply(&fields(&[("pubsub#max_items", "0")]), 256).is_err());
        assert!(c
            .apply(&fields(&[("pubsub#access_model", "authorize")]), 256)
            .is_err());
    }

    #[test]
    fn the_bookmarks_options_create_a_node_that_meets_them_whatever_the_limit() {
        // XEP-0402 section 3: what clients (and the bookmarks module) publish with.
        let options = fields(&[
            ("pubsub#max_items", "max"),
            ("pubsub#access_model", "whitelist"),
            ("pubsub#persist_items", "true"),
            ("pubsub#send_last_published_item", "never"),
        ]);
        let mut c = Config::default();
        c.apply(&options, 256).unwrap();
        assert_eq!(
            (c.access, c.send_last, c.keep(256)),
            (Access::Whitelist, SendLast::Never, 256)
        );
        assert!(c.meets(&options, 256).is_ok());
        // The operator changed <pep max-items>: `max` is still `max`.
        let mut e = Element::new("node", "urn:x");
        c.write(&mut e);
        let read = Config::read(&e);
        assert!(read.meets(&options, 100).is_ok() && read.meets(&options, 1000).is_ok());
        assert_eq!(read.keep(1000), 1000);
        // A number is a number.
        assert_eq!(
            read.meets(&fields(&[("pubsub#max_items", "10")]), 256),
            Err("pubsub#max_items".into())
        );
    }

    #[test]
    fn the_index_keeps_the_configuration() {
        let c = Config {
            access: Access::Roster,
            groups: vec!["Friends".into()],
            send_last: SendLast::Never,
            ..Config::default()
        };
        let mut e = Element::new("node", "urn:x");
        c.write(&mut e);
        assert_eq!(Config::read(&e), c);
    }
}
