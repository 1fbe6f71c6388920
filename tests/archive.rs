//! Checkpoint archives against real daemons: export from one, import into
//! another (its own state dir), restore there; hostile archives are refused
//! and leave nothing behind; exports stream in bounded memory (root).

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::{Daemon, Options, privileged, tree};
use futures_util::StreamExt;
use reqwest::Method;
use serde_json::Value;

fn write(root: &Path, rel: &str, data: &[u8]) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, data).unwrap();
}

/// Every object name in a daemon's store.
fn objects(d: &Daemon) -> BTreeSet<String> {
    let dir = d.state_dir.join("store/objects");
    let mut out = BTreeSet::new();
    for sub in std::fs::read_dir(&dir).unwrap().flatten() {
        for o in std::fs::read_dir(sub.path()).unwrap().flatten() {
            out.insert(o.file_name().to_string_lossy().into_owned());
        }
    }
    out
}

/// What a failed import could leave: staging dirs, temp checkpoints.
fn leftovers(d: &Daemon) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(d.state_dir.join("store/tmp"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    out.extend(
        std::fs::read_dir(d.state_dir.join("checkpoints"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .map(|e| e.path()),
    );
    out
}

async fn ids(d: &Daemon) -> Vec<String> {
    let list: Vec<Value> = d.get("/v1/checkpoints").await.json().await.unwrap();
    list.iter()
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .collect()
}

async fn export(d: &Daemon, id: &str) -> Vec<u8> {
    let r = d.get(&format!("/v1/checkpoints/{id}/export")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/zstd");
    r.bytes().await.unwrap().to_vec()
}

async fn import(d: &Daemon, archive: Vec<u8>) -> reqwest::Response {
    d.http
        .post(d.url("/v1/checkpoints/import"))
        .bearer_auth(common::TOKEN)
        .body(archive)
        .send()
        .await
        .unwrap()
}

/// An archive of `entries` (regular files), plus `extra` headers as given.
fn build(entries: &[(String, Vec<u8>)], extra: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o600);
        h.set_entry_type(tar::EntryType::Regular);
        // set_path refuses `..`; write the raw name as an attacker would.
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
        b.append(&h, data.as_slice()).unwrap();
    }
    extra(&mut b);
    zstd::encode_all(b.into_inner().unwrap().as_slice(), 1).unwrap()
}

#[tokio::test]
#[cfg_attr(not(privileged_tests), ignore = "needs root (scripts/test.sh)")]
async fn a_checkpoint_moves_to_another_daemon_and_bad_archives_are_refused() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(privileged(
        "a_checkpoint_moves_to_another_daemon_and_bad_archives_are_refused"
    ));
    let a = Daemon::start().await;
    let root = a.env_root();
    write(&root, "plain.txt", b"plain");
    write(&root, "dir/deep/file", b"deep");
    std::os::unix::fs::symlink("../plain.txt", root.join("dir/link")).unwrap();
    write(&root, "attr.txt", b"with an xattr");
    xattr::set(root.join("attr.txt"), "user.colour", b"blue").unwrap();
    write(&root, "pair-a", b"hard linked");
    std::fs::hard_link(root.join("pair-a"), root.join("pair-b")).unwrap();
    write(&root, "secret", b"only uid 1000");
    std::fs::set_permissions(root.join("secret"), std::fs::Permissions::from_mode(0o600)).unwrap();
    nix::unistd::chown(&root.join("secret"), Some(1000.into()), Some(1000.into())).unwrap();
    let mut big = vec![0u8; 3 << 20];
    big[12345] = 7; // mostly zeros: a hole-friendly object
    write(&root, "big.bin", &big);
    let expected = tree(&root);
    a.checkpoint("to move").await;

    // Export with the CLI (to a file) and over HTTP: the same archive.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("v1.tar.zst");
    let out = a
        .cli(&["checkpoint", "export", "v1", "-o", file.to_str().unwrap()])
        .await;
    assert!(out.status.success(), "{out:?}");
    let archive = std::fs::read(&file).unwrap();
    assert_eq!(archive, export(&a, "v1").await, "exports are deterministic");
    let names: Vec<String> = common::archive_entries(&archive)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(&names[..2], ["index.json", "meta.json"]);
    assert!(
        names[2..].iter().all(|n| n.starts_with("objects/")),
        "{names:?}"
    );

    // Into an empty daemon with the CLI, then restore there.
    let b = Daemon::start().await;
    let out = b
        .cli(&["checkpoint", "import", file.to_str().unwrap()])
        .await;
    assert!(out.status.success(), "{out:?}");
    let last: Value = serde_json::from_slice(
        out.stdout
            .split(|c| *c == b'\n')
            .rfind(|l| !l.is_empty())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        (last["type"].as_str(), last["data"].as_str()),
        (Some("complete"), Some("Checkpoint v1 imported"))
    );
    let meta: Value = b.get("/v1/checkpoints/v1").await.json().await.unwrap();
    let from = &meta["imported_from"];
    assert_eq!(
        (from["id"].as_str(), from["comment"].as_str()),
        (Some("v1"), Some("to move"))
    );
    let original: Value = a.get("/v1/checkpoints/v1").await.json().await.unwrap();
    assert_eq!(from["create_time"], original["create_time"]);
    b.restore("v1").await;
    assert_eq!(
        tree(&b.env_root()),
        expected,
        "B's tree equals A's at checkpoint time"
    );

    // The same archive again: a new id (v2 is the automatic checkpoint the
    // restore took), no object stored twice.
    let before = objects(&b);
    let r = import(&b, archive.clone()).await;
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("Checkpoint v3 imported"));
    assert_eq!(objects(&b), before, "the second import stores no object");

    // Hostile archives: each refused with 400 naming the problem, nothing kept.
    let good = common::archive_entries(&archive);
    let file_object = good
        .iter()
        .position(|(_, data)| data.as_slice() == b"only uid 1000")
        .unwrap();
    let mut corrupt = good.clone();
    corrupt[file_object].1[0] ^= 1;
    let mut dup = good.clone();
    dup.push(good[file_object].clone());
    let mut evil = good.clone();
    evil.insert(2, ("../../etc/x".into(), b"evil".to_vec()));
    let cases: Vec<(&str, Vec<u8>, Vec<&str>)> = vec![
        (
            "a corrupted byte",
            build(&corrupt, |_| {}),
            vec![&good[file_object].0, "SHA-256 mismatch"],
        ),
        (
            "a truncated stream",
            archive[..archive.len() / 2].to_vec(),
            vec!["truncated"],
        ),
        (
            "an entry ../../etc/x",
            build(&evil, |_| {}),
            vec!["../../etc/x"],
        ),
        (
            "an entry twice",
            build(&dup, |_| {}),
            vec![&good[file_object].0, "twice"],
        ),
        (
            "a symlink",
            build(&good[..2], |b| {
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_path("objects/x").unwrap();
                h.set_link_name("/etc/passwd").unwrap();
                h.set_size(0);
                h.set_cksum();
                b.append(&h, std::io::empty()).unwrap();
            }),
            vec!["objects/x", "only regular files"],
        ),
        ("not an archive", b"hello".to_vec(), vec!["corrupt"]),
    ];
    let list = ids(&b).await;
    for (what, bytes, needles) in cases {
        let r = import(&b, bytes).await;
        assert_eq!(r.status(), 400, "{what}");
        let v: Value = r.json().await.unwrap();
        let msg = v["error"].as_str().unwrap();
        for n in needles {
            assert!(msg.contains(n), "{what}: {msg:?} should name {n:?}");
        }
        assert_eq!(
            ids(&b).await,
            list,
            "{what}: the checkpoint list is unchanged"
        );
        assert_eq!(objects(&b), before, "{what}: no new object");
        assert_eq!(
            leftovers(&b),
            Vec::<PathBuf>::new(),
            "{what}: no temp files"
        );
    }

    // Past --import-max-bytes.
    let small = Daemon::start_with(Options {
        extra: vec!["--import-max-bytes".into(), "1M".into()],
        ..Default::default()
    })
    .await;
    let r = import(&small, archive).await;
    assert_eq!(r.status(), 413);
    let msg = r.text().await.unwrap();
    assert!(msg.contains("more than 1048576 bytes"), "{msg}");
    assert_eq!(ids(&small).await, Vec::<String>::new());
    assert_eq!(leftovers(&small), Vec::<PathBuf>::new());
}

