//! A log record as it travels through the router (`<log xmlns='urn:jabberd-rs:log:0'>`,
//! docs/protocol.md "Log packets"), its one-line text form (docs/logd.md), and the
//! filters the sinks (logd, `jabberctl log`) apply.

use std::time::SystemTime;

use chrono::{DateTime, SecondsFormat, Utc};
use jrs_stream::xml::escape;
use jrs_stream::Stanza;

use crate::protocol::NS_LOG;

/// Bounds on one record, so a packet stays far below any link's stanza limit.
const MAX_MESSAGE: usize = 4096;
const MAX_FIELDS: usize = 32;
const MAX_VALUE: usize = 1024;

/// A record's level, most severe first (so `a <= b` means a is at least as severe).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl Level {
    pub fn name(self) -> &'static str {
        match self {
            Level::Error => "error",
            Level::Warn => "warn",
            Level::Info => "info",
            Level::Debug => "debug",
            Level::Trace => "trace",
        }
    }

    pub fn parse(s: &str) -> Option<Level> {
        Some(match s.to_ascii_lowercase().as_str() {
            "error" => Level::Error,
            "warn" | "warning" => Level::Warn,
            "info" => Level::Info,
            "debug" => Level::Debug,
            "trace" => Level::Trace,
            _ => return None,
        })
    }

    pub fn from_tracing(l: &tracing::Level) -> Level {
        match *l {
            tracing::Level::ERROR => Level::Error,
            tracing::Level::WARN => Level::Warn,
            tracing::Level::INFO => Level::Info,
            tracing::Level::DEBUG => Level::Debug,
            tracing::Level::TRACE => Level::Trace,
        }
    }
}

impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A summary's extra data: `count` identical records not sent on their own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repeated {
    pub count: u64,
    pub first: SystemTime,
    pub last: SystemTime,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    /// The packet's `from`: the host it is routed by (a domain the sender serves, or
    /// the sender's name).
    pub from: String,
    pub level: Level,
    /// The program (`sm`) and the instance's link name (`sm-2`).
    pub process: String,
    pub instance: String,
    /// The domain the record concerns, else the sender's name.
    pub host: String,
    /// The Rust module that logged it (`sm::host::task`).
    pub target: String,
    pub time: SystemTime,
    pub message: String,
    pub fields: Vec<(String, String)>,
    pub repeated: Option<Repeated>,
}

pub fn rfc3339(t: SystemTime) -> String {
    DateTime::<Utc>::from(t).to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn parse_time(s: &str) -> Option<SystemTime> {
    DateTime::parse_from_rfc3339(s).ok().map(SystemTime::from)
}

/// Text fit for XML 1.0 (control characters replaced), cut to `max` bytes.
pub fn clean(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max));
    for c in s.chars() {
        if out.len() + c.len_utf8() > max {
            out.push('…');
            break;
        }
        let ok =
            matches!(c, '\t' | '\n' | '\r') || (c >= ' ' && c != '\u{FFFE}' && c != '\u{FFFF}');
        out.push(if ok { c } else { '\u{FFFD}' });
    }
    out
}

impl LogRecord {
    /// The packet (docs/protocol.md, "Log packets").
    pub fn to_xml(&self) -> String {
        let mut out = format!(
            "<log xmlns='{NS_LOG}' from='{}' level='{}' process='{}' instance='{}' host='{}' target='{}' time='{}'",
            escape(&self.from),
            self.level,
            escape(&self.process),
            escape(&self.instance),
            escape(&self.host),
            escape(&self.target),
            rfc3339(self.time),
        );
        if let Some(r) = &self.repeated {
            out.push_str(&format!(
                " count='{}' first='{}' last='{}'",
                r.count,
                rfc3339(r.first),
                rfc3339(r.last)
            ));
        }
        out.push('>');
        out.push_str(&escape(&clean(&self.message, MAX_MESSAGE)));
        for (k, v) in self.fields.iter().take(MAX_FIELDS) {
            out.push_str(&format!(
                "<field name='{}'>{}</field>",
                escape(&clean(k, 64)),
                escape(&clean(v, MAX_VALUE))
            ));
        }
        out.push_str("</log>");
        out
    }

