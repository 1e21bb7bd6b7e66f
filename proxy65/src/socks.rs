//! The server side of SOCKS5 (RFC 1928) as XEP-0065 uses it: no authentication, one
//! CONNECT whose DST.ADDR is a domain name: the hex SHA-1 of SID + initiator + target.

use anyhow::{bail, Context};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Reply codes (RFC 1928 section 6).
pub const SUCCEEDED: u8 = 0x00;
pub const NOT_ALLOWED: u8 = 0x02;
pub const COMMAND_NOT_SUPPORTED: u8 = 0x07;
pub const ADDRESS_NOT_SUPPORTED: u8 = 0x08;

/// A reply to the CONNECT request, echoing the address (as XEP-0065 asks).
pub fn reply(code: u8, addr: &str) -> Vec<u8> {
    let mut r = vec![5, code, 0, 3, addr.len() as u8];
    r.extend_from_slice(addr.as_bytes());
    r.extend_from_slice(&[0, 0]);
    r
}

/// Whether `s` is what DST.ADDR must be: 40 hex digits (lower-cased by the caller).
pub fn is_sha1_hex(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Reads the method selection and the CONNECT request, answering the first and refusing
/// a bad second; returns DST.ADDR (lower-case hex). The caller answers a good request.
pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> anyhow::Result<String> {
    let mut head = [0u8; 2];
    s.read_exact(&mut head)
        .await
        .context("reading the greeting")?;
    if head[0] != 5 {
        bail!("not SOCKS5 (version {})", head[0]);
    }
    let mut methods = vec![0u8; head[1] as usize];
    s.read_exact(&mut methods)
        .await
        .context("reading the methods")?;
    if !methods.contains(&0) {
        s.write_all(&[5, 0xff]).await?;
        bail!("the client offers no method without authentication");
    }
    s.write_all(&[5, 0]).await?;
    let mut req = [0u8; 4];
    s.read_exact(&mut req)
        .await
        .context("reading the request")?;
    if req[0] != 5 {
        bail!("not SOCKS5 (version {})", req[0]);
    }
    let addr = match req[3] {
        3 => {
            let mut len = [0u8; 1];
            s.read_exact(&mut len).await?;
            let mut a = vec![0u8; len[0] as usize];
            s.read_exact(&mut a).await?;
            String::from_utf8_lossy(&a).to_ascii_lowercase()
        }
        other => {
            s.write_all(&reply(ADDRESS_NOT_SUPPORTED, "")).await?;
            bail!("address type {other}: only domain names (3) are used by XEP-0065");
        }
    };
    let mut port = [0u8; 2];
    s.read_exact(&mut port).await?;
    if req[1] != 1 {
        s.write_all(&reply(COMMAND_NOT_SUPPORTED, "")).await?;
        bail!("command {}: only CONNECT (1) is supported", req[1]);
    }
    if !is_sha1_hex(&addr) {
        s.write_all(&reply(NOT_ALLOWED, "")).await?;
        bail!("DST.ADDR is not a hex SHA-1");
    }
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "0123456789abcdef0123456789abcdef01234567";

    async fn run(client_sends: Vec<u8>) -> (anyhow::Result<String>, Vec<u8>) {
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(&client_sends).await.unwrap();
        client.shutdown().await.unwrap();
        let result = handshake(&mut server).await;
        drop(server);
        let mut got = vec![];
        client.read_to_end(&mut got).await.unwrap();
        (result, got)
    }

    fn request(cmd: u8, atyp: u8, addr: &[u8]) -> Vec<u8> {
        let mut v = vec![5, 1, 0, 5, cmd, 0, atyp];
        if atyp == 3 {
            v.push(addr.len() as u8);
        }
        v.extend_from_slice(addr);
        v.extend_from_slice(&[0, 0]);
        v
    }

    #[tokio::test]
    async fn connect_with_a_hash() {
        let upper = HASH.to_ascii_uppercase();
        let (r, got) = run(request(1, 3, upper.as_bytes())).await;
        assert_eq!(r.unwrap(), HASH);
        assert_eq!(got, [5, 0]);
        assert_eq!(reply(SUCCEEDED, HASH).len(), 5 + 40 + 2);
    }

    #[tokio::test]
    async fn refusals() {
        let (r, got) = run(vec![5, 1, 2]).await;
        assert!(r.is_err());
        assert_eq!(got, [5, 0xff]);
        let (r, _) = run(vec![4, 1, 0]).await;
        assert!(r.unwrap_err().to_string().contains("not SOCKS5"));
        let (r, got) = run(request(2, 3, HASH.as_bytes())).await;
        assert!(r.is_err());
        assert_eq!(got[2..4], [5, COMMAND_NOT_SUPPORTED]);
        let (r, got) = run(request(1, 1, &[127, 0, 0, 1])).await;
        assert!(r.is_err());
        assert_eq!(got[2..4], [5, ADDRESS_NOT_SUPPORTED]);
        let (r, got) = run(request(1, 3, b"example.com")).await;
        assert!(r.is_err());
        assert_eq!(got[2..4], [5, NOT_ALLOWED]);
        let (r, _) = run(vec![5, 1]).await;
        assert!(r.is_err());
    }
}
