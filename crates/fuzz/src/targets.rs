//! One module per group of targets; see [`crate::TARGETS`].

pub mod component;
pub mod config;
pub mod dialback;
pub mod disk;
pub mod sasl;
pub mod stanza;
pub mod stream;
pub mod web;
pub mod xdb;
