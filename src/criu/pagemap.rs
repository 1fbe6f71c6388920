//! CRIU's pagemap images (`pagemap-<id>.img`, `pagemap-shmem-<id>.img`):
//! which pages of a process or segment a dump holds and where their
//! contents are. Two magic words (host order), then length-prefixed
//! protobufs: one `PagemapHead { pages_id = 1 }` naming the pages image
//! (`pages-<pages_id>.img`, raw pages back to back), then `PagemapEntry
//! { vaddr = 1, compat_nr_pages = 2, in_parent = 3, flags = 4, nr_pages = 5 }`
//! (CRIU 4.2 writes the count in field 5, earlier versions in field 2:
//! both are read, and both written).
//! An entry is in the pages image (`PE_PRESENT`, in entry order) or in the
//! parent dump (`PE_PARENT`: an incremental dump's unchanged pages).
//!
//! [`flatten`] turns an incremental dump and its parent (a pre-dump) into a
//! self-contained one: the same entries, all present, with where each page
//! of the new pages image comes from. Images are hostile input (they come
//! back from archives too): every count is checked.

use std::path::{Path, PathBuf};

use prost::Message as _;

use super::proto::{PagemapEntry, PagemapHead};

const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
const PAGEMAP_MAGIC: u32 = 0x5608_4025;
pub const PE_PARENT: u32 = 1;
pub const PE_LAZY: u32 = 2;
pub const PE_PRESENT: u32 = 4;
const PAGE: u64 = 4096;
/// No entry covers more than 2^36 pages (256 TiB).
const MAX_ENTRY_PAGES: u64 = 1 << 36;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub vaddr: u64,
    pub nr_pages: u64,
    pub flags: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pagemap {
    pub pages_id: u32,
    pub entries: Vec<Entry>,
}

/// Whether an image file is a pagemap.
pub fn is_pagemap_image(name: &str) -> bool {
    name.starts_with("pagemap-") && name.ends_with(".img")
}

impl Pagemap {
    /// The pages image its present entries are in.
    pub fn pages_image(&self) -> String {
        format!("pages-{}.img", self.pages_id)
    }

    /// Pages in the pages image.
    pub fn present_pages(&self) -> u64 {
        self.entries
            .iter()
            .filter(|e| e.flags & PE_PRESENT != 0 && e.flags & PE_PARENT == 0)
            .map(|e| e.nr_pages)
            .sum()
    }
}

/// Decodes a pagemap image.
pub fn parse(b: &[u8]) -> Result<Pagemap, String> {
    let word = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(
            b.get(at..at.checked_add(4)?)?.try_into().ok()?,
        ))
    };
    if word(0) != Some(IMG_COMMON_MAGIC) || word(4) != Some(PAGEMAP_MAGIC) {
        return Err("not a pagemap image".into());
    }
    let mut at = 8;
    let mut messages = Vec::new();
    while at < b.len() {
        let len = word(at).ok_or("a cut entry length")? as usize;
        let start = at + 4;
        let end = start
            .checked_add(len)
            .filter(|e| *e <= b.len())
            .ok_or("an entry beyond the end")?;
        messages.push(&b[start..end]);
        at = end;
    }
    let (head, rest) = messages.split_first().ok_or("no head")?;
    fn bad(what: &'static str) -> impl Fn(prost::DecodeError) -> String {
        move |e| format!("{what}: {e}")
    }
    let pages_id = PagemapHead::decode(*head)
        .map_err(bad("a bad head"))?
        .pages_id
        .ok_or("a head without pages_id")?;
    let mut entries = Vec::with_capacity(rest.len());
    for m in rest {
        let e = PagemapEntry::decode(*m).map_err(bad("a bad entry"))?;
        let vaddr = e.vaddr.ok_or("an entry without vaddr")?;
        let nr_pages = e.nr_pages.unwrap_or(e.compat_nr_pages.into());
        let flags = match (e.flags, e.in_parent) {
            (Some(f), _) => f,
            (None, Some(true)) => PE_PARENT,
            (None, _) => PE_PRESENT,
        };
        if nr_pages == 0
            || nr_pages > MAX_ENTRY_PAGES
            || vaddr % PAGE != 0
            || vaddr.checked_add(nr_pages * PAGE).is_none()
        {
            return Err(format!("a bad entry ({vaddr:#x}, {nr_pages} pages)"));
        }
        entries.push(Entry {
            vaddr,
            nr_pages,
            flags,
        });
    }
    Ok(Pagemap { pages_id, entries })
}

