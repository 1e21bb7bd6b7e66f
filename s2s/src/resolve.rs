//! Where to connect for a remote domain: the static map of `s2s.xml`, else DNS SRV
//! records (`_xmpps-server._tcp` for direct TLS, XEP-0368, and `_xmpp-server._tcp` for
//! STARTTLS, RFC 6120 3.2), else the domain's own A/AAAA records on port 5269.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::config::{
    ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::TokioResolver;
use rand::Rng;

use crate::config::{Target, TlsMode};

/// The outcome of looking a domain up.
#[derive(Debug, PartialEq, Eq)]
pub enum Resolution {
    /// Connect to these, in order.
    Targets(Vec<Target>),
    /// The domain says it offers no XMPP service (an SRV target of `.`), or the name does
    /// not exist.
    NoService(String),
}

/// One SRV record, as far as ordering is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Srv {
    pub priority: u16,
    pub weight: u16,
    pub target: String,
    pub port: u16,
    pub mode: TlsMode,
}

pub struct Resolver {
    dns: TokioResolver,
    routes: HashMap<String, Vec<Target>>,
}

impl Resolver {
    /// A resolver asking `nameservers` (the system's when empty), with `routes` overriding
    /// DNS.
    pub fn new(
        nameservers: &[SocketAddr],
        routes: HashMap<String, Vec<Target>>,
    ) -> anyhow::Result<Resolver> {
        let provider = TokioRuntimeProvider::default();
        let mut builder = if nameservers.is_empty() {
            TokioResolver::builder(provider)?
        } else {
            let servers = nameservers
                .iter()
                .map(|addr| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = addr.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = addr.port();
                    NameServerConfig::new(addr.ip(), true, vec![udp, tcp])
                })
                .collect();
            let config = ResolverConfig::from_parts(None, vec![], servers);
            let mut b = TokioResolver::builder_with_config(config, provider);
            *b.options_mut() = ResolverOpts::default();
            b
        };
        let opts = builder.options_mut();
        opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        opts.timeout = Duration::from_secs(3);
        opts.attempts = 1;
        Ok(Resolver {
            dns: builder.build()?,
            routes,
        })
    }

    /// Where to connect for `domain`.
    pub async fn targets(&self, domain: &str) -> anyhow::Result<Resolution> {
        if let Some(targets) = self.routes.get(domain) {
            return Ok(Resolution::Targets(targets.clone()));
        }
        let fqdn = format!("{}.", domain.trim_end_matches('.'));
        let (direct_name, starttls_name) = (
            format!("_xmpps-server._tcp.{fqdn}"),
            format!("_xmpp-server._tcp.{fqdn}"),
        );
        let direct = self.srv(&direct_name, TlsMode::Direct);
        let starttls = self.srv(&starttls_name, TlsMode::StartTls);
        let (direct, starttls) = tokio::join!(direct, starttls);
        let (direct, starttls) = (direct?, starttls?);
        if direct.is_none() && starttls.is_none() {
            // No SRV record at all: the domain itself, port 5269 (RFC 6120 3.2.2).
            return Ok(Resolution::Targets(vec![Target {
                host: domain.to_owned(),
                port: 5269,
                mode: TlsMode::StartTls,
            }]));
        }
        let records: Vec<Srv> = direct
            .into_iter()
            .flatten()
            .chain(starttls.into_iter().flatten())
            .collect();
        let ordered = order(records, &mut rand::rng());
        if ordered.is_empty() {
            return Ok(Resolution::NoService(format!(
                "{domain} publishes SRV records with target '.': no XMPP service"
            )));
        }
        Ok(Resolution::Targets(
            ordered
                .into_iter()
                .map(|s| Target {
                    host: s.target,
                    port: s.port,
                    mode: s.mode,
                })
                .collect(),
        ))
    }

    /// The SRV records at `name`: `None` when there are none (no such name or no
    /// record), `Some(vec![])` when the only record says "no service" (target `.`).
    async fn srv(&self, name: &str, mode: TlsMode) -> anyhow::Result<Option<Vec<Srv>>> {
        let lookup = match self.dns.srv_lookup(name).await {
            Ok(l) => l,
            Err(e) if e.is_no_records_found() || e.is_nx_domain() => return Ok(None),
            Err(e) => return Err(anyhow::anyhow!("SRV lookup of {name}: {e}")),
        };
        let mut out = vec![];
        let mut any = false;
        for record in lookup.answers() {
            if let RData::SRV(srv) = &record.data {
                any = true;
                if srv.target.is_root() {
                    continue;
                }
                out.push(Srv {
                    priority: srv.priority,
                    weight: srv.weight,
                    target: srv.target.to_ascii().trim_end_matches('.').to_owned(),
                    port: srv.port,
                    mode,
                });
            }
        }
        Ok(any.then_some(out))
    }

    /// The addresses of `host` (IPv4 and IPv6); an IP literal is itself.
    pub async fn addresses(&self, host: &str) -> anyhow::Result<Vec<IpAddr>> {
        if let Ok(ip) = host
            .trim_matches(|c| c == '[' || c == ']')
            .parse::<IpAddr>()
        {
            return Ok(vec![ip]);
        }
        let fqdn = format!("{}.", host.trim_end_matches('.'));
        match self.dns.lookup_ip(fqdn.as_str()).await {
            Ok(ips) => Ok(ips.iter().collect()),
            Err(e) if e.is_no_records_found() || e.is_nx_domain() => Ok(vec![]),
            Err(e) => Err(anyhow::anyhow!("address lookup of {host}: {e}")),
        }
    }
}

