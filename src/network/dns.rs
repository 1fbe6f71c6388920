//! The environment's resolver: every DNS query from the environment
//! reaches it (the table redirects port 53). A denied name gets `REFUSED`;
//! an allowed one goes upstream, and what it resolved to is recorded (and
//! allowed, under an allowlist) before the answer goes back.
//!
//! Queries and upstream answers are hostile bytes: each is parsed whole
//! (`hickory-proto`), one question per query, at most [`MAX_MESSAGE`]
//! bytes, at most [`MAX_INFLIGHT`] lookups at once; anything else is
//! dropped or answered `FORMERR`.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::RData;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

use super::{Network, NetworkError, io_err};

/// Largest query or answer handled (UDP with EDNS stays well below).
const MAX_MESSAGE: usize = 8192;
/// Lookups in flight at once; more wait.
const MAX_INFLIGHT: usize = 256;
/// How long one upstream may take.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);

/// Starts answering on `at` (UDP and TCP).
pub(super) async fn serve(net: Arc<Network>, at: SocketAddr) -> Result<(), NetworkError> {
    let udp = UdpSocket::bind(at)
        .await
        .map_err(io_err(format!("bind the resolver to {at} (udp)")))?;
    let tcp = TcpListener::bind(at)
        .await
        .map_err(io_err(format!("bind the resolver to {at} (tcp)")))?;
    let limit = Arc::new(tokio::sync::Semaphore::new(MAX_INFLIGHT));
    let udp = Arc::new(udp);
    {
        let (net, limit) = (Arc::downgrade(&net), limit.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_MESSAGE];
            loop {
                let Ok((n, peer)) = udp.recv_from(&mut buf).await else {
                    continue;
                };
                let Some(net) = net.upgrade() else { return };
                let Ok(permit) = limit.clone().acquire_owned().await else {
                    return;
                };
                let (query, udp) = (buf[..n].to_vec(), udp.clone());
                tokio::spawn(async move {
                    if let Some(answer) = answer(&net, &query, false).await {
                        let _ = udp.send_to(&answer, peer).await;
                    }
                    drop(permit);
                });
            }
        });
    }
    let net = Arc::downgrade(&net);
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = tcp.accept().await else {
                continue;
            };
            let Some(net) = net.upgrade() else { return };
            let Ok(permit) = limit.clone().acquire_owned().await else {
                return;
            };
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(30), async {
                    // Queries one after another, each with its length.
                    while let Ok(len) = conn.read_u16().await {
                        let mut query = vec![0u8; usize::from(len).min(MAX_MESSAGE)];
                        if usize::from(len) > MAX_MESSAGE
                            || conn.read_exact(&mut query).await.is_err()
                        {
                            return;
                        }
                        let Some(answer) = answer(&net, &query, true).await else {
                            return;
                        };
                        let Ok(n) = u16::try_from(answer.len()) else {
                            return;
                        };
                        if conn.write_u16(n).await.is_err()
                            || conn.write_all(&answer).await.is_err()
                        {
                            return;
                        }
                    }
                })
                .await;
                drop(permit);
            });
        }
    });
    Ok(())
}

/// The answer to `query` (None: not worth one).
async fn answer(net: &Network, query: &[u8], tcp: bool) -> Option<Vec<u8>> {
    let q = Message::from_vec(query).ok()?;
    if q.message_type() != MessageType::Query {
        return None;
    }
    let refuse = |code| refusal(&q, code);
    if q.op_code() != OpCode::Query || q.queries().len() != 1 {
        return refuse(ResponseCode::FormErr);
    }
    let name = q.queries()[0].name().to_ascii();
    if !net.allows(&name).await {
        tracing::debug!(name = %name, "lookup refused by the network policy");
        return refuse(ResponseCode::Refused);
    }
    let Some(reply) = forward(net.upstreams(), query, q.id(), tcp).await else {
        return refuse(ResponseCode::ServFail);
    };
    let addrs: Vec<(Ipv4Addr, u32)> = Message::from_vec(&reply)
        .ok()?
        .answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::A(a) => Some((a.0, r.ttl())),
            _ => None,
        })
        .collect();
    net.resolved(&name, addrs).await;
    Some(reply)
}

/// An answer to `q` with no records and `code`.
fn refusal(q: &Message, code: ResponseCode) -> Option<Vec<u8>> {
    let mut m = Message::error_msg(q.id(), q.op_code(), code);
    m.add_queries(q.queries().iter().cloned());
    m.set_recursion_desired(q.recursion_desired());
    m.set_recursion_available(true);
    m.to_vec().ok()
}

/// `query` sent to each upstream in turn until one answers it.
async fn forward(upstreams: &[SocketAddr], query: &[u8], id: u16, tcp: bool) -> Option<Vec<u8>> {
    for up in upstreams {
        let got = tokio::time::timeout(UPSTREAM_TIMEOUT, async {
            if tcp {
                let mut s = tokio::net::TcpStream::connect(up).await.ok()?;
                s.write_u16(u16::try_from(query.len()).ok()?).await.ok()?;
                s.write_all(query).await.ok()?;
                let len = usize::from(s.read_u16().await.ok()?);
                let mut buf = vec![0u8; len];
                s.read_exact(&mut buf).await.ok()?;
                Some(buf)
            } else {
                let bind: SocketAddr = if up.is_ipv4() {
                    ([0, 0, 0, 0], 0).into()
                } else {
                    (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
                };
                let s = UdpSocket::bind(bind).await.ok()?;
                s.connect(up).await.ok()?;
                s.send(query).await.ok()?;
                let mut buf = vec![0u8; MAX_MESSAGE];
                loop {
                    let n = s.recv(&mut buf).await.ok()?;
                    // Only the answer to this query (a stray one is skipped).
                    if n >= 2 && u16::from_be_bytes([buf[0], buf[1]]) == id {
                        buf.truncate(n);
                        return Some(buf);
                    }
                }
            }
        })
        .await;
        if let Ok(Some(reply)) = got {
            return Some(reply);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use hickory_proto::op::Query;
    use hickory_proto::rr::{Name, RecordType};

    use super::*;

    #[test]
    fn hostile_bytes_do_not_parse_and_refusals_echo_the_question() {
        // Empty, short, garbage, a name pointing at itself: errors, no panic.
        let looped = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c\x00\x01\x00\x01";
        for bytes in [&b""[..], b"\x00", &[0xff; 64], looped] {
            assert!(Message::from_vec(bytes).is_err(), "{bytes:?}");
        }
        let mut m = Message::new();
        m.set_id(7)
            .set_recursion_desired(true)
            .add_query(Query::query(
                Name::from_ascii("b.test.").unwrap(),
                RecordType::A,
            ));
        let q = Message::from_vec(&m.to_vec().unwrap()).unwrap();
        let r = Message::from_vec(&refusal(&q, ResponseCode::Refused).unwrap()).unwrap();
        assert_eq!(r.id(), 7);
        assert_eq!(r.message_type(), MessageType::Response);
        assert_eq!(r.response_code(), ResponseCode::Refused);
        assert_eq!(r.queries()[0].name().to_ascii(), "b.test.");
        assert!(r.answers().is_empty());
    }
}
