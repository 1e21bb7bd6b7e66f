//! muc: multi-user chat (XEP-0045) as a component. One task per room; rooms are found
//! by their bare JID, and several instances share a service by the router's hashing of
//! room JIDs. Persistent rooms are kept through xdb. See docs/muc.md.
//!
//! - `link`: the router link's reader; `config`: muc.xml;
//! - `registry`: the room tasks; `room`: a room's state and rules (sans I/O);
//! - `service`: the service's own disco; `store`: what persistent rooms keep;
//! - `directory`: the room directory and rooms per user, shared by the instances;
//! - `xml`: stanza helpers and the broadcast template.

mod config;
mod directory;
mod link;
mod mam;
mod registry;
mod room;
mod service;
mod store;
mod xml;

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use clap::Parser;
use tracing::info;

use jrs_component::service::{
    exit_code, load_and_init, run_component_until_stopped, Bind, CommonArgs,
};
use jrs_component::{Outbox, PacketType};
use jrs_xdb::XdbClient;

use crate::config::{Mode, MucConfig, RoomLimits, Storage};
use crate::directory::Directory;
use crate::registry::Registry;
use crate::store::Store;

jrs_component::server_allocator!();

/// The jabberd-rs group chat service.
#[derive(Parser, Debug)]
#[command(name = "muc", version, about)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
}

/// What every part of the process shares.
pub struct Ctx {
    pub config: MucConfig,
    pub store: Store,
    pub rooms: Registry,
    pub limits: Arc<RoomLimits>,
    pub create_domains: Arc<Vec<String>>,
    /// Input of occupant ids: the link's secret, stable across restarts, never sent.
    pub salt: Arc<str>,
    /// The room directory and the rooms per user (`max-rooms-per-user`), shared by
    /// the instances through storage.
    pub directory: Arc<Directory>,
    /// The directory's start (see `Directory::start`) was begun.
    pub directory_started: AtomicBool,
    link: Mutex<Option<Outbox>>,
}

impl Ctx {
    /// A context with no router link (tests): whatever it sends is dropped, and xdb
    /// storage fails with `LinkDown`.
    #[cfg(test)]
    pub fn detached(config: MucConfig, store: Store) -> Ctx {
        Ctx {
            limits: Arc::new(config.rooms.clone()),
            create_domains: Arc::new(config.create_domains.clone()),
            salt: Arc::from("salt"),
            directory: Arc::new(Directory::for_service(
                &config.service,
                "muc",
                config.max_rooms_per_user,
            )),
            config,
            store,
            rooms: Registry::default(),
            directory_started: AtomicBool::new(false),
            link: Mutex::new(None),
        }
    }

    fn set_link(&self, outbox: Outbox) {
        if let Some(x) = self.store.xdb() {
            x.set_outbox(outbox.clone());
        }
        *self.link.lock().expect("link lock") = Some(outbox);
    }

    /// Queues bytes for the router (dropped when the link is down: the rooms' clients
    /// notice by self-ping).
    pub fn send(&self, bytes: Bytes) {
        if let Some(l) = &*self.link.lock().expect("link lock") {
            l.send(bytes);
        }
    }
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    exit_code(run(args), "muc")
}

fn run(args: Args) -> anyhow::Result<()> {
    let Some(config) = load_and_init(&args.common, MucConfig::load, |c| c.log.clone())? else {
        return Ok(());
    };
    if config.mode == Mode::Plain && args.common.instance.is_some() {
        anyhow::bail!(
            "--instance cannot be used with <plain/>: the component's name is the service's"
        );
    }
    let link = config.router.clone().for_instance(args.common.instance);
    std::sync::LazyLock::force(&jrs_metrics::storage::WAITED);
    let binds = match config.mode {
        // Shared: several instances split the rooms by the router's hashing of the
        // bare room JID.
        Mode::Router => vec![Bind {
            route: PacketType::Normal,
            host: config.service.clone(),
            shared: true,
            fanout: false,
            ns: None,
        }],
        // A plain XEP-0114 component: its name is the service; no bind extension.
        Mode::Plain => vec![],
    };
    let store = match config.storage {
        Storage::Xdb => Store::Xdb(XdbClient::new(link.name.clone(), config.xdb_timeout)),
        Storage::Memory => Store::Memory,
    };
    info!(name = %link.name, service = %config.service, mode = ?config.mode, storage = ?config.storage, "muc starting");
    let limits = config.limits;
    let ctx = Arc::new(Ctx {
        limits: Arc::new(config.rooms.clone()),
        create_domains: Arc::new(config.create_domains.clone()),
        salt: Arc::from(config.router.secret.as_str()),
        directory: Arc::new(Directory::for_service(
            &config.service,
            &link.name,
            config.max_rooms_per_user,
        )),
        config,
        store,
        rooms: Registry::default(),
        directory_started: AtomicBool::new(false),
        link: Mutex::new(None),
    });
    let runtime =
        jrs_component::runtime::build("muc", jrs_component::runtime::Shape::Multi(Some(2)))?;
    let stopping = ctx.clone();
    runtime.block_on(run_component_until_stopped(
        link,
        limits,
        binds,
        |reader, outbox| link::serve(ctx.clone(), reader, outbox),
        // SIGTERM: occupants are told the service goes down (status 332).
        || async move { registry::shut_down(&stopping).await },
    ))
}
