//! Software version (XEP-0092) of the server.

use std::sync::Arc;

use xmpp_parsers::ns::VERSION as NS_VERSION;
use xmpp_parsers::version::VersionResult;

use crate::config::SmConfig;
use crate::host::{Declaration, Disco, Iq, IqKind, Module, Reply, Scope, User};

pub struct Version;

pub fn load_module(_config: &SmConfig) -> jrs_config::Result<Arc<dyn Module>> {
    Ok(Arc::new(Version))
}

#[async_trait::async_trait]
impl Module for Version {
    fn name(&self) -> &'static str {
        "version"
    }

    fn declare(&self) -> Declaration {
        Declaration::default()
            .iq(IqKind::Get, &[Scope::Server], NS_VERSION, "query")
            .feature(Disco::Server, NS_VERSION)
    }

    async fn iq(&self, _u: &mut User, _iq: &Iq) -> Reply {
        Reply::typed(VersionResult {
            name: "jabberd-rs".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            os: Some(std::env::consts::OS.into()),
        })
    }
}