    /// Reads a `<log/>` packet. Also takes the older form that had only `from`, `level`
    /// and text: process and host then come from `from`, the time is now.
    pub fn parse(stanza: &Stanza) -> Option<LogRecord> {
        if stanza.name() != "log" {
            return None;
        }
        let from = stanza.from().unwrap_or("").to_owned();
        let attr = |n: &str| stanza.attr(n).filter(|v| !v.is_empty());
        let instance = attr("instance").unwrap_or_else(|| from.clone());
        let process = attr("process").unwrap_or_else(|| instance.clone());
        let host = attr("host").unwrap_or_else(|| {
            from.rsplit_once('@')
                .map_or(from.as_str(), |(_, d)| d)
                .split('/')
                .next()
                .unwrap_or("")
                .to_owned()
        });
        let repeated = match (attr("count"), attr("first"), attr("last")) {
            (Some(c), Some(f), Some(l)) => Some(Repeated {
                count: c.parse().ok()?,
                first: parse_time(&f)?,
                last: parse_time(&l)?,
            }),
            _ => None,
        };
        let (message, fields) = content(stanza.inner());
        Some(LogRecord {
            level: attr("level")
                .and_then(|l| Level::parse(&l))
                .unwrap_or(Level::Info),
            process,
            instance,
            host,
            target: attr("target").unwrap_or_default(),
            time: attr("time")
                .and_then(|t| parse_time(&t))
                .unwrap_or_else(SystemTime::now),
            message,
            fields,
            repeated,
            from,
        })
    }

    /// The one-line form (docs/logd.md, "Line format"):
    /// `TIME LEVEL HOST INSTANCE TARGET: MESSAGE key=value ... [repeated N times from T1 to T2]`.
    pub fn line(&self) -> String {
        let mut out = format!(
            "{} {:<5} {} {} {}: {}",
            rfc3339(self.time),
            self.level.name().to_ascii_uppercase(),
            or_dash(&self.host),
            or_dash(&self.instance),
            or_dash(&self.target),
            self.message.replace('\n', "\\n"),
        );
        for (k, v) in &self.fields {
            out.push(' ');
            out.push_str(k);
            out.push('=');
            if v.is_empty() || v.contains([' ', '"', '\n', '=']) {
                out.push_str(&format!("{v:?}"));
            } else {
                out.push_str(v);
            }
        }
        if let Some(r) = &self.repeated {
            out.push_str(&format!(
                " [repeated {} times from {} to {}]",
                r.count,
                rfc3339(r.first),
                rfc3339(r.last)
            ));
        }
        out
    }
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

/// The text and the `<field/>` children of a packet's content.
fn content(inner: &[u8]) -> (String, Vec<(String, String)>) {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_reader(inner);
    let mut message = String::new();
    let mut fields = vec![];
    let mut depth = 0usize;
    let mut field: Option<(String, String)> = None;
    loop {
        match reader.read_event() {
            Ok(Event::Start(e)) => {
                depth += 1;
                if depth == 1 && e.local_name().as_ref() == "field" {
                    let name = name_attr(&e);
                    field = Some((name, String::new()));
                }
            }
            Ok(Event::Empty(e)) if depth == 0 && e.local_name().as_ref() == "field" => {
                fields.push((name_attr(&e), String::new()));
            }
            Ok(Event::End(_)) => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    fields.extend(field.take());
                }
            }
            Ok(Event::Text(t)) => {
                let text = t.xml10_content().into_owned();
                match (&mut field, depth) {
                    (_, 0) => message.push_str(&text),
                    (Some((_, v)), 1) => v.push_str(&text),
                    _ => {}
                }
            }
            Ok(Event::GeneralRef(r)) => {
                let s: &str = &r;
                let text = quick_xml::escape::unescape(&format!("&{s};"))
                    .map(|c| c.into_owned())
                    .unwrap_or_default();
                match (&mut field, depth) {
                    (_, 0) => message.push_str(&text),
                    (Some((_, v)), 1) => v.push_str(&text),
                    _ => {}
                }
            }
            Ok(Event::CData(t)) => {
                let text = t.to_string();
                match (&mut field, depth) {
                    (_, 0) => message.push_str(&text),
                    (Some((_, v)), 1) => v.push_str(&text),
                    _ => {}
                }
            }
            Ok(Event::Eof) | Err(_) => break,
            _ => {}
        }
    }
    (message, fields)
}

fn name_attr(e: &quick_xml::events::BytesStart) -> String {
    e.attributes()
        .flatten()
        .find(|a| a.key.as_ref() == "name")
        .and_then(|a| {
            quick_xml::escape::unescape(&a.value)
                .ok()
                .map(|v| v.into_owned())
        })
        .unwrap_or_default()
}

