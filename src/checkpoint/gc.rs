//! Deleting checkpoints and collecting what no checkpoint references.

use std::collections::HashSet;

use super::{CheckpointError, CheckpointMeta, Checkpoints, io_err};
use crate::durable;
use crate::fs::{manifest, pages};

impl Checkpoints {
    /// Deletes a checkpoint and frees the objects no other one references.
    /// Returns bytes freed.
    pub fn delete(&self, id: &str) -> Result<u64, CheckpointError> {
        self.get(id)?;
        if self
            .exporting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(id)
        {
            return Err(CheckpointError::Exporting(id.to_owned()));
        }
        let st = self.env.state();
        if st.source.as_deref() == Some(id) || st.layer.as_deref() == Some(id) {
            return Err(CheckpointError::InUse(id.to_owned()));
        }
        let dir = self.dir.join(id);
        self.env.unmount_path(&self.root_of(id));
        // Out of sight first (atomic), then gone.
        let trash = self
            .dir
            .join(format!("{}deleted-{id}", durable::TEMP_PREFIX));
        std::fs::rename(&dir, &trash).map_err(io_err("rename", &dir))?;
        self.metas
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        let _ = std::fs::remove_dir_all(&trash);
        self.env.remove_layer(id);
        let (_, bytes) = self.collect_garbage()?;
        self.refresh_browsable();
        Ok(bytes)
    }

    /// Deletes every store object no checkpoint references.
    pub(super) fn collect_garbage(&self) -> Result<(u64, u64), CheckpointError> {
        let metas: Vec<CheckpointMeta> = self
            .metas
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        let store = self.env.store();
        let mut keep: HashSet<String> = self.env.cached_objects().into_iter().collect();
        for m in metas {
            manifest::references(store, &m.manifest, &mut keep)?;
            if let Some(p) = &m.env {
                keep.extend(p.images.values().cloned());
                for list in p.pages.values() {
                    keep.extend(pages::packs_of(store, list)?);
                    keep.insert(list.clone());
                }
            }
        }
        // Packs no checkpoint names go: the index forgets them.
        if let Some(index) = self
            .page_index
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            index.retain_packs(|id| keep.contains(id));
        }
        Ok(store.collect_garbage(&keep)?)
    }
}
