//! A bounded fuzzer for the parsers that read hostile input: query strings
//! and JSON bodies of requests, request paths (the gateway's mapping and the
//! filesystem API's), checkpoint archives (`archive::import`), memory
//! packs' trailers and page lists, DNS queries and upstream answers, network
//! policies, and the kernel and CRIU records the
//! daemon decodes (pagemap images too). Random and mutated inputs for
//! `SPRITED_FUZZ_SECS` (default 5; CI runs 60): no input may panic, and
//! each parser's promises must hold.

use std::io::Write;
use std::time::{Duration, Instant};

/// xorshift64*: reproducible from the seed printed on failure.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max + 1);
        (0..n).map(|_| self.next() as u8).collect()
    }
    /// Text made of the characters parsers care about.
    fn text(&mut self, max: usize) -> String {
        const ALPHABET: &[&str] = &[
            "a", "b", "/", ".", "..", "%", "%2F", "%00", "=", "&", "+", "?", "#", "\\", "\0", "é",
            "v1", "sprites", "name", "exec", "-", "_", "1", "9", "s", "ms", "true", "{", "}", "\"",
            ":", ",", "[", "]", "null", " ", "\n",
        ];
        let n = self.below(max + 1);
        (0..n)
            .map(|_| ALPHABET[self.below(ALPHABET.len())])
            .collect()
    }
}