/// Which records a sink takes: a level at least as severe as `level`, and, when given,
/// one of the hosts, one of the processes (program or instance name), and a text found
/// (case-insensitively) in the message or a field value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    pub level: Level,
    pub hosts: Vec<String>,
    pub processes: Vec<String>,
    pub matches: Option<String>,
}

impl Default for Filter {
    fn default() -> Self {
        Filter {
            level: Level::Warn,
            hosts: vec![],
            processes: vec![],
            matches: None,
        }
    }
}

impl Filter {
    pub fn accepts(&self, r: &LogRecord) -> bool {
        if r.level > self.level {
            return false;
        }
        if !self.hosts.is_empty() && !self.hosts.iter().any(|h| h.eq_ignore_ascii_case(&r.host)) {
            return false;
        }
        if !self.processes.is_empty()
            && !self
                .processes
                .iter()
                .any(|p| *p == r.process || *p == r.instance)
        {
            return false;
        }
        if let Some(m) = &self.matches {
            let m = m.to_lowercase();
            let found = r.message.to_lowercase().contains(&m)
                || r.fields.iter().any(|(_, v)| v.to_lowercase().contains(&m));
            if !found {
                return false;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn record() -> LogRecord {
        LogRecord {
            from: "localhost".into(),
            level: Level::Warn,
            process: "sm".into(),
            instance: "sm-2".into(),
            host: "localhost".into(),
            target: "sm::host::task".into(),
            time: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            message: "session refused: <too> many & 'sessions'".into(),
            fields: vec![("max".into(), "1".into()), ("jid".into(), "a b".into())],
            repeated: None,
        }
    }

    fn parse(xml: &str) -> LogRecord {
        let s = Stanza::parse(bytes::Bytes::from(xml.to_owned())).unwrap();
        LogRecord::parse(&s).unwrap()
    }

    #[test]
    fn packet_round_trip() {
        let mut r = record();
        assert_eq!(parse(&r.to_xml()), r);
        r.repeated = Some(Repeated {
            count: 41,
            first: r.time,
            last: r.time + Duration::from_secs(3),
        });
        let xml = r.to_xml();
        assert!(
            xml.contains(" count='41' first='2023-11-14T22:13:20.123Z'"),
            "{xml}"
        );
        assert_eq!(parse(&xml), r);
    }

    #[test]
    fn old_form_parses() {
        let r = parse("<log xmlns='urn:jabberd-rs:log:0' from='sm-1' level='error'>boom</log>");
        assert_eq!(
            (r.level, r.process.as_str(), r.host.as_str()),
            (Level::Error, "sm-1", "sm-1")
        );
        assert_eq!(r.message, "boom");
    }

    #[test]
    fn control_characters_are_replaced() {
        let mut r = record();
        r.message = "a\u{1}b".into();
        assert!(r.to_xml().contains("a\u{FFFD}b"));
    }

    #[test]
    fn line_format() {
        let mut r = record();
        r.repeated = Some(Repeated {
            count: 2,
            first: r.time,
            last: r.time,
        });
        assert_eq!(
            r.line(),
            "2023-11-14T22:13:20.123Z WARN  localhost sm-2 sm::host::task: session refused: <too> many & 'sessions' max=1 jid=\"a b\" [repeated 2 times from 2023-11-14T22:13:20.123Z to 2023-11-14T22:13:20.123Z]"
        );
    }

    #[test]
    fn filters() {
        let r = record();
        let f = |level, hosts: &[&str], processes: &[&str], m: Option<&str>| Filter {
            level,
            hosts: hosts.iter().map(|s| s.to_string()).collect(),
            processes: processes.iter().map(|s| s.to_string()).collect(),
            matches: m.map(str::to_owned),
        };
        assert!(f(Level::Warn, &[], &[], None).accepts(&r));
        assert!(f(Level::Debug, &[], &[], None).accepts(&r));
        assert!(!f(Level::Error, &[], &[], None).accepts(&r));
        assert!(f(Level::Warn, &["example.org", "LOCALHOST"], &[], None).accepts(&r));
        assert!(!f(Level::Warn, &["example.org"], &[], None).accepts(&r));
        assert!(f(Level::Warn, &[], &["sm"], None).accepts(&r));
        assert!(f(Level::Warn, &[], &["sm-2"], None).accepts(&r));
        assert!(!f(Level::Warn, &[], &["c2s"], None).accepts(&r));
        assert!(f(Level::Warn, &[], &[], Some("MANY")).accepts(&r));
        assert!(f(Level::Warn, &[], &[], Some("a b")).accepts(&r));
        assert!(!f(Level::Warn, &[], &[], Some("roster")).accepts(&r));
    }
}
