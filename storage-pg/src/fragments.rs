//! Fragments: `get`, `set`, `delete` (of one namespace or, with `ns='*'`, of the whole
//! owner) and `list`. A namespace's fragment is its `fragments` row followed by the
//! elements appended to it (`crate::lists`), so `get` answers what xdb-file would.

use bytes::Bytes;

use jrs_stream::validate::validate_stanza;
use jrs_stream::StanzaErrorCondition;
use jrs_xdb::Refusal;

use crate::db::Tx;
use crate::owner::Owner;

/// The stored fragment of `ns`, the appended elements included (empty when none).
pub async fn get(tx: &mut Tx<'_>, owner: &Owner, ns: &str) -> Result<Bytes, Refusal> {
    let mut out = vec![];
    if let Some(row) = tx
        .query_opt(
            "SELECT content FROM fragments WHERE host = $1 AND node = $2 AND ns = $3",
            &[&owner.host, &owner.node, &ns],
        )
        .await?
    {
        out = row.get::<_, Vec<u8>>(0);
    }
    for row in tx
        .query(
            "SELECT content FROM list_items WHERE host = $1 AND node = $2 AND ns = $3 ORDER BY seq",
            &[&owner.host, &owner.node, &ns],
        )
        .await?
    {
        out.extend_from_slice(row.get::<_, &[u8]>(0));
    }
    Ok(Bytes::from(out))
}

/// Replaces the fragment (and what was appended to it); an empty one deletes it.
pub async fn set(tx: &mut Tx<'_>, owner: &Owner, ns: &str, content: &[u8]) -> Result<(), Refusal> {
    remove(tx, owner, ns).await?;
    if is_blank(content) {
        return Ok(());
    }
    let elements = check_fragment(content)?;
    tx.execute(
        "INSERT INTO fragments (host, node, ns, content, elements) VALUES ($1, $2, $3, $4, $5)",
        &[&owner.host, &owner.node, &ns, &content, &elements],
    )
    .await?;
    Ok(())
}

/// Removes the fragment of `ns` and its appended elements (not its archive).
pub async fn remove(tx: &mut Tx<'_>, owner: &Owner, ns: &str) -> Result<(), Refusal> {
    tx.execute(
        "DELETE FROM fragments WHERE host = $1 AND node = $2 AND ns = $3",
        &[&owner.host, &owner.node, &ns],
    )
    .await?;
    tx.execute(
        "DELETE FROM list_items WHERE host = $1 AND node = $2 AND ns = $3",
        &[&owner.host, &owner.node, &ns],
    )
    .await?;
    Ok(())
}

/// `delete`: the namespace's fragment and archive, or everything of the owner (`*`).
pub async fn delete(tx: &mut Tx<'_>, owner: &Owner, ns: &str) -> Result<(), Refusal> {
    if ns == "*" {
        for sql in [
            "DELETE FROM fragments WHERE host = $1 AND node = $2",
            "DELETE FROM list_items WHERE host = $1 AND node = $2",
        ] {
            tx.execute(sql, &[&owner.host, &owner.node]).await?;
        }
        return crate::archive::delete(tx, owner, None).await;
    }
    remove(tx, owner, ns).await?;
    crate::archive::delete(tx, owner, Some(ns)).await
}

/// `list`: the users of `host` with a fragment, a list or an archive, in byte order.
pub async fn list(tx: &mut Tx<'_>, host: &str) -> Result<Vec<String>, Refusal> {
    let rows = tx
        .query(
            "SELECT node FROM fragments WHERE host = $1 AND node <> ''
             UNION SELECT node FROM list_items WHERE host = $1 AND node <> ''
             UNION SELECT node FROM archives WHERE host = $1 AND node <> ''",
            &[&host],
        )
        .await?;
    let mut users: Vec<String> = rows
        .iter()
        .map(|r| format!("{}@{host}", r.get::<_, &str>(0)))
        .collect();
    users.sort();
    Ok(users)
}

/// `list` with `ns='*'`: what one owner has stored, its namespaces (a fragment or an
/// appended list) and its archives, in byte order.
pub async fn contents(tx: &mut Tx<'_>, owner: &Owner) -> Result<jrs_xdb::Contents, Refusal> {
    let names = |rows: Vec<tokio_postgres::Row>| {
        let mut v: Vec<String> = rows.iter().map(|r| r.get::<_, String>(0)).collect();
        v.sort();
        v.dedup();
        v
    };
    let namespaces = names(
        tx.query(
            "SELECT ns FROM fragments WHERE host = $1 AND node = $2
             UNION SELECT ns FROM list_items WHERE host = $1 AND node = $2",
            &[&owner.host, &owner.node],
        )
        .await?,
    );
    let archives = names(
        tx.query(
            "SELECT ns FROM archives WHERE host = $1 AND node = $2",
            &[&owner.host, &owner.node],
        )
        .await?,
    );
    Ok(jrs_xdb::Contents {
        namespaces,
        archives,
    })
}

pub fn list_to_xml(users: &[String]) -> Bytes {
    Bytes::from(
        users
            .iter()
            .map(|jid| format!("<owner jid='{}'/>", jrs_stream::xml::escape(jid)))
            .collect::<String>(),
    )
}

pub fn is_blank(content: &[u8]) -> bool {
    content.iter().all(u8::is_ascii_whitespace)
}

/// Refuses content that is not well-formed XML (as xdb-file does); returns its number
/// of top-level elements.
pub fn check_fragment(content: &[u8]) -> Result<i32, Refusal> {
    let mut doc = Vec::with_capacity(content.len() + 17);
    doc.extend_from_slice(b"<stored>");
    doc.extend_from_slice(content);
    doc.extend_from_slice(b"</stored>");
    validate_stanza(&doc).map_err(|e| {
        Refusal::new(
            StanzaErrorCondition::BadRequest,
            format!("content is not well-formed XML: {}", e.text),
        )
    })?;
    Ok(count_elements(content).min(i32::MAX as usize) as i32)
}

/// Counts top-level elements of a fragment.
pub fn count_elements(fragment: &[u8]) -> usize {
    let mut reader = quick_xml::Reader::from_reader(fragment);
    let mut depth = 0usize;
    let mut count = 0;
    loop {
        match reader.read_event() {
            Ok(quick_xml::events::Event::Start(_)) => {
                if depth == 0 {
                    count += 1;
                }
                depth += 1;
            }
            Ok(quick_xml::events::Event::Empty(_)) if depth == 0 => count += 1,
            Ok(quick_xml::events::Event::End(_)) => depth = depth.saturating_sub(1),
            Ok(quick_xml::events::Event::Eof) | Err(_) => return count,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fragments_are_checked_and_counted() {
        assert_eq!(check_fragment(b"<a/><b><c/></b> <d>x</d>").unwrap(), 3);
        assert_eq!(
            check_fragment(b"<a><b></a>").unwrap_err().condition,
            StanzaErrorCondition::BadRequest
        );
        assert!(check_fragment(b"</stored><x/>").is_err());
        assert!(is_blank(b" \n\t"));
        assert!(!is_blank(b"<a/>"));
        assert_eq!(
            &list_to_xml(&["a'b@localhost".into()])[..],
            b"<owner jid='a&apos;b@localhost'/>"
        );
    }
}