#[tokio::test]
#[cfg_attr(not(privileged_tests), ignore = "needs root (scripts/test.sh)")]
async fn exporting_a_1_gib_checkpoint_streams_in_bounded_memory() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(privileged(
        "exporting_a_1_gib_checkpoint_streams_in_bounded_memory"
    ));
    let d = Daemon::start().await;
    let root = d.env_root();
    // 1 GiB that does not compress: 8 files of 128 MiB.
    let mut urandom = std::fs::File::open("/dev/urandom").unwrap();
    for i in 0..8 {
        let mut f = std::fs::File::create(root.join(format!("blob-{i}"))).unwrap();
        std::io::copy(&mut (&mut urandom).take(128 << 20), &mut f).unwrap();
        f.flush().unwrap();
    }
    d.checkpoint("big").await;
    let pid = d.pid();
    // Reset the peak-RSS mark, then measure idle.
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
    let idle = common::status_kib(pid, "VmRSS:");
    let r = d.get("/v1/checkpoints/v1/export").await;
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    let mut total = 0u64;
    while let Some(chunk) = body.next().await {
        total += chunk.unwrap().len() as u64;
    }
    let peak = common::status_kib(pid, "VmHWM:");
    assert!(total > 1 << 30, "the whole GiB went out ({total} bytes)");
    let grew = peak.saturating_sub(idle);
    eprintln!("export of {total} bytes: RSS idle {idle} KiB, peak {peak} KiB (+{grew} KiB)");
    assert!(grew < 64 << 10, "RSS grew by {grew} KiB during the export");

    // A client that goes away stops the work, and the checkpoint is free again.
    let r = d.get("/v1/checkpoints/v1/export").await;
    let mut body = r.bytes_stream();
    body.next().await.unwrap().unwrap();
    drop(body);
    d.checkpoint("another").await;
    let log = d.log.clone();
    tokio::time::timeout(std::time::Duration::from_secs(30), async {
        while !std::fs::read_to_string(&log)
            .unwrap()
            .contains("export stopped")
        {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the export did not stop after the client left");
    let r = d.req(Method::DELETE, "/v1/checkpoints/v1", None).await;
    assert_eq!(r.status(), 204, "{}", r.text().await.unwrap());
}
