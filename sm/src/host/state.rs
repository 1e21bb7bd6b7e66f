//! Typed state that modules keep on a user or a session, without a field in a shared
//! struct for each feature: one value per type, found by its `TypeId` (as
//! `http::Extensions` does). Most users and sessions hold a handful, so a short vector
//! searched in order is both smaller and faster than a map.

use std::any::{Any, TypeId};

#[derive(Default)]
pub struct State {
    slots: Vec<(TypeId, Box<dyn Any + Send + Sync>)>,
}

impl State {
    pub fn get<T: Any + Send + Sync>(&self) -> Option<&T> {
        let id = TypeId::of::<T>();
        self.slots
            .iter()
            .find(|(t, _)| *t == id)
            .and_then(|(_, v)| v.downcast_ref())
    }

    pub fn get_mut<T: Any + Send + Sync>(&mut self) -> Option<&mut T> {
        let id = TypeId::of::<T>();
        self.slots
            .iter_mut()
            .find(|(t, _)| *t == id)
            .and_then(|(_, v)| v.downcast_mut())
    }

    /// The value of type `T`, made with `Default` when there is none yet.
    pub fn entry<T: Any + Send + Sync + Default>(&mut self) -> &mut T {
        let id = TypeId::of::<T>();
        let at = match self.slots.iter().position(|(t, _)| *t == id) {
            Some(at) => at,
            None => {
                self.slots.push((id, Box::new(T::default())));
                self.slots.len() - 1
            }
        };
        self.slots[at]
            .1
            .downcast_mut()
            .expect("slot holds its type")
    }

    pub fn insert<T: Any + Send + Sync>(&mut self, value: T) {
        let id = TypeId::of::<T>();
        match self.slots.iter_mut().find(|(t, _)| *t == id) {
            Some(slot) => slot.1 = Box::new(value),
            None => self.slots.push((id, Box::new(value))),
        }
    }

    pub fn remove<T: Any + Send + Sync>(&mut self) -> Option<T> {
        let id = TypeId::of::<T>();
        let at = self.slots.iter().position(|(t, _)| *t == id)?;
        self.slots
            .swap_remove(at)
            .1
            .downcast()
            .ok()
            .map(|b: Box<T>| *b)
    }
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "State({} values)", self.slots.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default, Debug, PartialEq)]
    struct Carbons(bool);
    #[derive(Default, Debug, PartialEq)]
    struct Directed(Vec<String>);

    #[test]
    fn one_value_per_type() {
        let mut s = State::default();
        assert!(s.get::<Carbons>().is_none());
        s.entry::<Carbons>().0 = true;
        s.entry::<Directed>().0.push("a".into());
        assert_eq!(s.get::<Carbons>(), Some(&Carbons(true)));
        s.insert(Carbons(false));
        assert_eq!(s.get::<Carbons>(), Some(&Carbons(false)));
        assert_eq!(s.remove::<Directed>(), Some(Directed(vec!["a".into()])));
        assert!(s.get::<Directed>().is_none());
        assert_eq!(s.get::<Carbons>(), Some(&Carbons(false)));
    }
}
