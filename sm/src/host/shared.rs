//! State that modules share across every user of the process (a cache of client
//! capabilities, say): one value per type, installed once when sm starts
//! ([`crate::host::Module::install`]) and found by type afterwards.

use std::any::{Any, TypeId};
use std::sync::Arc;

#[derive(Default)]
pub struct Shared {
    slots: Vec<(TypeId, Arc<dyn Any + Send + Sync>)>,
}

impl Shared {
    pub fn insert<T: Any + Send + Sync>(&mut self, value: Arc<T>) {
        let id = TypeId::of::<T>();
        self.slots.retain(|(t, _)| *t != id);
        self.slots.push((id, value));
    }

    /// The value of type `T`; `None` when the module that installs it is not loaded.
    pub fn get<T: Any + Send + Sync>(&self) -> Option<Arc<T>> {
        let id = TypeId::of::<T>();
        let (_, v) = self.slots.iter().find(|(t, _)| *t == id)?;
        v.clone().downcast().ok()
    }
}
