//! What authenticates a checkpoint's process images: an HMAC-SHA256, made
//! with the sprite's checkpoint key (`--checkpoint-key`), of everything a
//! restore hands CRIU or acts on (the [`EnvImages`] but their statistics),
//! and of the manifest of the tree they were dumped on (so that genuine
//! images are not restored onto a tree of someone else's choosing).
//!
//! CRIU restores images as root on the host: their credentials and
//! capabilities, their mounts, the archive of the environment's `/dev`. An
//! archive or a bucket can carry any images whose names and digests are
//! consistent, so a restore runs processes only from images this key
//! sealed (this sprite's own, or a fleet's sharing the key); others come
//! back as files. Root inside the environment cannot read the key: it is
//! in the state dir, or wherever the host keeps it.

use std::collections::BTreeMap;

use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;

use super::{DumpedService, EnvImages};

/// The fewest bytes a key may have.
pub const MIN_KEY_BYTES: usize = 32;

/// The key (never printed).
#[derive(Clone)]
pub struct Key(Vec<u8>);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

/// What the seal covers, in a fixed order (the statistics are not part of
/// it: nothing a restore does depends on them).
#[derive(Serialize)]
struct Sealed<'a> {
    manifest: &'a str,
    images: &'a BTreeMap<String, String>,
    pages: &'a BTreeMap<String, String>,
    init_pipes: &'a [String; 2],
    services: &'a [DumpedService],
    sessions: &'a [crate::exec::DumpedSession],
    cgroups: &'a BTreeMap<String, Vec<i32>>,
    external_sockets: &'a [u64],
}

/// Keeps a seal of one kind of message from passing for another's.
const DOMAIN: &[u8] = b"sprited process images v2\0";

impl Key {
    /// None when shorter than [`MIN_KEY_BYTES`].
    pub fn new(bytes: Vec<u8>) -> Option<Key> {
        (bytes.len() >= MIN_KEY_BYTES).then_some(Key(bytes))
    }

    /// The seal of `images` on the tree of `manifest` (hex).
    fn tag(&self, images: &EnvImages, manifest: &str) -> String {
        let sealed = Sealed {
            manifest,
            images: &images.images,
            pages: &images.pages,
            init_pipes: &images.init_pipes,
            services: &images.services,
            sessions: &images.sessions,
            cgroups: &images.cgroups,
            external_sockets: &images.external_sockets,
        };
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(DOMAIN);
        // (serialising references to maps, strings and integers cannot fail)
        mac.update(&serde_json::to_vec(&sealed).unwrap_or_default());
        crate::fs::store::hex(&mac.finalize().into_bytes())
    }

    /// Seals `images`, dumped on the tree of `manifest` (their `mac`).
    pub fn seal(&self, images: &mut EnvImages, manifest: &str) {
        images.mac = Some(self.tag(images, manifest));
    }

    /// Whether `images` carry a seal this key made of exactly them, on
    /// the tree of `manifest` (compared in constant time).
    pub fn opens(&self, images: &EnvImages, manifest: &str) -> bool {
        use subtle::ConstantTimeEq;
        images.mac.as_deref().is_some_and(|tag| {
            tag.as_bytes()
                .ct_eq(self.tag(images, manifest).as_bytes())
                .into()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn images() -> EnvImages {
        EnvImages {
            images: [("core-1.img".to_owned(), "a".repeat(64))].into(),
            pages: [("pages-1.img".to_owned(), "b".repeat(64))].into(),
            stats: Default::default(),
            init_pipes: ["pipe:[1]".into(), "pipe:[2]".into()],
            services: vec![DumpedService {
                name: "web".into(),
                pid: 7,
                restart_count: 0,
                started_at_ms: 1,
                stdout: Some("pipe:[3]".into()),
                stderr: None,
            }],
            sessions: vec![],
            cgroups: [("web".to_owned(), vec![7])].into(),
            external_sockets: vec![],
            mac: None,
        }
    }

    fn key(byte: u8) -> Key {
        Key::new(vec![byte; 32]).unwrap()
    }

    #[test]
    fn a_seal_opens_with_its_key_only_and_covers_every_field_a_restore_uses() {
        let mut i = images();
        assert!(!key(1).opens(&i, "m"), "unsealed");
        key(1).seal(&mut i, "m");
        assert!(key(1).opens(&i, "m"));
        assert!(!key(2).opens(&i, "m"), "another key");
        assert!(!key(1).opens(&i, "n"), "another tree");
        // The statistics are not sealed: a restore does not act on them.
        let mut s = i.clone();
        s.stats.dump_ms += 1.0;
        assert!(key(1).opens(&s, "m"));
        let changes: [fn(&mut EnvImages); 7] = [
            |i| {
                i.images.insert("core-1.img".into(), "c".repeat(64));
            },
            |i| {
                i.pages.insert("pages-2.img".into(), "b".repeat(64));
            },
            |i| i.init_pipes[0] = "pipe:[9]".into(),
            |i| i.services[0].pid = 8,
            |i| i.cgroups.get_mut("web").unwrap().push(1),
            |i| i.external_sockets.push(5),
            |i| i.mac = Some("0".repeat(64)),
        ];
        for (n, change) in changes.iter().enumerate() {
            let mut c = i.clone();
            change(&mut c);
            assert!(!key(1).opens(&c, "m"), "change {n} went unnoticed");
        }
    }

    #[test]
    fn malformed_seals_and_short_keys_are_refused() {
        for tag in ["", "zz", &"g".repeat(64), &"0".repeat(63), &"é".repeat(32)] {
            let mut i = images();
            i.mac = Some(tag.to_owned());
            assert!(!key(1).opens(&i, "m"), "{tag:?}");
        }
        assert!(Key::new(vec![0; MIN_KEY_BYTES - 1]).is_none());
        assert_eq!(format!("{:?}", key(1)), "Key(..)");
    }
}
