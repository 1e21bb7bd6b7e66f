//! Stream headers: reading the peer's `<stream:stream>` and writing ours.

use bytes::Bytes;
use quick_xml::events::Event;
use quick_xml::Reader;

use crate::errors::{StreamError, StreamErrorCondition};
use crate::xml::escape;
use crate::NS_STREAMS;

/// The attributes of a received stream header.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamHeader {
    pub to: Option<String>,
    pub from: Option<String>,
    pub id: Option<String>,
    pub version: Option<String>,
    pub lang: Option<String>,
    /// The default namespace (`jabber:client`, `jabber:server`, `jabber:component:accept`).
    pub xmlns: Option<String>,
}

impl StreamHeader {
    /// Parses the bytes of a `Frame::StreamOpen` and checks the stream namespace and, when
    /// given, the default namespace.
    pub fn parse(bytes: &Bytes, expected_ns: Option<&str>) -> Result<StreamHeader, StreamError> {
        let text = std::str::from_utf8(bytes)
            .map_err(|_| StreamError::new(StreamErrorCondition::NotWellFormed, "invalid UTF-8"))?;
        let mut reader = Reader::from_str(text);
        let start = loop {
            match reader.read_event() {
                Ok(Event::Decl(_)) | Ok(Event::Text(_)) => continue,
                Ok(Event::Start(e)) => break e,
                Ok(_) => {
                    return Err(StreamError::new(
                        StreamErrorCondition::NotWellFormed,
                        "expected a stream header",
                    ))
                }
                Err(e) => {
                    return Err(StreamError::new(
                        StreamErrorCondition::NotWellFormed,
                        format!("bad stream header: {e}"),
                    ))
                }
            }
        };
        let mut header = StreamHeader::default();
        let name = start.name();
        let prefix = name.prefix().map(|p| p.into_inner().to_owned());
        let local = name.local_name().into_inner().to_owned();
        let mut stream_ns = None;
        for attr in start.attributes().with_checks(true) {
            let attr = attr.map_err(|e| {
                StreamError::new(
                    StreamErrorCondition::NotWellFormed,
                    format!("bad attribute: {e}"),
                )
            })?;
            let value = quick_xml::escape::unescape(&attr.value)
                .map_err(|e| {
                    StreamError::new(
                        StreamErrorCondition::NotWellFormed,
                        format!("bad attribute: {e}"),
                    )
                })?
                .into_owned();
            let key = attr.key.as_ref();
            match key {
                "to" => header.to = Some(value),
                "from" => header.from = Some(value),
                "id" => header.id = Some(value),
                "version" => header.version = Some(value),
                "xml:lang" => header.lang = Some(value),
                "xmlns" => {
                    if prefix.is_none() {
                        stream_ns = Some(value.clone());
                    }
                    header.xmlns = Some(value);
                }
                _ => {
                    if let Some(p) = key.strip_prefix("xmlns:") {
                        if Some(p) == prefix.as_deref() {
                            stream_ns = Some(value);
                        }
                    }
                }
            }
        }
        if local != "stream" || stream_ns.as_deref() != Some(NS_STREAMS) {
            return Err(StreamError::new(
                StreamErrorCondition::InvalidNamespace,
                "the stream element must be <stream> in http://etherx.jabber.org/streams",
            ));
        }
        if let Some(expected) = expected_ns {
            if header.xmlns.as_deref() != Some(expected) {
                return Err(StreamError::new(
                    StreamErrorCondition::InvalidNamespace,
                    format!("the stream's default namespace must be {expected}"),
                ));
            }
        }
        Ok(header)
    }
}

/// Writes a stream header. `attrs` are extra `(name, value)` pairs (values are escaped).
pub fn open_stream(default_ns: &str, attrs: &[(&str, &str)]) -> String {
    // Pushed piece by piece, not `format!`ted: every login writes two or three.
    let mut s = String::with_capacity(256);
    for part in [
        "<?xml version='1.0'?><stream:stream xmlns='",
        &escape(default_ns),
        "' xmlns:stream='",
        NS_STREAMS,
        "'",
    ] {
        s.push_str(part);
    }
    for (k, v) in attrs {
        for part in [" ", k, "='", &escape(v), "'"] {
            s.push_str(part);
        }
    }
    s.push('>');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_header_written_as_before() {
        assert_eq!(
            open_stream("jabber:client", &[("from", "localhost"), ("id", "a'b"), ("version", "1.0")]),
            "<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
             xmlns:stream='http://etherx.jabber.org/streams' from='localhost' id='a&apos;b' version='1.0'>"
        );
    }

    #[test]
    fn parses_component_header() {
        let b = Bytes::from_static(b"<?xml version='1.0'?><stream:stream xmlns='jabber:component:accept' xmlns:stream='http://etherx.jabber.org/streams' to='echo.localhost'>");
        let h = StreamHeader::parse(&b, Some("jabber:component:accept")).unwrap();
        assert_eq!(h.to.as_deref(), Some("echo.localhost"));
    }

    #[test]
    fn rejects_wrong_namespaces() {
        let b = Bytes::from_static(b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>");
        assert_eq!(
            StreamHeader::parse(&b, Some("jabber:component:accept"))
                .unwrap_err()
                .condition,
            StreamErrorCondition::InvalidNamespace
        );
        let b = Bytes::from_static(
            b"<stream:stream xmlns='jabber:component:accept' xmlns:stream='urn:wrong'>",
        );
        assert!(StreamHeader::parse(&b, None).is_err());
    }
}
