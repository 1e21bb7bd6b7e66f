//! Channel binding data of a client's TLS connection: `tls-exporter` (RFC 9266, from
//! the transport) and `tls-server-end-point` (RFC 5929 4.1: the hash of our certificate,
//! SHA-256 unless the certificate is signed with SHA-384 or SHA-512).

use std::collections::HashMap;

use sha2::{Digest, Sha256, Sha384, Sha512};

use jrs_sx::Transport;

use crate::config::Host;

pub const CB_TLS_EXPORTER: &str = "tls-exporter";
pub const CB_TLS_SERVER_END_POINT: &str = "tls-server-end-point";

/// Channel binding data of a stream, per type.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChannelBinding {
    /// RFC 9266, TLS 1.3 only.
    pub exporter: Option<Vec<u8>>,
    /// RFC 5929: the hash of our certificate.
    pub endpoint: Option<Vec<u8>>,
}

impl ChannelBinding {
    pub fn data(&self, kind: &str) -> Option<&[u8]> {
        match kind {
            CB_TLS_EXPORTER => self.exporter.as_deref(),
            CB_TLS_SERVER_END_POINT => self.endpoint.as_deref(),
            _ => None,
        }
    }

    /// The types we can bind to, as XEP-0440 lists them.
    pub fn types(&self) -> Vec<&'static str> {
        let mut t = vec![];
        if self.endpoint.is_some() {
            t.push(CB_TLS_SERVER_END_POINT);
        }
        if self.exporter.is_some() {
            t.push(CB_TLS_EXPORTER);
        }
        t
    }

    pub fn any(&self) -> bool {
        self.exporter.is_some() || self.endpoint.is_some()
    }
}

/// What a transport can bind to.
/// `endpoints`: the end-point hash of each host's certificate as now loaded (`Tls`).
pub fn of(
    transport: &Transport,
    endpoints: &HashMap<String, Vec<u8>>,
    hosts: &[Host],
) -> ChannelBinding {
    if !matches!(
        transport,
        Transport::TlsServer(_) | Transport::Tls13Server(_)
    ) {
        return ChannelBinding::default();
    }
    // The certificate served is the one of the name the client sent (SNI), or the first
    // host's (as the resolver does).
    let sni = transport.server_name();
    let name = sni
        .filter(|n| hosts.iter().any(|h| &h.name == n))
        .or_else(|| hosts.first().map(|h| h.name.clone()));
    ChannelBinding {
        exporter: transport.exporter(),
        endpoint: name.and_then(|n| endpoints.get(&n).cloned()),
    }
}

/// RFC 5929 4.1: hash the DER certificate with its signature's hash, SHA-256 for MD5,
/// SHA-1 and anything else (as for Ed25519, which has none).
pub fn end_point_hash(der: &[u8]) -> Vec<u8> {
    match signature_oid(der).as_deref() {
        // sha384WithRSAEncryption, ecdsa-with-SHA384
        Some([42, 134, 72, 134, 247, 13, 1, 1, 12]) | Some([42, 134, 72, 206, 61, 4, 3, 3]) => {
            Sha384::digest(der).to_vec()
        }
        // sha512WithRSAEncryption, ecdsa-with-SHA512
        Some([42, 134, 72, 134, 247, 13, 1, 1, 13]) | Some([42, 134, 72, 206, 61, 4, 3, 4]) => {
            Sha512::digest(der).to_vec()
        }
        _ => Sha256::digest(der).to_vec(),
    }
}

/// The signatureAlgorithm OID of a certificate (`SEQUENCE { tbs, SEQUENCE { OID .. }, .. }`).
fn signature_oid(der: &[u8]) -> Option<Vec<u8>> {
    let (_, cert, _) = tlv(der)?;
    let (_, _tbs, rest) = tlv(cert)?;
    let (_, alg, _) = tlv(rest)?;
    let (tag, oid, _) = tlv(alg)?;
    (tag == 6).then(|| oid.to_vec())
}

/// One DER element: its tag, contents and what follows.
fn tlv(data: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *data.first()?;
    let first = *data.get(1)?;
    let (len, start) = if first < 0x80 {
        (first as usize, 2)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for b in data.get(2..2 + n)? {
            len = (len << 8) | *b as usize;
        }
        (len, 2 + n)
    };
    let end = start.checked_add(len)?;
    Some((tag, data.get(start..end)?, data.get(end..)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_with_the_signature_hash() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["example.org".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let der = cert.der().to_vec();
        assert_eq!(end_point_hash(&der), Sha384::digest(&der).to_vec());
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["example.org".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let der = cert.der().to_vec();
        assert_eq!(end_point_hash(&der), Sha256::digest(&der).to_vec());
        assert_eq!(end_point_hash(b"junk"), Sha256::digest(b"junk").to_vec());
    }
}