fn budget() -> Duration {
    let secs = std::env::var("SPRITED_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5u64);
    Duration::from_secs(secs)
}

/// A zstd tar with the entry names an archive uses and random contents.
fn random_archive(rng: &mut Rng) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    let names = [
        "index.json",
        "meta.json",
        "objects/x",
        "../escape",
        "objects/",
        "a/b",
    ];
    for _ in 0..rng.below(5) {
        let body = if rng.below(2) == 0 {
            rng.text(64).into_bytes()
        } else {
            rng.bytes(256)
        };
        let mut h = tar::Header::new_gnu();
        h.set_size(body.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(match rng.below(6) {
            0 => tar::EntryType::Symlink,
            1 => tar::EntryType::Directory,
            _ => tar::EntryType::Regular,
        });
        let name = names[rng.below(names.len())];
        let _ = h.set_path(name);
        h.set_cksum();
        let _ = tar.append(&h, body.as_slice());
    }
    let raw = tar.into_inner().unwrap_or_default();
    let mut z = zstd::stream::Encoder::new(Vec::new(), 1).unwrap();
    z.write_all(&raw).unwrap();
    let mut out = z.finish().unwrap();
    // Sometimes damage it.
    if rng.below(3) == 0 && !out.is_empty() {
        let at = rng.below(out.len());
        out[at] ^= rng.next() as u8 | 1;
    }
    out
}

#[test]
fn hostile_inputs_never_panic_and_parsers_keep_their_promises() {
    // SPRITED_FUZZ_SEED replays a run (its seed is printed first).
    let seed = std::env::var("SPRITED_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
        | 1;
    eprintln!("fuzz seed {seed} (replay: SPRITED_FUZZ_SEED={seed})");
    let mut rng = Rng(seed);
    let deadline = Instant::now() + budget();
    let store_dir = tempfile::tempdir().unwrap();
    let store = sprited::fs::store::Store::open(store_dir.path()).unwrap();
    let files = sprited::files::Files::new("/nonexistent-root".into());
    let mut rounds = 0u64;
    while Instant::now() < deadline {
        rounds += 1;
        // Query strings.
        let q = rng.text(80);
        let p = sprited::api::params::Params::parse(Some(&q));
        for key in ["cmd", "tty", "n", "t", "path", "", "a"] {
            let _ = p.get(key);
            let _ = p.all(key).count();
            let _ = p.flag(key);
            let _ = p.number(key, 0u32);
            let _ = p.duration(key);
        }
        // JSON bodies.
        let body = rng.text(60);
        let _ = sprited::api::params::json_body::<serde_json::Value>(body.as_bytes());
        // Request paths: the gateway's mapping, the filesystem API's.
        let path = rng.text(40);
        let _ = sprited::api::gateway::map_path(&path, "name");
        let wd = rng.text(20);
        if let Ok(rel) = files.relative(&path, Some(&wd)) {
            assert!(!rel.starts_with('/'), "{path:?} {wd:?} → {rel:?}");
            assert!(
                rel.is_empty()
                    || rel
                        .split('/')
                        .all(|c| !c.is_empty() && c != "." && c != ".."),
                "{path:?} {wd:?} → {rel:?}"
            );
            assert!(!rel.contains('\0'));
        }
        // Kernel and CRIU records.
        let mut peers = std::collections::HashMap::new();
        let _ = sprited::sys::sock_diag::parse_unix_dump(&rng.bytes(200), &mut peers);
        let _ = sprited::criu::stats::parse_dump(&rng.bytes(64));
        let _ = sprited::criu::stats::parse_restore(&rng.bytes(64));
        // Pagemap images (they come back from archives): a valid one,
        // mutated. What parses holds only checked entries, and encodes to
        // an image that parses the same.
        {
            use sprited::criu::pagemap::{self, Entry, PE_PARENT, PE_PRESENT, Pagemap};
            let mut image = pagemap::encode(&Pagemap {
                pages_id: 3,
                entries: vec![
                    Entry {
                        vaddr: 0x1000,
                        nr_pages: 2,
                        flags: PE_PRESENT,
                    },
                    Entry {
                        vaddr: 0x7f00_0000_0000,
                        nr_pages: 300,
                        flags: PE_PARENT,
                    },
                ],
            });
            for _ in 0..=rng.below(4) {
                match rng.below(3) {
                    0 if !image.is_empty() => {
                        let i = rng.below(image.len());
                        image[i] ^= rng.next() as u8;
                    }
                    1 => image.truncate(rng.below(image.len() + 1)),
                    _ => image.extend(rng.bytes(16)),
                }
            }
            if let Ok(p) = pagemap::parse(&image) {
                for e in &p.entries {
                    assert!(e.nr_pages > 0 && e.vaddr % 4096 == 0, "{e:?}");
                    assert!(e.vaddr.checked_add(e.nr_pages * 4096).is_some(), "{e:?}");
                }
                assert_eq!(pagemap::parse(&pagemap::encode(&p)).as_ref(), Ok(&p));
            }
        }
        // DNS queries from the environment and answers from upstream: a
        // valid query of `a.test`, mutated, or random bytes.
        let mut query =
            b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x01a\x04test\x00\x00\x01\x00\x01"
                .to_vec();
        match rng.below(3) {
            0 => query = rng.bytes(300),
            1 => {
                for _ in 0..=rng.below(4) {
                    let i = rng.below(query.len());
                    query[i] ^= rng.next() as u8;
                }
            }
            _ => query.extend(rng.bytes(40)),
        }
        use sprited::network::dns;
        match dns::parse_query(&query) {
            Ok((_, name)) => {
                assert!(name.len() <= 255, "{name:?}");
                let refused = dns::reply_code(&query, hickory_proto::op::ResponseCode::Refused);
                assert!(refused.is_some(), "a parsed query can be refused");
            }
            Err(Some(answer)) => assert!(answer.len() >= 12),
            Err(None) => {}
        }
        let addrs = dns::addresses("a.test.", &query).unwrap_or_default();
        assert!(addrs.len() <= 64);
        // Network policies: the checks and the matching.
        let body = format!(
            r#"{{"rules":[{{"action":"allow","domain":"{}"}}]}}"#,
            rng.text(20)
        );
        if let Ok(p) = sprited::policy::NetworkPolicy::from_request(body.as_bytes()) {
            let _ = p.allows(&rng.text(30));
        }
        // Memory packs and page lists (store objects an archive brings).
        let n = 1 + rng.below(3);
        let mut tail = rng.bytes(12);
        tail.extend(vec![7u8; 32 * n]);
        tail.extend((n as u32).to_le_bytes());
        tail.extend(1u32.to_le_bytes());
        tail.extend(b"SPRPACK1");
        if rng.below(2) == 0 {
            let i = rng.below(tail.len());
            tail[i] ^= rng.next() as u8;
        }
        let len = (tail.len() + rng.below(64)) as u64 - rng.below(40) as u64;
        if let Ok(t) = sprited::fs::pages::parse_trailer(&tail, len) {
            let data: u64 = t.frames.iter().map(|(_, c)| u64::from(*c)).sum();
            assert!(data <= len, "frames beyond the pack: {t:?}");
            assert!(!t.hashes.is_empty());
        }
        let list = format!(
            r#"{{"v":1,"len":{},"packs":["{}"],"runs":[[{},{},{}]]}}"#,
            rng.next() % 3 * 4096,
            "a".repeat(64 + rng.below(3)) + "-0",
            rng.below(3),
            rng.next() % 5,
            rng.below(3),
        );
        for text in [list, rng.text(60)] {
            if let Ok(l) = sprited::fs::pages::PageList::parse(text.as_bytes()) {
                let pages: u64 = l.runs.iter().map(|r| r[2]).sum();
                assert_eq!(pages * 4096, l.len, "{text}");
                assert!(l.runs.iter().all(|r| (r[0] as usize) < l.packs.len()));
            }
        }
        // Archives: every one refused (none is complete and valid), cleanly.
        if rounds % 4 == 0 {
            let archive = random_archive(&mut rng);
            let r = sprited::archive::import(
                &store,
                archive.as_slice(),
                sprited::archive::Limit {
                    bytes: 1 << 20,
                    configured: true,
                },
                &|_| {},
            );
            assert!(r.is_err(), "a random archive was accepted");
        }
    }
    eprintln!("fuzz: {rounds} rounds in {:?}, no finding", budget());
    assert!(rounds > 0);
    // Nothing the refused imports staged is left behind.
    let leftovers: Vec<_> = std::fs::read_dir(store_dir.path().join("tmp"))
        .unwrap()
        .flatten()
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
