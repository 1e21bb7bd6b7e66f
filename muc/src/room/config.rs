//! A room's configuration and the `muc#roomconfig` form (XEP-0045 10.2, 15.5.3).

use minidom::Element;

use crate::config::RoomLimits;
use crate::xml::{escape, NS_DATA};

pub const FORM_CONFIG: &str = "http://jabber.org/protocol/muc#roomconfig";
pub const FORM_INFO: &str = "http://jabber.org/protocol/muc#roominfo";

/// Who may see occupants' real JIDs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Whois {
    Moderators,
    Anyone,
}

/// Who may send private messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllowPm {
    Anyone,
    Participants,
    Moderators,
    None,
}

impl AllowPm {
    pub fn name(self) -> &'static str {
        match self {
            AllowPm::Anyone => "anyone",
            AllowPm::Participants => "participants",
            AllowPm::Moderators => "moderators",
            AllowPm::None => "none",
        }
    }

    pub fn parse(s: &str) -> Option<AllowPm> {
        [
            AllowPm::Anyone,
            AllowPm::Participants,
            AllowPm::Moderators,
            AllowPm::None,
        ]
        .into_iter()
        .find(|a| a.name() == s)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RoomConfig {
    pub name: String,
    pub description: String,
    pub lang: String,
    pub persistent: bool,
    pub public: bool,
    pub members_only: bool,
    pub moderated: bool,
    /// Some: password protected.
    pub password: Option<String>,
    pub whois: Whois,
    pub max_users: usize,
    pub history: usize,
    pub change_subject: bool,
    pub allow_invites: bool,
    /// Registering a nick (XEP-0045 7.10) makes the user a member (else it only
    /// reserves the nick).
    pub register_members: bool,
    pub allow_pm: AllowPm,
    /// Messages are archived (XEP-0313).
    pub archive: bool,
}

/// The form field of [`RoomConfig::register_members`] (not in XEP-0045's registry).
pub const FIELD_REGISTER_MEMBERS: &str = "x-jabberd-rs#register_members";

impl RoomConfig {
    pub fn new(limits: &RoomLimits) -> RoomConfig {
        RoomConfig {
            name: String::new(),
            description: String::new(),
            lang: String::new(),
            persistent: false,
            public: true,
            members_only: false,
            moderated: false,
            password: None,
            whois: Whois::Moderators,
            max_users: limits.default_max_users,
            history: limits.default_history,
            change_subject: false,
            allow_invites: false,
            register_members: false,
            allow_pm: AllowPm::Anyone,
            archive: limits.archive,
        }
    }

    /// The form an owner fills in (muc#owner get).
    pub fn form(&self, limits: &RoomLimits) -> String {
        let mut f = format!(
            "<x xmlns='{NS_DATA}' type='form'><title>Room configuration</title>\
             <field var='FORM_TYPE' type='hidden'><value>{FORM_CONFIG}</value></field>"
        );
        text(&mut f, "muc#roomconfig_roomname", "Name", &self.name);
        text(
            &mut f,
            "muc#roomconfig_roomdesc",
            "Description",
            &self.description,
        );
        text(&mut f, "muc#roomconfig_lang", "Language", &self.lang);
        boolean(
            &mut f,
            "muc#roomconfig_persistentroom",
            "Persistent",
            self.persistent,
        );
        boolean(
            &mut f,
            "muc#roomconfig_publicroom",
            "Listed in the directory",
            self.public,
        );
        boolean(
            &mut f,
            "muc#roomconfig_membersonly",
            "Members only",
            self.members_only,
        );
        boolean(
            &mut f,
            "muc#roomconfig_moderatedroom",
            "Moderated",
            self.moderated,
        );
        boolean(
            &mut f,
            "muc#roomconfig_passwordprotectedroom",
            "Password protected",
            self.password.is_some(),
        );
        f.push_str(&format!(
            "<field var='muc#roomconfig_roomsecret' type='text-private' label='Password'><value>{}</value></field>",
            escape(self.password.as_deref().unwrap_or(""))
        ));
        list(
            &mut f,
            "muc#roomconfig_whois",
            "Who may see real JIDs",
            match self.whois {
                Whois::Moderators => "moderators",
                Whois::Anyone => "anyone",
            },
            &["moderators", "anyone"],
        );
        let mut sizes: Vec<String> = [10, 20, 30, 50, 100, 200, 500, 1000]
            .into_iter()
            .filter(|n| *n <= limits.max_occupants)
            .map(|n| n.to_string())
            .collect();
        if !sizes.contains(&limits.max_occupants.to_string()) {
            sizes.push(limits.max_occupants.to_string());
        }
        let sizes: Vec<&str> = sizes.iter().map(String::as_str).collect();
        list(
            &mut f,
            "muc#roomconfig_maxusers",
            "Most occupants",
            &self.max_users.to_string(),
            &sizes,
        );
        text(
            &mut f,
            "muc#maxhistoryfetch",
            "Messages of history",
            &self.history.to_string(),
        );
        boolean(
            &mut f,
            "muc#roomconfig_changesubject",
            "Occupants may change the subject",
            self.change_subject,
        );
        boolean(
            &mut f,
            "muc#roomconfig_allowinvites",
            "Occupants may invite",
            self.allow_invites,
        );
        boolean(
            &mut f,
            FIELD_REGISTER_MEMBERS,
            "Registering a nickname makes a member",
            self.register_members,
        );
        list(
            &mut f,
            "muc#roomconfig_allowpm",
            "Who may send private messages",
            self.allow_pm.name(),
            &["anyone", "participants", "moderators", "none"],
        );
        if limits.archive {
            boolean(
                &mut f,
                "muc#roomconfig_enablearchiving",
                "Archive messages",
                self.archive,
            );
        }
        f.push_str("</x>");
        f
    }

    /// Applies a submitted form; an error names the field that is wrong.
    pub fn apply(&mut self, form: &Element, limits: &RoomLimits) -> Result<(), String> {
        let mut next = self.clone();
        let mut secret: Option<String> = None;
        let mut protected: Option<bool> = None;
        for field in form.children().filter(|c| c.name() == "field") {
            let Some(var) = field.attr("var") else {
                continue;
            };
            let values: Vec<String> = field
                .children()
                .filter(|c| c.name() == "value")
                .map(Element::text)
                .collect();
            let value = values.first().cloned().unwrap_or_default();
            let flag = || match value.as_str() {
                "1" | "true" => Ok(true),
                "0" | "false" | "" => Ok(false),
                _ => Err(format!("{var}: expected a boolean")),
            };
            match var {
                "FORM_TYPE" if value != FORM_CONFIG => {
                    return Err(format!("FORM_TYPE: expected {FORM_CONFIG}"));
                }
                "muc#roomconfig_roomname" => next.name = value,
                "muc#roomconfig_roomdesc" => next.description = value,
                "muc#roomconfig_lang" => next.lang = value,
                "muc#roomconfig_persistentroom" => next.persistent = flag()?,
                "muc#roomconfig_publicroom" => next.public = flag()?,
                "muc#roomconfig_membersonly" => next.members_only = flag()?,
                "muc#roomconfig_moderatedroom" => next.moderated = flag()?,
                "muc#roomconfig_passwordprotectedroom" => protected = Some(flag()?),
                "muc#roomconfig_roomsecret" => secret = Some(value),
                "muc#roomconfig_whois" => {
                    next.whois = match value.as_str() {
                        "moderators" => Whois::Moderators,
                        "anyone" => Whois::Anyone,
                        _ => return Err(format!("{var}: expected moderators or anyone")),
                    }
                }
                "muc#roomconfig_maxusers" => {
                    let n = match value.as_str() {
                        "" | "none" => limits.max_occupants,
                        v => v
                            .parse::<usize>()
                            .map_err(|_| format!("{var}: expected a number"))?,
                    };
                    if n == 0 || n > limits.max_occupants {
                        return Err(format!(
                            "{var}: at most {} on this service",
                            limits.max_occupants
                        ));
                    }
                    next.max_users = n;
                }
                "muc#maxhistoryfetch" | "muc#roomconfig_historylength" => {
                    let n = value
                        .parse::<usize>()
                        .map_err(|_| format!("{var}: expected a number"))?;
                    next.history = n.min(limits.max_history);
                }
                "muc#roomconfig_changesubject" => next.change_subject = flag()?,
                "muc#roomconfig_allowinvites" => next.allow_invites = flag()?,
                FIELD_REGISTER_MEMBERS => next.register_members = flag()?,
                "muc#roomconfig_enablearchiving" => next.archive = flag()? && limits.archive,
                "muc#roomconfig_allowpm" => {
                    next.allow_pm = AllowPm::parse(&value).ok_or_else(|| {
                        format!("{var}: expected anyone, participants, moderators or none")
                    })?
                }
                // Fields of other implementations are ignored (XEP-0045 10.2 allows it).
                _ => {}
            }
        }
        match (protected, secret) {
            (Some(false), _) => next.password = None,
            (Some(true), Some(s)) if !s.is_empty() => next.password = Some(s),
            (Some(true), _) if next.password.is_none() => {
                return Err(
                    "muc#roomconfig_roomsecret: a password protected room needs a password".into(),
                )
            }
            (None, Some(s)) if !s.is_empty() => next.password = Some(s),
            _ => {}
        }
        *self = next;
        Ok(())
    }

    /// The disco#info features that describe the configuration.
    pub fn features(&self) -> [&'static str; 6] {
        [
            if self.persistent {
                "muc_persistent"
            } else {
                "muc_temporary"
            },
            if self.members_only {
                "muc_membersonly"
            } else {
                "muc_open"
            },
            if self.moderated {
                "muc_moderated"
            } else {
                "muc_unmoderated"
            },
            match self.whois {
                Whois::Moderators => "muc_semianonymous",
                Whois::Anyone => "muc_nonanonymous",
            },
            if self.password.is_some() {
                "muc_passwordprotected"
            } else {
                "muc_unsecured"
            },
            if self.public {
                "muc_public"
            } else {
                "muc_hidden"
            },
        ]
    }
}

fn text(f: &mut String, var: &str, label: &str, value: &str) {
    f.push_str(&format!(
        "<field var='{var}' type='text-single' label='{label}'><value>{}</value></field>",
        escape(value)
    ));
}

fn boolean(f: &mut String, var: &str, label: &str, value: bool) {
    f.push_str(&format!(
        "<field var='{var}' type='boolean' label='{label}'><value>{}</value></field>",
        u8::from(value)
    ));
}

fn list(f: &mut String, var: &str, label: &str, value: &str, options: &[&str]) {
    f.push_str(&format!(
        "<field var='{var}' type='list-single' label='{label}'><value>{}</value>",
        escape(value)
    ));
    for o in options {
        f.push_str(&format!("<option><value>{o}</value></option>"));
    }
    f.push_str("</field>");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> RoomLimits {
        RoomLimits {
            max_occupants: 50,
            default_max_users: 20,
            max_history: 30,
            default_history: 10,
            rate: 1.0,
            burst: 1.0,
            archive: true,
            archive_max_items: None,
        }
    }

    fn submit(fields: &str) -> Element {
        format!("<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE'><value>{FORM_CONFIG}</value></field>{fields}</x>")
            .parse()
            .unwrap()
    }

    #[test]
    fn form_round_trip() {
        let l = limits();
        let mut c = RoomConfig::new(&l);
        let form: Element = c.form(&l).parse().unwrap();
        assert_eq!(form.attr("type"), Some("form"));
        let mut same = c.clone();
        // Submitting the form as offered changes nothing.
        same.apply(&form, &l).unwrap();
        assert_eq!(same, c);

        c.apply(
            &submit(
                "<field var='muc#roomconfig_persistentroom'><value>1</value></field>\
                 <field var='muc#roomconfig_passwordprotectedroom'><value>1</value></field>\
                 <field var='muc#roomconfig_roomsecret'><value>pw</value></field>\
                 <field var='muc#roomconfig_maxusers'><value>30</value></field>\
                 <field var='muc#maxhistoryfetch'><value>99</value></field>",
            ),
            &l,
        )
        .unwrap();
        assert!(c.persistent);
        assert_eq!(c.password.as_deref(), Some("pw"));
        assert_eq!(c.max_users, 30);
        assert_eq!(c.history, 30, "capped at the service's max-history");
        assert_eq!(c.features()[0], "muc_persistent");
        assert_eq!(c.features()[4], "muc_passwordprotected");

        let err = c
            .apply(
                &submit("<field var='muc#roomconfig_maxusers'><value>51</value></field>"),
                &l,
            )
            .unwrap_err();
        assert!(err.contains("at most 50"), "{err}");
        let err = RoomConfig::new(&l)
            .apply(
                &submit(
                    "<field var='muc#roomconfig_passwordprotectedroom'><value>1</value></field>",
                ),
                &l,
            )
            .unwrap_err();
        assert!(err.contains("needs a password"), "{err}");
    }
}
