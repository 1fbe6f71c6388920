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
    let (id, name) = match parse_query(query) {
        Ok(q) => q,
        Err(answer) => return answer,
    };
    if !net.allows(&name).await {
        tracing::debug!(name = %name, "lookup refused by the network policy");
        return reply_code(query, ResponseCode::Refused);
    }
    let Some(reply) = forward(net.upstreams(), query, id, tcp).await else {
        return reply_code(query, ResponseCode::ServFail);
    };
    let Some(addrs) = addresses(&name, &reply) else {
        tracing::debug!(name = %name, "an upstream answer that does not answer the question");
        return reply_code(query, ResponseCode::ServFail);
    };
    net.resolved(&name, addrs).await;
    Some(reply)
}

/// A query's id and the name it asks for (`a.test.`); or what to answer
/// instead (`FORMERR` for anything but one plain question; nothing for
/// what is not a query at all).
pub fn parse_query(query: &[u8]) -> Result<(u16, String), Option<Vec<u8>>> {
    if query.len() > MAX_MESSAGE {
        return Err(None);
    }
    let q = Message::from_vec(query).map_err(|_| None)?;
    if q.message_type() != MessageType::Query {
        return Err(None);
    }
    if q.op_code() != OpCode::Query || q.queries().len() != 1 {
        return Err(refusal(&q, ResponseCode::FormErr));
    }
    Ok((q.id(), q.queries()[0].name().to_ascii()))
}

/// An answer to `query` with no records and `code` (`REFUSED`,
/// `SERVFAIL`).
pub fn reply_code(query: &[u8], code: ResponseCode) -> Option<Vec<u8>> {
    refusal(&Message::from_vec(query).ok()?, code)
}

/// The A records (address, TTL) of an upstream's `reply`, if it is an
/// answer to exactly the question `name` (any case); at most 64.
pub fn addresses(name: &str, reply: &[u8]) -> Option<Vec<(Ipv4Addr, u32)>> {
    let r = Message::from_vec(reply).ok()?;
    let asked = r.queries();
    if r.message_type() != MessageType::Response
        || asked.len() != 1
        || !asked[0].name().to_ascii().eq_ignore_ascii_case(name)
    {
        return None;
    }
    Some(
        r.answers()
            .iter()
            .filter_map(|rec| match rec.data() {
                RData::A(a) => Some((a.0, rec.ttl())),
                _ => None,
            })
            .take(64)
            .collect(),
    )
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
        assert_eq!(
            parse_query(&m.to_vec().unwrap()),
            Ok((7, "b.test.".to_owned()))
        );
        // Two questions: FORMERR.
        m.add_query(Query::query(
            Name::from_ascii("a.test.").unwrap(),
            RecordType::A,
        ));
        let formerr = parse_query(&m.to_vec().unwrap()).unwrap_err().unwrap();
        let f = Message::from_vec(&formerr).unwrap();
        assert_eq!(f.response_code(), ResponseCode::FormErr);
        // An upstream's answer counts only for the question asked.
        let mut a = Message::new();
        a.set_id(7)
            .set_message_type(MessageType::Response)
            .add_query(Query::query(
                Name::from_ascii("A.test.").unwrap(),
                RecordType::A,
            ))
            .add_answer(hickory_proto::rr::Record::from_rdata(
                Name::from_ascii("a.test.").unwrap(),
                60,
                RData::A(hickory_proto::rr::rdata::A::new(10, 0, 0, 1)),
            ));
        let bytes = a.to_vec().unwrap();
        assert_eq!(
            addresses("a.test.", &bytes),
            Some(vec![(Ipv4Addr::new(10, 0, 0, 1), 60)])
        );
        assert_eq!(addresses("b.test.", &bytes), None);
        assert_eq!(addresses("a.test.", b"garbage"), None);
    }
}
