//! Storage as sm's modules see it: the xdb component through the router, or (in unit
//! tests) a map in memory that answers the same operations with the same semantics
//! (archives through `jrs_xdb::archive::select`, the reference).

use bytes::Bytes;

use jrs_xdb::archive::{Page, Query, Retention};
use jrs_xdb::{XdbClient, XdbError};

pub enum Store {
    Xdb(XdbClient),
    #[cfg(test)]
    Memory(std::sync::Mutex<memory::Memory>),
}

impl Store {
    pub fn xdb(&self) -> Option<&XdbClient> {
        match self {
            Store::Xdb(x) => Some(x),
            #[cfg(test)]
            Store::Memory(_) => None,
        }
    }

    pub async fn get(&self, owner: &str, ns: &str) -> Result<Bytes, XdbError> {
        match self {
            Store::Xdb(x) => x.get(owner, ns).await,
            #[cfg(test)]
            Store::Memory(m) => Ok(m.lock().unwrap().get(owner, ns)),
        }
    }

    pub async fn set(&self, owner: &str, ns: &str, data: impl Into<Bytes>) -> Result<(), XdbError> {
        match self {
            Store::Xdb(x) => x.set(owner, ns, data).await,
            #[cfg(test)]
            Store::Memory(m) => {
                m.lock().unwrap().set(owner, ns, data.into());
                Ok(())
            }
        }
    }

    /// A `set` storage may put on disk up to a second after answering
    /// (`jrs_xdb::Flush::Later`): for bookkeeping whose loss in a crash harms nobody.
    pub async fn set_later(
        &self,
        owner: &str,
        ns: &str,
        data: impl Into<Bytes>,
    ) -> Result<(), XdbError> {
        match self {
            Store::Xdb(x) => x.set_later(owner, ns, data).await,
            #[cfg(test)]
            Store::Memory(_) => self.set(owner, ns, data).await,
        }
    }

    pub async fn delete(&self, owner: &str, ns: &str) -> Result<(), XdbError> {
        match self {
            Store::Xdb(x) => x.delete(owner, ns).await,
            #[cfg(test)]
            Store::Memory(m) => {
                m.lock().unwrap().delete(owner, ns);
                Ok(())
            }
        }
    }

    pub async fn append(
        &self,
        owner: &str,
        ns: &str,
        data: impl Into<Bytes>,
        max_items: Option<usize>,
    ) -> Result<(), XdbError> {
        match self {
            Store::Xdb(x) => x.append(owner, ns, data, max_items).await,
            #[cfg(test)]
            Store::Memory(m) => m.lock().unwrap().append(owner, ns, data.into(), max_items),
        }
    }

    pub async fn archive_query(
        &self,
        owner: &str,
        ns: &str,
        query: &Query,
    ) -> Result<Page, XdbError> {
        match self {
            Store::Xdb(x) => x.archive_query(owner, ns, query).await,
            #[cfg(test)]
            Store::Memory(m) => {
                let m = m.lock().unwrap();
                jrs_xdb::archive::select(m.archive(owner, ns), query).map_err(XdbError::Refused)
            }
        }
    }

    pub async fn archive_trim(
        &self,
        owner: &str,
        ns: &str,
        retention: Retention,
    ) -> Result<(), XdbError> {
        match self {
            Store::Xdb(x) => x.archive_trim(owner, ns, retention).await,
            #[cfg(test)]
            Store::Memory(m) => {
                m.lock().unwrap().archive_trim(owner, ns, retention);
                Ok(())
            }
        }
    }
}

#[cfg(test)]
pub mod memory {
    use std::collections::HashMap;

    use bytes::Bytes;

    use jrs_stream::StanzaErrorCondition;
    use jrs_xdb::archive::{Item, Retention};
    use jrs_xdb::{Refusal, XdbError};

    use crate::xml::Element;

    #[derive(Default)]
    pub struct Memory {
        fragments: HashMap<(String, String), Bytes>,
        archives: HashMap<(String, String), Vec<Item>>,
    }

    fn key(owner: &str, ns: &str) -> (String, String) {
        (owner.to_owned(), ns.to_owned())
    }

    impl Memory {
        pub fn get(&self, owner: &str, ns: &str) -> Bytes {
            self.fragments
                .get(&key(owner, ns))
                .cloned()
                .unwrap_or_default()
        }

        pub fn set(&mut self, owner: &str, ns: &str, data: Bytes) {
            self.fragments.insert(key(owner, ns), data);
        }

        pub fn delete(&mut self, owner: &str, ns: &str) {
            if ns == "*" {
                self.fragments.retain(|(o, _), _| o != owner);
                self.archives.retain(|(o, _), _| o != owner);
            } else {
                self.fragments.remove(&key(owner, ns));
                self.archives.remove(&key(owner, ns));
            }
        }

        pub fn append(
            &mut self,
            owner: &str,
            ns: &str,
            data: Bytes,
            max: Option<usize>,
        ) -> Result<(), XdbError> {
            let old = self.get(owner, ns);
            let count = |b: &[u8]| Element::parse_fragment(b, "").map(|v| v.len()).unwrap_or(0);
            if max.is_some_and(|m| count(&old) + count(&data) > m) {
                return Err(XdbError::Refused(Refusal::new(
                    StanzaErrorCondition::ResourceConstraint,
                    "the list is full",
                )));
            }
            let mut all = old.to_vec();
            all.extend_from_slice(&data);
            self.set(owner, ns, all.into());
            Ok(())
        }

        pub fn archive(&self, owner: &str, ns: &str) -> &[Item] {
            self.archives
                .get(&key(owner, ns))
                .map(Vec::as_slice)
                .unwrap_or(&[])
        }

        pub fn archive_append(&mut self, owner: &str, ns: &str, items: &[Item], r: Retention) {
            let a = self.archives.entry(key(owner, ns)).or_default();
            for i in items {
                if !a.iter().any(|x| x.id == i.id) {
                    a.push(i.clone());
                }
            }
            self.archive_trim(owner, ns, r);
        }

        pub fn archive_trim(&mut self, owner: &str, ns: &str, r: Retention) {
            if let Some(a) = self.archives.get_mut(&key(owner, ns)) {
                let now = crate::clock::now_micros();
                let first = r.first_kept(a.len(), now, |i| a[i].time);
                a.drain(..first);
            }
        }
    }
}
