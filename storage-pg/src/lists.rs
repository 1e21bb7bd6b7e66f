//! Lists: `append` (offline messages; `max-items` refuses a list that would grow past
//! it) and `take` (the fragment returned and removed in one transaction). An append
//! inserts one row whatever the list's length.

use bytes::Bytes;

use jrs_stream::StanzaErrorCondition;
use jrs_xdb::Refusal;

use crate::db::Tx;
use crate::fragments::{check_fragment, get, is_blank, remove};
use crate::owner::Owner;

pub async fn append(
    tx: &mut Tx<'_>,
    owner: &Owner,
    ns: &str,
    items: &[u8],
    max_items: Option<usize>,
) -> Result<(), Refusal> {
    if is_blank(items) {
        return Ok(());
    }
    let elements = check_fragment(items)?;
    if let Some(max) = max_items {
        let held: i64 = tx
            .query_opt(
                "SELECT COALESCE((SELECT elements FROM fragments WHERE host = $1 AND node = $2 AND ns = $3), 0)::bigint
                      + COALESCE((SELECT SUM(elements) FROM list_items WHERE host = $1 AND node = $2 AND ns = $3), 0)::bigint",
                &[&owner.host, &owner.node, &ns],
            )
            .await?
            .map_or(0, |r| r.get(0));
        if over_limit(held, elements, max) {
            return Err(Refusal::new(
                StanzaErrorCondition::ResourceConstraint,
                format!("the list holds at most {max} items"),
            ));
        }
    }
    tx.execute(
        "INSERT INTO list_items (host, node, ns, content, elements) VALUES ($1, $2, $3, $4, $5)",
        &[&owner.host, &owner.node, &ns, &items, &elements],
    )
    .await?;
    Ok(())
}

fn over_limit(held: i64, adding: i32, max: usize) -> bool {
    held.saturating_add(adding as i64) > i64::try_from(max).unwrap_or(i64::MAX)
}

pub async fn take(tx: &mut Tx<'_>, owner: &Owner, ns: &str) -> Result<Bytes, Refusal> {
    let data = get(tx, owner, ns).await?;
    remove(tx, owner, ns).await?;
    Ok(data)
}

#[cfg(test)]
mod tests {
    #[test]
    fn limit() {
        assert!(!super::over_limit(1, 1, 2));
        assert!(super::over_limit(2, 1, 2));
        assert!(super::over_limit(0, 3, 2));
        assert!(!super::over_limit(0, 3, usize::MAX));
    }
}
