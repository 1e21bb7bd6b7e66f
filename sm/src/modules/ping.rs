//! XMPP Ping (XEP-0199): answered for the server and, on their behalf, for accounts.

use std::sync::Arc;

use xmpp_parsers::ns::PING as NS_PING;

use crate::config::SmConfig;
use crate::host::{Declaration, Disco, Iq, IqKind, Module, Reply, Scope, User};

pub struct Ping;

pub fn load_module(_config: &SmConfig) -> jrs_config::Result<Arc<dyn Module>> {
    Ok(Arc::new(Ping))
}

#[async_trait::async_trait]
impl Module for Ping {
    fn name(&self) -> &'static str {
        "ping"
    }

    fn declare(&self) -> Declaration {
        Declaration::default()
            .iq(
                IqKind::Get,
                &[Scope::Server, Scope::Own, Scope::Contact],
                NS_PING,
                "ping",
            )
            .feature(Disco::Server, NS_PING)
            .feature(Disco::Account, NS_PING)
    }

    async fn iq(&self, _u: &mut User, _iq: &Iq) -> Reply {
        Reply::empty()
    }
}