fn put_message(out: &mut Vec<u8>, msg: &impl prost::Message) {
    out.extend_from_slice(&(msg.encoded_len() as u32).to_le_bytes());
    msg.encode_raw(out);
}

/// Encodes a pagemap image as CRIU writes one.
pub fn encode(p: &Pagemap) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&IMG_COMMON_MAGIC.to_le_bytes());
    out.extend_from_slice(&PAGEMAP_MAGIC.to_le_bytes());
    put_message(
        &mut out,
        &PagemapHead {
            pages_id: Some(p.pages_id),
        },
    );
    for e in &p.entries {
        let entry = PagemapEntry {
            vaddr: Some(e.vaddr),
            // what CRIU before 4.2 reads (4.2 reads nr_pages, and writes 0
            // here)
            compat_nr_pages: u32::try_from(e.nr_pages).unwrap_or(u32::MAX),
            in_parent: None,
            flags: Some(e.flags),
            nr_pages: Some(e.nr_pages),
        };
        put_message(&mut out, &entry);
    }
    out
}

/// A pages image of a flattened dump: its name and where its pages come
/// from, as runs `(file, first page, count)` over [`Flat::files`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlatPages {
    pub name: String,
    pub runs: Vec<(usize, u64, u64)>,
}

/// An incremental dump made whole.
#[derive(Debug, Default)]
pub struct Flat {
    /// Pagemap image name → its new content (every entry present).
    pub pagemaps: Vec<(String, Vec<u8>)>,
    /// The pages images the runs read from.
    pub files: Vec<PathBuf>,
    pub pages: Vec<FlatPages>,
    /// Pages that came from the parent.
    pub from_parent: u64,
}

impl Flat {
    fn file(&mut self, p: PathBuf) -> usize {
        match self.files.iter().position(|f| *f == p) {
            Some(i) => i,
            None => {
                self.files.push(p);
                self.files.len() - 1
            }
        }
    }
}

/// Present pages by address: (vaddr, pages, first page in the pages image),
/// sorted.
type ByAddress = Vec<(u64, u64, u64)>;

