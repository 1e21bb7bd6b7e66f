//! Running the chains: each hook's modules in priority order, until one handles the
//! stanza (for the chains that can stop).

use tracing::warn;

use crate::host::kernel::{Change, Flow, Hook, Stanzas, User};
use crate::host::packet::Packet;
use crate::host::session::{Session, SessionKey};

pub async fn outbound(u: &mut User, from: SessionKey, p: &mut Packet) -> Flow {
    let ctx = u.ctx.clone();
    for m in ctx
        .modules
        .stanza_chain(Hook::Outbound, Stanzas::of(p.name()))
    {
        if m.outbound(u, from, p).await == Flow::Handled {
            return Flow::Handled;
        }
    }
    Flow::Pass
}

pub async fn inbound(u: &mut User, p: &mut Packet) -> Flow {
    let ctx = u.ctx.clone();
    for m in ctx
        .modules
        .stanza_chain(Hook::Inbound, Stanzas::of(p.name()))
    {
        if m.inbound(u, p).await == Flow::Handled {
            return Flow::Handled;
        }
    }
    Flow::Pass
}

pub async fn delivered(u: &mut User, p: &Packet, to: &[SessionKey]) {
    let ctx = u.ctx.clone();
    for m in ctx.modules.chain(Hook::Delivered) {
        m.delivered(u, p, to).await;
    }
}

pub async fn undeliverable(u: &mut User, p: &Packet) -> Flow {
    let ctx = u.ctx.clone();
    for m in ctx.modules.chain(Hook::Undeliverable) {
        if m.undeliverable(u, p).await == Flow::Handled {
            return Flow::Handled;
        }
    }
    Flow::Pass
}

pub async fn session_started(u: &mut User, s: SessionKey) {
    let ctx = u.ctx.clone();
    for m in ctx.modules.chain(Hook::SessionStarted) {
        m.session_started(u, s).await;
    }
}

pub async fn session_restored(
    u: &mut User,
    s: SessionKey,
    state: &crate::host::kernel::SessionState,
) {
    let ctx = u.ctx.clone();
    for m in ctx.modules.chain(Hook::SessionRestored) {
        m.session_restored(u, s, state).await;
    }
}

pub async fn session_ended(u: &mut User, s: &Session) {
    let ctx = u.ctx.clone();
    for m in ctx.modules.chain(Hook::SessionEnded) {
        m.session_ended(u, s).await;
    }
}

pub async fn initial_presence(u: &mut User, s: SessionKey) {
    let ctx = u.ctx.clone();
    for m in ctx.modules.chain(Hook::InitialPresence) {
        m.initial_presence(u, s).await;
    }
}

pub async fn account_removing(u: &mut User) {
    let ctx = u.ctx.clone();
    for m in ctx.modules.chain(Hook::AccountRemoving) {
        m.account_removing(u).await;
    }
}

pub async fn account_removed(u: &mut User) {
    let ctx = u.ctx.clone();
    for m in ctx.modules.chain(Hook::AccountRemoved) {
        m.account_removed(u).await;
    }
}

pub async fn undelivered(u: &mut User, p: &Packet) -> Flow {
    let ctx = u.ctx.clone();
    for m in ctx.modules.chain(Hook::Undelivered) {
        if m.undelivered(u, p).await == Flow::Handled {
            return Flow::Handled;
        }
    }
    Flow::Pass
}

pub async fn offline_confirmed(u: &mut User, s: SessionKey, count: usize) {
    let ctx = u.ctx.clone();
    for m in ctx.modules.chain(Hook::OfflineConfirmed) {
        m.offline_confirmed(u, s, count).await;
    }
}

/// How deep changes made by [`Hook::Stored`] handlers may set off further ones (a
/// conversion writes the other forms, which run the hook again): past it the chain is
/// not run, so two modules that mirror each other cannot loop.
const MAX_STORED_DEPTH: usize = 4;

/// The depth of [`stored`] calls on the user's task (user state).
#[derive(Default)]
struct StoredDepth(usize);

pub async fn stored(u: &mut User, change: Change<'_>) {
    let ctx = u.ctx.clone();
    let chain = ctx.modules.chain(Hook::Stored);
    if chain.is_empty() {
        return;
    }
    let depth = u.state.entry::<StoredDepth>().0;
    if depth >= MAX_STORED_DEPTH {
        warn!(by = ?change.by, "changes set off too many others: not followed");
        return;
    }
    u.state.entry::<StoredDepth>().0 = depth + 1;
    for m in chain {
        m.stored(u, &change).await;
    }
    u.state.entry::<StoredDepth>().0 = depth;
}