/// RFC 2782 order: by priority, and within one priority a weighted random order (a
/// record's chance to come first is its share of the weights). At equal priority direct
/// TLS records come before STARTTLS ones (XEP-0368 4).
pub fn order(mut records: Vec<Srv>, rng: &mut impl Rng) -> Vec<Srv> {
    records.sort_by_key(|r| (r.priority, r.mode == TlsMode::StartTls));
    let mut out = Vec::with_capacity(records.len());
    let mut rest = records.as_slice();
    while let Some(first) = rest.first() {
        let n = rest
            .iter()
            .take_while(|r| r.priority == first.priority && r.mode == first.mode)
            .count();
        let (group, tail) = rest.split_at(n);
        let mut group: Vec<Srv> = group.to_vec();
        // Weight-0 records first, as RFC 2782 asks, so they are picked only by chance 0.
        group.sort_by_key(|r| r.weight != 0);
        while !group.is_empty() {
            let total: u32 = group.iter().map(|r| r.weight as u32).sum();
            let pick = rng.random_range(0..=total);
            let mut running = 0u32;
            let index = group
                .iter()
                .position(|r| {
                    running += r.weight as u32;
                    running >= pick
                })
                .unwrap_or(0);
            out.push(group.remove(index));
        }
        rest = tail;
    }
    out
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use hickory_resolver::proto::op::{Message, MessageType, ResponseCode};
    use hickory_resolver::proto::rr::rdata::{A, SRV};
    use hickory_resolver::proto::rr::{Name, Record, RecordType};
    use hickory_resolver::proto::serialize::binary::{BinDecodable, BinEncodable};
    use std::net::Ipv4Addr;
    use std::str::FromStr;
    use tokio::net::UdpSocket;

    fn srv(priority: u16, weight: u16, target: &str, mode: TlsMode) -> Srv {
        Srv {
            priority,
            weight,
            target: target.into(),
            port: 5269,
            mode,
        }
    }

    #[test]
    fn orders_by_priority_then_weight() {
        let mut rng = rand::rng();
        let mut first_heavy = 0;
        const DRAWS: u32 = 4000;
        for _ in 0..DRAWS {
            let o = order(
                vec![
                    srv(20, 0, "last", TlsMode::StartTls),
                    srv(10, 1, "light", TlsMode::StartTls),
                    srv(10, 9, "heavy", TlsMode::StartTls),
                    srv(10, 5, "direct", TlsMode::Direct),
                    srv(5, 0, "first", TlsMode::StartTls),
                ],
                &mut rng,
            );
            let names: Vec<&str> = o.iter().map(|s| s.target.as_str()).collect();
            assert_eq!(names[0], "first");
            assert_eq!(names[1], "direct");
            assert_eq!(names[4], "last");
            if names[2] == "heavy" {
                first_heavy += 1;
            }
        }
        // RFC 2782 picks a number in 0..=10 and "light" covers 0 and 1: heavy first with
        // probability 9/11 (3273 of 4000, standard deviation 24). The bounds are far
        // outside chance, so the test does not flake, yet catch a weight ignored or
        // inverted (2000 or less).
        assert!(
            (2900..3600).contains(&first_heavy),
            "heavy first {first_heavy} times of {DRAWS}"
        );
    }

    /// A DNS server on loopback answering from a table: (name, type) -> records.
    pub struct FakeDns {
        pub addr: SocketAddr,
    }

    impl FakeDns {
        pub async fn start(records: Vec<Record>) -> FakeDns {
            let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let addr = socket.local_addr().unwrap();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                loop {
                    let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
                        return;
                    };
                    let Ok(query) = Message::from_bytes(&buf[..n]) else {
                        continue;
                    };
                    let mut answer = Message::response(query.metadata.id, query.metadata.op_code);
                    answer.metadata.recursion_desired = true;
                    answer.metadata.recursion_available = true;
                    answer.metadata.message_type = MessageType::Response;
                    let mut found = false;
                    for q in &query.queries {
                        answer.add_query(q.clone());
                        for r in &records {
                            if &r.name == q.name() && r.record_type() == q.query_type() {
                                answer.add_answer(r.clone());
                                found = true;
                            }
                        }
                        if !found && records.iter().all(|r| &r.name != q.name()) {
                            answer.metadata.response_code = ResponseCode::NXDomain;
                        }
                    }
                    let _ = socket.send_to(&answer.to_bytes().unwrap(), peer).await;
                }
            });
            FakeDns { addr }
        }
    }

    pub fn srv_record(name: &str, priority: u16, weight: u16, port: u16, target: &str) -> Record {
        Record::from_rdata(
            Name::from_str(name).unwrap(),
            60,
            RData::SRV(SRV::new(
                priority,
                weight,
                port,
                Name::from_str(target).unwrap(),
            )),
        )
    }

    pub fn a_record(name: &str, ip: Ipv4Addr) -> Record {
        Record::from_rdata(Name::from_str(name).unwrap(), 60, RData::A(A(ip)))
    }

    #[tokio::test]
    async fn srv_records_from_a_fake_dns_server() {
        let dns = FakeDns::start(vec![
            srv_record(
                "_xmpp-server._tcp.ordered.test.",
                20,
                0,
                5002,
                "late.ordered.test.",
            ),
            srv_record(
                "_xmpp-server._tcp.ordered.test.",
                10,
                0,
                5001,
                "early.ordered.test.",
            ),
            srv_record(
                "_xmpps-server._tcp.ordered.test.",
                10,
                0,
                5003,
                "tls.ordered.test.",
            ),
            srv_record("_xmpp-server._tcp.none.test.", 0, 0, 0, "."),
            a_record("plain.test.", Ipv4Addr::new(127, 0, 0, 9)),
            a_record("early.ordered.test.", Ipv4Addr::new(127, 0, 0, 7)),
        ])
        .await;
        let r = Resolver::new(&[dns.addr], HashMap::new()).unwrap();
        let Resolution::Targets(t) = r.targets("ordered.test").await.unwrap() else {
            panic!("no targets");
        };
        let got: Vec<(&str, u16, TlsMode)> = t
            .iter()
            .map(|t| (t.host.as_str(), t.port, t.mode))
            .collect();
        assert_eq!(
            got,
            vec![
                ("tls.ordered.test", 5003, TlsMode::Direct),
                ("early.ordered.test", 5001, TlsMode::StartTls),
                ("late.ordered.test", 5002, TlsMode::StartTls),
            ]
        );
        assert_eq!(
            r.addresses("early.ordered.test").await.unwrap(),
            vec![IpAddr::from([127, 0, 0, 7])]
        );
        assert!(matches!(
            r.targets("none.test").await.unwrap(),
            Resolution::NoService(_)
        ));
        // No SRV: the domain itself on 5269.
        let Resolution::Targets(t) = r.targets("plain.test").await.unwrap() else {
            panic!("no fallback");
        };
        assert_eq!(t.len(), 1);
        assert_eq!((t[0].host.as_str(), t[0].port), ("plain.test", 5269));
        assert_eq!(
            r.addresses("plain.test").await.unwrap(),
            vec![IpAddr::from([127, 0, 0, 9])]
        );
        assert!(r.addresses("nowhere.test").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn static_map_overrides_dns() {
        let mut routes = HashMap::new();
        routes.insert(
            "mapped.test".to_owned(),
            vec![Target {
                host: "127.0.0.1".into(),
                port: 7,
                mode: TlsMode::StartTls,
            }],
        );
        let dns = FakeDns::start(vec![]).await;
        let r = Resolver::new(&[dns.addr], routes).unwrap();
        let Resolution::Targets(t) = r.targets("mapped.test").await.unwrap() else {
            panic!();
        };
        assert_eq!(t[0].port, 7);
        let _ = RecordType::A;
    }
}