/// The pages of `parent`'s pagemap `name` by address, and its pages image.
fn parent_index(parent: &Path, name: &str) -> Result<(ByAddress, String), String> {
    let path = parent.join(name);
    let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let pm = parse(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut at = 0;
    let mut index = Vec::new();
    for e in &pm.entries {
        if e.flags & PE_PARENT != 0 {
            return Err(format!("{}: its parent has a parent", path.display()));
        }
        if e.flags & PE_PRESENT != 0 {
            index.push((e.vaddr, e.nr_pages, at));
            at += e.nr_pages;
        }
    }
    index.sort_unstable();
    Ok((index, pm.pages_image()))
}

/// Makes the dump in `dir`, whose unchanged pages are in `parent` (a
/// pre-dump without a parent of its own), whole: each pagemap rewritten
/// with every entry present, and each pages image as runs over the two
/// dumps' pages images.
pub fn flatten(dir: &Path, parent: &Path) -> Result<Flat, String> {
    let mut flat = Flat::default();
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| is_pagemap_image(n))
        .collect();
    names.sort();
    for name in names {
        let path = dir.join(&name);
        let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut pm = parse(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        let own = flat.file(dir.join(pm.pages_image()));
        let own_len = std::fs::metadata(&flat.files[own])
            .map(|m| m.len())
            .unwrap_or(0);
        if own_len != pm.present_pages() * PAGE {
            return Err(format!(
                "{}: {} present pages, its pages image has {own_len} bytes",
                path.display(),
                pm.present_pages()
            ));
        }
        let mut inherited: Option<(ByAddress, usize)> = None;
        let mut runs: Vec<(usize, u64, u64)> = Vec::new();
        let push = |runs: &mut Vec<(usize, u64, u64)>, f: usize, first: u64, n: u64| match runs
            .last_mut()
        {
            Some((lf, lfirst, ln)) if *lf == f && *lfirst + *ln == first => *ln += n,
            _ => runs.push((f, first, n)),
        };
        let mut at = 0;
        for e in &mut pm.entries {
            if e.flags & PE_PARENT != 0 {
                if inherited.is_none() {
                    let (index, pages) = parent_index(parent, &name)?;
                    let f = flat.file(parent.join(pages));
                    inherited = Some((index, f));
                }
                let (index, f) = inherited.as_ref().expect("just set");
                let (mut vaddr, mut left) = (e.vaddr, e.nr_pages);
                while left > 0 {
                    let i = index.partition_point(|(v, ..)| *v <= vaddr);
                    let found = i
                        .checked_sub(1)
                        .map(|i| index[i])
                        .filter(|(v, n, _)| vaddr < v + n * PAGE);
                    let Some((v, n, first)) = found else {
                        return Err(format!("{name}: page {vaddr:#x} is not in the parent"));
                    };
                    let skip = (vaddr - v) / PAGE;
                    let take = (n - skip).min(left);
                    push(&mut runs, *f, first + skip, take);
                    flat.from_parent += take;
                    vaddr += take * PAGE;
                    left -= take;
                }
            } else if e.flags & PE_PRESENT != 0 {
                push(&mut runs, own, at, e.nr_pages);
                at += e.nr_pages;
            } else {
                return Err(format!(
                    "{name}: an entry neither present nor in the parent"
                ));
            }
            e.flags = PE_PRESENT;
        }
        flat.pagemaps.push((name, encode(&pm)));
        flat.pages.push(FlatPages {
            name: pm.pages_image(),
            runs,
        });
    }
    Ok(flat)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pm(pages_id: u32, entries: &[(u64, u64, u32)]) -> Pagemap {
        Pagemap {
            pages_id,
            entries: entries
                .iter()
                .map(|&(vaddr, nr_pages, flags)| Entry {
                    vaddr,
                    nr_pages,
                    flags,
                })
                .collect(),
        }
    }

    #[test]
    fn pagemaps_round_trip_and_old_style_entries_read() {
        let p = pm(
            3,
            &[(0x1000, 2, PE_PRESENT), (0x7fff_0000_0000, 300, PE_PARENT)],
        );
        assert_eq!(parse(&encode(&p)).unwrap(), p);
        // in_parent without flags, compat_nr_pages without nr_pages
        let mut b = encode(&pm(1, &[]));
        let old: &[u8] = &[0x08, 0x80, 0x20, 0x10, 0x05, 0x18, 0x01];
        b.extend_from_slice(&(old.len() as u32).to_le_bytes());
        b.extend_from_slice(old);
        let got = parse(&b).unwrap();
        assert_eq!(got.entries, pm(1, &[(0x1000, 5, PE_PARENT)]).entries);
        for bad in [&b"\x19\x43\x56\x54"[..], &b[..b.len() - 1], &[]] {
            assert!(parse(bad).is_err());
        }
    }

    #[test]
    fn an_incremental_dump_is_flattened_over_its_parent() {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, parent) = (tmp.path().join("dump"), tmp.path().join("pre"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::create_dir_all(&parent).unwrap();
        // The pre-dump: 4 pages at 0x10000, 2 at 0x40000 (pages-7.img).
        let pre = pm(7, &[(0x10000, 4, PE_PRESENT), (0x40000, 2, PE_PRESENT)]);
        std::fs::write(parent.join("pagemap-1.img"), encode(&pre)).unwrap();
        std::fs::write(parent.join("pages-7.img"), vec![0u8; 6 * 4096]).unwrap();
        // The dump: pages 0x10000-0x11fff unchanged, 0x12000 new, 0x13000
        // unchanged, 0x40000-0x41fff unchanged, 0x50000 new.
        let dump = pm(
            1,
            &[
                (0x10000, 2, PE_PARENT),
                (0x12000, 1, PE_PRESENT),
                (0x13000, 1, PE_PARENT),
                (0x40000, 2, PE_PARENT),
                (0x50000, 1, PE_PRESENT),
            ],
        );
        std::fs::write(dir.join("pagemap-1.img"), encode(&dump)).unwrap();
        std::fs::write(dir.join("pages-1.img"), vec![0u8; 2 * 4096]).unwrap();
        let flat = flatten(&dir, &parent).unwrap();
        assert_eq!(
            flat.files,
            vec![dir.join("pages-1.img"), parent.join("pages-7.img")]
        );
        assert_eq!(flat.from_parent, 5);
        assert_eq!(
            flat.pages,
            vec![FlatPages {
                name: "pages-1.img".into(),
                runs: vec![(1, 0, 2), (0, 0, 1), (1, 3, 3), (0, 1, 1)],
            }]
        );
        let whole = parse(&flat.pagemaps[0].1).unwrap();
        assert!(whole.entries.iter().all(|e| e.flags == PE_PRESENT));
        assert_eq!(whole.present_pages(), 7);

        // A page the parent lacks is an error, not a guess.
        let bad = pm(1, &[(0x60000, 1, PE_PARENT)]);
        std::fs::write(dir.join("pagemap-1.img"), encode(&bad)).unwrap();
        std::fs::write(dir.join("pages-1.img"), b"").unwrap();
        assert!(
            flatten(&dir, &parent)
                .unwrap_err()
                .contains("not in the parent")
        );
    }
}
