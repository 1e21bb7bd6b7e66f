//! Entity time (XEP-0202): the server keeps UTC.

use std::sync::Arc;

use xmpp_parsers::ns::TIME as NS_TIME;

use crate::clock::{stamp, unix_now};
use crate::config::SmConfig;
use crate::host::{Declaration, Disco, Iq, IqKind, Module, Reply, Scope, User};
use crate::xml::Element;

pub struct Time;

pub fn load_module(_config: &SmConfig) -> jrs_config::Result<Arc<dyn Module>> {
    Ok(Arc::new(Time))
}

#[async_trait::async_trait]
impl Module for Time {
    fn name(&self) -> &'static str {
        "time"
    }

    fn declare(&self) -> Declaration {
        Declaration::default()
            .iq(IqKind::Get, &[Scope::Server], NS_TIME, "time")
            .feature(Disco::Server, NS_TIME)
    }

    async fn iq(&self, _u: &mut User, _iq: &Iq) -> Reply {
        Reply::with(
            Element::new("time", NS_TIME)
                .with_child(Element::new("tzo", NS_TIME).with_text("+00:00"))
                .with_child(Element::new("utc", NS_TIME).with_text(stamp(unix_now()))),
        )
    }
}
