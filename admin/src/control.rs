//! `jabberctl sessions | kick | announce | stats`: questions for every sm instance
//! (docs/protocol.md, "Administration"). Sessions live in the sm instance that owns
//! each user, so jabberctl learns the instances from link notices (the `bound` notices
//! for `session` routes) and asks each by its component name, then merges the answers.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::xml::{escape, Element};
use jrs_component::{ComponentReader, Outbox};

pub const NS_ADMIN: &str = "urn:jabberd-rs:admin:0";
/// How long an sm instance may take to answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// What to ask every sm instance.
pub enum Ask {
    Sessions {
        domain: Option<String>,
    },
    Kick {
        jid: String,
    },
    Announce {
        domain: String,
        subject: Option<String>,
        body: String,
    },
    Stats,
}

/// The sm instances (component names) bound for `session` at `domain` (any domain when
/// None), from the `bound` notices that follow the notices subscription. A ping to
/// ourselves marks their end: the router queued every notice before it.
pub async fn sm_instances(
    me: &str,
    reader: &mut ComponentReader,
    outbox: &Outbox,
    domain: Option<&str>,
) -> anyhow::Result<Vec<String>> {
    outbox.send(format!(
        "<iq type='get' id='sync' to='{me}' from='{me}'><ping xmlns='urn:xmpp:ping'/></iq>"
    ));
    let mut names = BTreeSet::new();
    loop {
        let s = tokio::time::timeout(ANSWER_TIMEOUT, reader.next())
            .await
            .context("the router sent no list of components")??;
        if s.name() == "iq" && s.id() == Some("sync") {
            break;
        }
        if s.name() != "notice" {
            continue;
        }
        let bound_session = s.attr("event").as_deref() == Some("bound")
            && s.attr("route").as_deref() == Some("session");
        let (host, name) = (s.attr("host"), s.attr("name"));
        // Every component's own name is bound for `session` too: not a domain's.
        let host_ok = match domain {
            Some(d) => host.as_deref() == Some(d),
            None => host.is_some() && host != name,
        };
        if bound_session && host_ok {
            if let Some(name) = name {
                names.insert(name);
            }
        }
    }
    Ok(names.into_iter().collect())
}

/// Asks every instance and returns each one's answer element (in the admin namespace).
pub async fn ask_all(
    me: &str,
    reader: &mut ComponentReader,
    outbox: &Outbox,
    instances: &[String],
    ask: &Ask,
) -> anyhow::Result<Vec<(String, Element)>> {
    let (kind, inner) = request(ask);
    for (i, sm) in instances.iter().enumerate() {
        outbox.send(format!(
            "<iq type='{kind}' id='a{i}' to='{}' from='{me}'>{inner}</iq>",
            escape(sm)
        ));
    }
    let mut answers: Vec<Option<(String, Element)>> = vec![None; instances.len()];
    let mut left = instances.len();
    while left > 0 {
        let s = tokio::time::timeout(ANSWER_TIMEOUT, reader.next())
            .await
            .context("an sm instance did not answer within 10 s")??;
        let Some(i) = s
            .id()
            .and_then(|id| id.strip_prefix('a'))
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|i| *i < instances.len())
        else {
            continue;
        };
        if s.name() != "iq" || answers[i].is_some() {
            continue;
        }
        let iq = Element::parse(s.bytes(), "jabber:component:accept")
            .map_err(|e| anyhow::anyhow!("unreadable answer from {}: {e}", instances[i]))?;
        if s.kind() == Some("error") {
            let why = iq
                .child("error", "jabber:component:accept")
                .map(|e| e.to_xml())
                .unwrap_or_default();
            bail!("{} refused: {why}", instances[i]);
        }
        let answer = iq
            .elements()
            .find(|e| e.ns == NS_ADMIN)
            .cloned()
            .unwrap_or_else(|| Element::new("empty", NS_ADMIN));
        answers[i] = Some((instances[i].clone(), answer));
        left -= 1;
    }
    Ok(answers.into_iter().flatten().collect())
}

fn request(ask: &Ask) -> (&'static str, String) {
    match ask {
        Ask::Sessions { domain } => (
            "get",
            match domain {
                Some(d) => format!("<sessions xmlns='{NS_ADMIN}' host='{}'/>", escape(d)),
                None => format!("<sessions xmlns='{NS_ADMIN}'/>"),
            },
        ),
        Ask::Kick { jid } => (
            "set",
            format!("<kick xmlns='{NS_ADMIN}' jid='{}'/>", escape(jid)),
        ),
        Ask::Announce {
            domain,
            subject,
            body,
        } => (
            "set",
            format!(
                "<announce xmlns='{NS_ADMIN}' host='{}'>{}<body>{}</body></announce>",
                escape(domain),
                subject.as_deref().map_or(String::new(), |s| format!(
                    "<subject>{}</subject>",
                    escape(s)
                )),
                escape(body)
            ),
        ),
        Ask::Stats => ("get", format!("<stats xmlns='{NS_ADMIN}'/>")),
    }
}

/// Prints the merged answers as an operator reads them.
pub fn print(ask: &Ask, answers: &[(String, Element)]) {
    let attr = |e: &Element, k: &str| e.attr(k).unwrap_or("").to_owned();
    match ask {
        Ask::Sessions { .. } => {
            let mut rows = vec![];
            for (sm, a) in answers {
                for s in a.elements() {
                    rows.push((
                        attr(s, "jid"),
                        attr(s, "c2s"),
                        sm.clone(),
                        attr(s, "state"),
                        if attr(s, "available") == "true" {
                            format!("available ({})", attr(s, "priority"))
                        } else {
                            "unavailable".to_owned()
                        },
                    ));
                }
            }
            rows.sort();
            for (jid, c2s, sm, state, presence) in &rows {
                println!("{jid}\t{c2s}\t{sm}\t{state}\t{presence}");
            }
            eprintln!("{} session(s)", rows.len());
        }
        Ask::Kick { jid } => {
            let ended: u64 = answers
                .iter()
                .map(|(_, a)| attr(a, "ended").parse::<u64>().unwrap_or(0))
                .sum();
            println!("{ended} session(s) of {jid} ended");
        }
        Ask::Announce { domain, .. } => {
            let sent: u64 = answers
                .iter()
                .map(|(_, a)| attr(a, "sent").parse::<u64>().unwrap_or(0))
                .sum();
            println!("announcement sent to {sent} available session(s) on {domain}");
        }
        Ask::Stats => {
            let keys = [
                "users-online",
                "sessions",
                "hibernating",
                "available",
                "uptime",
            ];
            let mut totals = [0u64; 4];
            for (sm, a) in answers {
                let values: Vec<String> = keys.iter().map(|k| attr(a, k)).collect();
                for (t, v) in totals.iter_mut().zip(&values) {
                    *t += v.parse::<u64>().unwrap_or(0);
                }
                println!(
                    "{sm}: {} user(s) online, {} session(s) live, {} hibernating, {} available, up {} s",
                    values[0], values[1], values[2], values[3], values[4]
                );
            }
            println!(
                "total: {} user(s) online, {} session(s) live, {} hibernating, {} available, {} sm instance(s)",
                totals[0], totals[1], totals[2], totals[3], answers.len()
            );
        }
    }
}
