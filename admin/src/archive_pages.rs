//! Reading a whole archive through storage, page after page (`export` and `dump`).

use jrs_xdb::archive::{Item, Paging, Query, MAX_PAGE};
use jrs_xdb::XdbClient;

/// Bytes of items per page read.
const PAGE_BYTES: usize = 128 * 1024;

/// Hands the items of `owner`'s archive `ns` to `each`, a page at a time, oldest first.
pub async fn for_each_page(
    xdb: &XdbClient,
    owner: &str,
    ns: &str,
    mut each: impl FnMut(&[Item]) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut after: Option<String> = None;
    loop {
        let query = Query {
            paging: Paging {
                after: after.take(),
                max: MAX_PAGE,
                max_bytes: Some(PAGE_BYTES),
                ..Default::default()
            },
            ..Default::default()
        };
        let page = xdb
            .archive_query(owner, ns, &query)
            .await
            .map_err(|e| anyhow::anyhow!("{owner}: reading the archive {ns}: {e}"))?;
        if page.items.is_empty() {
            return Ok(());
        }
        each(&page.items)?;
        if page.complete {
            return Ok(());
        }
        after = page.items.last().map(|i| i.id.clone());
    }
}
