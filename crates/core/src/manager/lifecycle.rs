//! Pause/resume, snapshots, forks and idle timeouts (a child module of `manager`).
//!
//! - **Pause with memory** freezes the sandbox's cgroup: its processes stop where they are,
//!   use no CPU and keep their memory; resume thaws them. The sandbox stays attached (and
//!   survives a server restart: recovery does not expect a frozen agent to answer).
//! - **Pause without memory** saves the sandbox's upper layer as a read-only layer on disk
//!   (frozen first, so the copy is consistent), then ends the sandbox: nothing is left running
//!   and no memory is held. Resume starts a new sandbox under the same id and access token
//!   whose filesystem is that layer (plus its earlier ones) under a fresh upper: the same files.
//! - **Snapshots** save the upper layer the same way without stopping the sandbox for longer
//!   than the copy; a snapshot is a template: sandboxes created from it share its layers.
//! - **Forks** are a snapshot taken once and N sandboxes started from it.
//! - **Idle timeout** (our extension) pauses or kills a sandbox after a period with no API
//!   traffic, no CPU use and no running user processes.
//!
//! Saved layers are reference-counted in the store (see `store::SCHEMA_V4`): the sandboxes not
//! yet killed whose lifecycle lists a layer, the snapshots that list it, and a fork in flight
//! hold it. Each operation here commits its new layer together with its first reference and
//! its state change; the directory goes when the last reference does ([`Manager::collect_layers`]
//! after the commit, or [`Manager::sweep_layers`] at the next start if the server died first).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ringfence_proto::{Reply, Request};

use super::{CreateParams, Live, Manager, ManagerError, Reuse, now_ms};
use crate::store::{SandboxRecord, SandboxState, SnapshotRecord};

/// CPU below this share of one core over the idle window counts as no CPU use.
const IDLE_CPU_SHARE: f64 = 0.01;

impl Manager {
    /// The built-in template under a template name (a snapshot's base, or the name itself).
    pub(super) fn base_template(&self, name: &str) -> String {
        // Built-in and image templates are their own base.
        if super::TEMPLATES.contains(&name) || self.tiers.jail().has_image(name) {
            return name.to_string();
        }
        self.snapshot_bases
            .lock()
            .ok()
            .and_then(|m| m.get(name).cloned())
            .or_else(|| {
                self.store
                    .all_snapshots()
                    .ok()?
                    .into_iter()
                    .find(|s| s.id == name)
                    .map(|s| s.template)
            })
            .unwrap_or_else(|| "base".into())
    }

    /// Where layer `id` lives on the host: `<data-dir>/layers/<id>`, or, once its content is in
    /// the image store (a link there, see `ringfence_image::shared`), that directory, so the
    /// tiers mount the real path.
    pub(super) fn layer_dir(&self, id: &str) -> PathBuf {
        let own = self.cfg.data_dir.join("layers").join(id);
        if std::fs::symlink_metadata(&own).is_ok_and(|m| m.file_type().is_symlink()) {
            return std::fs::canonicalize(&own).unwrap_or(own);
        }
        own
    }

    /// Saves `live`'s upper layer as a new layer (freezing the sandbox for the copy). Returns
    /// the layer id and the full layer list (new one first). The layer is on disk but not yet
    /// recorded: the caller commits it with its first reference, or removes it.
    async fn save_upper(&self, live: &Arc<Live>) -> Result<(String, Vec<String>), ManagerError> {
        let layer = format!("l{}", ringfence_jail::new_sandbox_id());
        let dest = self.layer_dir(&layer);
        let l = live.clone();
        let saved = tokio::task::spawn_blocking(move || {
            let paused = l.snapshot().is_some_and(|r| r.state == SandboxState::Paused);
            l.with_instance(|i| i.save_fs(&dest, paused))
        })
        .await?;
        match saved {
            Some(r) => r?,
            None => return Err(ManagerError::no_sandbox(&live_id(live))),
        }
        // Stored by content in the image store, shared with any saved or image layer of the
        // same content; `<id>` becomes a link to it. If that fails the directory stays where
        // it is and works as before (only unshared).
        let (data_dir, dest) =
            (self.cfg.data_dir.clone(), self.cfg.data_dir.join("layers").join(&layer));
        let adopted = tokio::task::spawn_blocking(move || {
            ringfence_image::store::Store::open(&data_dir)?.adopt_saved_layer(&dest)
        })
        .await?;
        if let Err(e) = adopted {
            tracing::warn!(layer, error = %e, "storing a saved layer by content; kept unshared");
        }
        let mut layers = vec![layer.clone()];
        layers.extend(live.snapshot().map(|r| r.lifecycle.layers).unwrap_or_default());
        Ok((layer, layers))
    }

    /// Pauses a running sandbox. `memory`: keep its processes frozen in memory; otherwise keep
    /// only its files. Returns false if it was already paused.
    pub async fn pause(&self, key_id: &str, id: &str, memory: bool) -> Result<bool, ManagerError> {
        self.pause_for(key_id, id, memory, "api").await
    }

    /// [`Manager::pause`] for a `cause` (`api`, `timeout`, `idle`, `memory_pressure`), which
    /// its lifecycle event records.
    pub async fn pause_for(
        &self,
        key_id: &str,
        id: &str,
        memory: bool,
        cause: &'static str,
    ) -> Result<bool, ManagerError> {
        let _serial = self.lifecycle_lock.lock().await;
        let Some(live) = self.get(id).filter(|l| l.snapshot().is_some_and(|r| r.key_id == key_id))
        else {
            return match self.store.get_sandbox(id)? {
                Some(r) if r.key_id == key_id && r.state == SandboxState::Paused => Ok(false),
                _ => Err(ManagerError::no_sandbox(id)),
            };
        };
        let rec = live.snapshot().ok_or_else(|| ManagerError::no_sandbox(id))?;
        // A sandbox frozen in memory may still be asked to let go of it (files kept).
        let demote = rec.state == SandboxState::Paused && !memory;
        if rec.state == SandboxState::Paused && !demote {
            return Ok(false);
        }
        if memory {
            let l = live.clone();
            tokio::task::spawn_blocking(move || l.with_instance(|i| i.freeze()))
                .await?
                .ok_or_else(|| ManagerError::no_sandbox(id))??;
            let mut lc = rec.lifecycle.clone();
            lc.paused_with_memory = Some(true);
            // Frozen but not recorded if this fails or the server dies here: recovery thaws a
            // sandbox its record says is running.
            self.set_paused(&live, lc, None, cause)?;
            return Ok(true);
        }
        let (layer, layers) = self.save_upper(&live).await?;
        let mut lc = rec.lifecycle.clone();
        lc.layers = layers;
        lc.paused_with_memory = Some(false);
        if let Err(e) = self.set_paused(&live, lc, Some(&layer), cause) {
            self.remove_layer_dir(&layer).await;
            return Err(e);
        }
        // Nothing of it keeps running: the instance's drop ends the sandbox and frees its slot.
        if let Some(l) = self.live.write().ok().and_then(|mut m| m.remove(id)) {
            let _ = tokio::task::spawn_blocking(move || {
                crate::network::teardown(&l.net);
                drop(l.take_instance());
                l.obs.ended();
            })
            .await;
        }
        self.store.set_agent(id, None, None)?;
        Ok(true)
    }

    /// Under memory pressure (MemAvailable below the configured floor), turns the oldest
    /// sandbox paused in memory into a filesystem-only pause: its memory is released, its
    /// files are kept, its processes end. One per call.
    pub(super) async fn relieve_pressure(&self) {
        let floor = self.cfg.pressure_floor;
        if floor == 0 || mem_available().is_none_or(|a| a >= floor) {
            return;
        }
        let oldest = self.live.read().ok().and_then(|m| {
            m.values()
                .filter_map(|l| l.snapshot())
                .filter(|r| r.lifecycle.paused_with_memory == Some(true))
                .min_by_key(|r| r.end_at)
        });
        let Some(rec) = oldest else { return };
        tracing::warn!(sandbox_id = %rec.id, "memory pressure: keeping only the files of a paused sandbox");
        if let Err(e) = self.pause_for(&rec.key_id, &rec.id, false, "memory_pressure").await {
            tracing::warn!(sandbox_id = %rec.id, error = %e, "releasing a paused sandbox's memory");
        }
    }

    /// Records `live` as paused with lifecycle `lc`: in memory, or (with `layer`, just saved)
    /// files only. The store commits first (layer, references, state and event together), so
    /// the record in memory never claims a pause the database does not hold.
    fn set_paused(
        &self,
        live: &Live,
        lc: crate::store::Lifecycle,
        layer: Option<&str>,
        cause: &str,
    ) -> Result<(), ManagerError> {
        let id = live_id(live);
        let memory = layer.is_none();
        self.store.pause_sandbox_because(&id, layer, &lc, memory, cause)?;
        if let Ok(mut r) = live.record.lock() {
            r.state = SandboxState::Paused;
            r.lifecycle = lc;
        }
        tracing::info!(sandbox_id = %id, memory, "sandbox paused");
        Ok(())
    }

    /// Resumes a paused sandbox (thawed, or restarted from its saved files) and gives it
    /// `timeout` to live. Returns the sandbox and whether it was paused.
    pub async fn resume(
        self: &Arc<Self>,
        key_id: &str,
        id: &str,
        timeout: Duration,
    ) -> Result<(Arc<Live>, bool), ManagerError> {
        self.resume_for(key_id, id, timeout, "api").await
    }

    /// [`Manager::resume`] for a `cause` (`api`, or `traffic` for `autoResume`), which its
    /// lifecycle event records.
    pub async fn resume_for(
        self: &Arc<Self>,
        key_id: &str,
        id: &str,
        timeout: Duration,
        cause: &'static str,
    ) -> Result<(Arc<Live>, bool), ManagerError> {
        let _serial = self.lifecycle_lock.lock().await;
        if let Some(live) = self.get(id) {
            let rec = live.snapshot().ok_or_else(|| ManagerError::no_sandbox(id))?;
            if rec.key_id != key_id {
                return Err(ManagerError::no_sandbox(id));
            }
            if rec.state != SandboxState::Paused {
                return Ok((live, false));
            }
            // Already counted while paused: refused only if the key is above its quota.
            self.admit(key_id, 0, false)?;
            let l = live.clone();
            tokio::task::spawn_blocking(move || l.with_instance(|i| i.thaw()))
                .await?
                .ok_or_else(|| ManagerError::no_sandbox(id))??;
            let end = super::deadline_after(timeout);
            let mut lc = rec.lifecycle.clone();
            lc.paused_with_memory = None;
            if let Ok(mut r) = live.record.lock() {
                r.state = SandboxState::Running;
                r.end_at = end;
                r.lifecycle = lc.clone();
            }
            live.touch();
            self.store.set_state(id, SandboxState::Running)?;
            self.store.set_end_at(id, end)?;
            self.store.set_lifecycle(id, &lc)?;
            let _ = self.store.record_event(
                id,
                "resumed",
                &serde_json::json!({"memory": true, "cause": cause}),
            );
            return Ok((live, true));
        }
        let rec = self.store.get_sandbox(id)?;
        let Some(rec) = rec.filter(|r| r.key_id == key_id && r.state == SandboxState::Paused)
        else {
            return Err(ManagerError::no_sandbox(id));
        };
        self.admit(key_id, 0, false)?;
        let mut lc = rec.lifecycle.clone();
        lc.paused_with_memory = None;
        let reuse = Reuse {
            id: rec.id.clone(),
            access_token: rec.access_token.clone(),
            created_at: rec.created_at,
            cause,
        };
        let params = self.params_like(&rec, timeout, lc, Some(reuse));
        let live = self.start(key_id, params, std::time::Instant::now()).await?;
        Ok((live, true))
    }

    /// Saves a running sandbox's files as a named snapshot (usable as a template).
    pub async fn snapshot(
        &self,
        key_id: &str,
        id: &str,
        name: Option<String>,
    ) -> Result<SnapshotRecord, ManagerError> {
        let _serial = self.lifecycle_lock.lock().await;
        let live = self
            .get(id)
            .filter(|l| l.snapshot().is_some_and(|r| r.key_id == key_id))
            .ok_or_else(|| ManagerError::no_sandbox(id))?;
        let rec = live.snapshot().ok_or_else(|| ManagerError::no_sandbox(id))?;
        // Snapshots are made one at a time (the lifecycle lock): count, then save.
        let limits = self.quota_for(key_id)?;
        let have = self.store.count_snapshots_of(key_id)?;
        crate::quota::Quotas::admit_snapshot(&limits, have)?;
        if let Some(n) = &name {
            if n.is_empty() || n.len() > 128 || super::TEMPLATES.contains(&n.as_str()) {
                return Err(ManagerError::BadRequest(format!(
                    "snapshot name {n:?} must be 1-128 characters and not a built-in template"
                )));
            }
            if self.store.get_snapshot(key_id, n)?.is_some() {
                return Err(ManagerError::BadRequest(format!("a snapshot named {n:?} exists")));
            }
        }
        let (layer, layers) = self.save_upper(&live).await?;
        let snap = SnapshotRecord {
            id: format!("snap-{layer}"),
            name: name.unwrap_or_else(|| format!("snap-{layer}")),
            key_id: key_id.into(),
            sandbox_id: id.into(),
            template: self.base_template(&rec.template),
            layers,
            created_at: now_ms(),
        };
        if let Err(e) = self.store.insert_snapshot_with_layer(&snap, &layer) {
            self.remove_layer_dir(&layer).await;
            return Err(e.into());
        }
        let _ = self.store.record_event(id, "snapshot", &serde_json::json!({"snapshot": snap.id}));
        Ok(snap)
    }

    pub fn list_snapshots(
        &self,
        key_id: &str,
        sandbox_id: Option<&str>,
    ) -> Result<Vec<SnapshotRecord>, ManagerError> {
        Ok(self.store.list_snapshots(key_id, sandbox_id)?)
    }

    /// Deletes a snapshot; refused while a sandbox (running or paused) or another snapshot
    /// still uses its files. Returns false if there is no such snapshot.
    pub async fn delete_snapshot(&self, key_id: &str, id: &str) -> Result<bool, ManagerError> {
        let _serial = self.lifecycle_lock.lock().await;
        let Some(snap) = self.store.get_snapshot(key_id, id)? else {
            return Ok(false);
        };
        let own = snap.layers.first().cloned().unwrap_or_default();
        let users: Vec<String> = self
            .store
            .live_sandboxes()?
            .into_iter()
            .filter(|r| r.template == snap.id || r.lifecycle.layers.contains(&own))
            .map(|r| r.id)
            .collect();
        if !users.is_empty() {
            return Err(ManagerError::Conflict(format!(
                "snapshot {} is in use by sandbox(es) {}: kill them first",
                snap.id,
                users.join(", ")
            )));
        }
        let others = self.store.all_snapshots()?;
        if let Some(o) = others.iter().find(|o| o.id != snap.id && o.layers.contains(&own)) {
            return Err(ManagerError::Conflict(format!(
                "snapshot {} is the base of snapshot {}: delete that first",
                snap.id, o.id
            )));
        }
        self.store.delete_snapshot(&snap.id)?;
        self.collect_layers().await;
        Ok(true)
    }

    /// Removes the directories of layers whose last reference went (the store queued them
    /// when it committed that).
    pub(super) async fn collect_layers(&self) {
        let (store, root) = (self.store.clone(), self.layers_root());
        let _ = tokio::task::spawn_blocking(move || remove_dropped_layers(&store, &root)).await;
    }

    /// A layer saved but never recorded (its commit failed): nothing refers to it.
    async fn remove_layer_dir(&self, layer: &str) {
        let dir = self.layer_dir(layer);
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
    }

    /// Where every layer lives.
    pub(super) fn layers_root(&self) -> PathBuf {
        self.cfg.data_dir.join("layers")
    }

    /// At start, before serving: whatever an earlier server process left behind goes. The
    /// references of its operations in flight (a fork's), then the layers queued for removal,
    /// every `.partial` (a save the crash interrupted) and every layer directory the store does
    /// not know (saved, but the crash came before its commit). Layers still referenced stay.
    /// Returns how many directories were removed.
    pub(super) async fn sweep_layers(&self) -> Result<usize, ManagerError> {
        let (store, root) = (self.store.clone(), self.layers_root());
        let uid_base = self.tiers().jail().legacy_uid_base();
        tokio::task::spawn_blocking(move || {
            store.reset_pending_layers()?;
            let images = root.parent().and_then(|d| ringfence_image::store::Store::open(d).ok());
            if let Some(n) = images.as_ref().map(|i| i.finish_adoptions()).filter(|n| *n > 0) {
                tracing::info!(layers = n, "completed moving saved layers into the image store");
            }
            // Layers hold canonical ids and are reached only by the host (see
            // ringfence_jail::owner): no host user may walk in.
            if std::fs::create_dir_all(&root).is_ok() {
                use std::os::unix::fs::PermissionsExt;
                let _ = std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700));
            }
            let mut removed = remove_dropped_layers(&store, &root);
            let known = store.layers()?;
            let Ok(entries) = std::fs::read_dir(&root) else { return Ok(removed) };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let partial = ringfence_jail::layer::is_partial(&name);
                if !partial && known.contains_key(&name) {
                    if e.file_type().is_ok_and(|t| t.is_symlink()) {
                        // Already in the image store by content (canonical when it moved).
                        continue;
                    }
                    // Saved by a version whose sandboxes all shared one id range: stored with
                    // those host ids, which no sandbox maps any more. Shifted once, in place.
                    match ringfence_jail::layer::canonicalize(&e.path(), uid_base) {
                        Ok(true) => tracing::info!(layer = %name, "layer moved to canonical ids"),
                        Ok(false) => {}
                        Err(err) => tracing::warn!(layer = %name, error = %err, "canonical ids"),
                    }
                    // Saved before layers were stored by content: moved into the image store
                    // now, once (the migration of an older data directory).
                    if let Some(i) = &images {
                        match i.adopt_saved_layer(&e.path()) {
                            Ok(d) => tracing::info!(layer = %name, digest = %d, "layer stored by content"),
                            Err(err) => tracing::warn!(layer = %name, error = %err, "storing a layer by content"),
                        }
                    }
                    continue;
                }
                let path = e.path();
                let gone = if e.file_type().is_ok_and(|t| t.is_dir()) {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
                match gone {
                    Ok(()) => {
                        removed += 1;
                        tracing::info!(layer = %name, partial, "removed a layer nothing refers to");
                    }
                    Err(err) => tracing::warn!(layer = %name, error = %err, "removing a layer"),
                }
            }
            // Saved layers of the image store that no link points to any more (their links
            // went above, or a crash came between storing one and recording it).
            if let Some(i) = &images {
                removed += i.collect_unlinked().unwrap_or(0);
            }
            Ok(removed)
        })
        .await?
    }

    /// Makes `count` running sandboxes from `id`'s current files (one saved layer, shared).
    pub async fn fork(
        self: &Arc<Self>,
        key_id: &str,
        id: &str,
        count: u32,
        timeout: Duration,
    ) -> Result<Vec<Result<Arc<Live>, ManagerError>>, ManagerError> {
        let (rec, layer, layers, _admitted) = {
            let _serial = self.lifecycle_lock.lock().await;
            let live = self
                .get(id)
                .filter(|l| l.snapshot().is_some_and(|r| r.key_id == key_id))
                .ok_or_else(|| ManagerError::no_sandbox(id))?;
            let rec = live.snapshot().ok_or_else(|| ManagerError::no_sandbox(id))?;
            if rec.state == SandboxState::Paused {
                return Err(ManagerError::Conflict(format!(
                    "sandbox {id} is paused: resume it first"
                )));
            }
            // Every child is a new sandbox: all of them fit, or none is made.
            let admitted = self.admit(key_id, u64::from(count), true)?;
            let (layer, layers) = self.save_upper(&live).await?;
            // The fork holds its layer until the children do (each by its own record).
            if let Err(e) = self.store.insert_pending_layer(&layer, &fork_owner(&layer)) {
                self.remove_layer_dir(&layer).await;
                return Err(e.into());
            }
            (rec, layer, layers, admitted)
        };
        let mut out = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let mut lc = crate::store::Lifecycle { layers: layers.clone(), ..Default::default() };
            lc.auto_resume = rec.lifecycle.auto_resume;
            // A fork shares its parent's volumes.
            lc.volumes = rec.lifecycle.volumes.clone();
            let params = self.params_like(&rec, timeout, lc, None);
            out.push(self.start(key_id, params, std::time::Instant::now()).await);
        }
        // A fork whose every child failed leaves a layer nobody uses: released, it goes.
        if let Err(e) = self.store.release_pending(&fork_owner(&layer)) {
            tracing::warn!(layer, error = %e, "releasing a fork's layer");
        }
        self.collect_layers().await;
        Ok(out)
    }

    /// The record of sandbox `id` (live, paused, or ended), read without any effect on it: no
    /// resume, no activity. Sandbox traffic is authenticated against this before anything
    /// else happens, so a request without the sandbox's token cannot wake it, keep it from
    /// idling, or learn more than an unknown id would tell.
    pub fn peek(&self, id: &str) -> Option<SandboxRecord> {
        match self.get(id) {
            Some(l) => l.snapshot(),
            None => self.store.get_sandbox(id).ok().flatten(),
        }
    }

    /// Whether sandbox `id`'s own ports answer without its token (`allowPublicTraffic`),
    /// whether or not it is running now.
    pub fn is_public(&self, id: &str) -> bool {
        match self.get(id) {
            Some(l) => self.net.is_public(&l.net),
            None => self.saved_network(id).public.unwrap_or(self.cfg.network.public_default),
        }
    }

    /// The live sandbox `id` for sandbox traffic: a paused one is resumed first when its
    /// lifecycle asks for it (E2B `autoResume`), otherwise it is not reachable. Counts as use.
    /// Only for traffic already authorised for this sandbox (see [`Manager::peek`]).
    pub async fn auto_resume(self: &Arc<Self>, id: &str) -> Option<Arc<Live>> {
        // Every sandbox request passes here: only a paused sandbox costs more than a lookup.
        let rec = match self.get(id) {
            Some(l) if l.state()? != SandboxState::Paused => {
                l.touch();
                return Some(l);
            }
            Some(l) => l.snapshot()?,
            None => self.store.get_sandbox(id).ok().flatten()?,
        };
        if rec.state != SandboxState::Paused || !rec.lifecycle.auto_resume {
            return None;
        }
        let timeout = Duration::from_millis(self.cfg.default_timeout.as_millis() as u64);
        let (live, _) = self.resume_for(&rec.key_id, id, timeout, "traffic").await.ok()?;
        Some(live)
    }

    /// What it takes to start a sandbox like `rec` (its template, metadata, env and network).
    fn params_like(
        &self,
        rec: &SandboxRecord,
        timeout: Duration,
        lifecycle: crate::store::Lifecycle,
        reuse: Option<Reuse>,
    ) -> CreateParams {
        CreateParams {
            template: rec.template.clone(),
            // Resumed and forked sandboxes stay in the tier their files were written under.
            tier: crate::tier::TierKind::parse(&rec.tier).ok(),
            timeout,
            metadata: rec.metadata.clone(),
            env: rec.env.clone(),
            network: self.saved_network(&rec.id),
            lifecycle,
            reuse,
        }
    }

    /// The network settings `id` was created with (kept in its creation event), so a resumed
    /// sandbox or a fork gets the same egress policy; the server's default if none was saved.
    pub(super) fn saved_network(&self, id: &str) -> crate::network::NetParams {
        self.store
            .events_for(id)
            .ok()
            .and_then(|ev| ev.into_iter().rev().find_map(|(_, _, d)| d.get("network").cloned()))
            .and_then(|n| crate::network::parse(None, Some(&n)).ok())
            .unwrap_or_else(crate::network::NetParams::recovered_default)
    }

    /// Ends a paused sandbox that is not running (files only). False if there is none.
    pub async fn kill_paused(&self, key_id: &str, id: &str) -> Result<bool, ManagerError> {
        let _serial = self.lifecycle_lock.lock().await;
        match self.store.get_sandbox(id)? {
            Some(r) if r.key_id == key_id && r.state == SandboxState::Paused => {
                self.store.set_state(id, SandboxState::Killed)?;
                let _ =
                    self.store.record_event(id, "killed", &serde_json::json!({"reason": "api"}));
                drop(_serial);
                self.collect_layers().await;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Whether `live` has been idle (no API traffic, no CPU use) for its idle timeout; the
    /// reaper then confirms there are no user processes before acting.
    pub(super) fn idle_expired(&self, live: &Live, window: u64, now: i64) -> bool {
        if window == 0 {
            return false;
        }
        let cpu = live.with_instance(|i| i.usage().and_then(|u| u.cpu_ns)).flatten().unwrap_or(0);
        let a = &live.activity;
        let prev_cpu = a.cpu_ns.swap(cpu, Ordering::Relaxed);
        let busy_ns = cpu.saturating_sub(prev_cpu);
        let since = a.cpu_checked_ms.swap(now, Ordering::Relaxed);
        let elapsed_ns = (now - since).max(1) as f64 * 1e6;
        if since == 0 || busy_ns as f64 / elapsed_ns > IDLE_CPU_SHARE {
            live.touch();
            return false;
        }
        now - a.last_ms.load(Ordering::Relaxed) >= window as i64
    }

    /// For a sandbox that should end (`why`): pause it instead when its lifecycle says so.
    /// True if it was paused (or is no longer there to act on).
    pub(super) async fn pause_instead(&self, id: &str, why: &str) -> bool {
        let Some(live) = self.get(id) else { return true };
        let Some(rec) = live.snapshot() else { return true };
        if why == "idle" && self.has_user_processes(&live).await {
            live.touch();
            return true;
        }
        let pause = match why {
            "timeout" => rec.lifecycle.pause_on_timeout,
            "idle" => rec.lifecycle.idle_action_pause,
            _ => false,
        };
        if !pause {
            return false;
        }
        let memory = !(why == "timeout" && rec.lifecycle.timeout_pause_files_only);
        let cause = if why == "timeout" { "timeout" } else { "idle" };
        match self.pause_for(&rec.key_id, id, memory, cause).await {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(sandbox_id = %id, error = %e, "pause on {why} failed; killing");
                false
            }
        }
    }

    async fn has_user_processes(&self, live: &Live) -> bool {
        let call = live.client.call(Request::ListProcesses);
        match tokio::time::timeout(Duration::from_secs(2), call).await {
            Ok(Ok(Reply::Processes(list))) => list.iter().any(|p| {
                !p.spec.tag.as_deref().is_some_and(|t| t.starts_with("ringfence-kernel-"))
            }),
            // Unsure: treat as busy rather than pause a sandbox in the middle of something.
            _ => true,
        }
    }
}

/// The name a fork's hold on its layer goes by while its children start.
fn fork_owner(layer: &str) -> String {
    format!("fork-{layer}")
}

/// Removes the directories of the layers the store dropped, then forgets them; one that cannot
/// be removed stays queued (retried at the next collection or start). Returns how many went.
pub(super) fn remove_dropped_layers(store: &crate::store::Store, root: &std::path::Path) -> usize {
    let Ok(ids) = store.dropped_layers() else { return 0 };
    if ids.is_empty() {
        // The common case (every kill asks): no write, no fsync.
        return 0;
    }
    let mut gone = Vec::with_capacity(ids.len());
    for id in ids {
        // Ids are ours (`l<sandbox id>`), but a path is built from them: one component only.
        let plain = !id.is_empty() && !id.starts_with('.') && !id.contains('/');
        let removed = if plain { std::fs::remove_dir_all(root.join(&id)) } else { Ok(()) };
        match removed {
            Ok(()) => gone.push(id),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => gone.push(id),
            Err(e) => tracing::warn!(layer = %id, error = %e, "removing a dropped layer"),
        }
    }
    let n = gone.len();
    if let Err(e) = store.forget_dropped(&gone) {
        tracing::warn!(error = %e, "forgetting dropped layers");
    }
    // What went above were links into the image store: the content no other link (and no
    // template) uses goes with them.
    if n > 0
        && let Some(data_dir) = root.parent()
    {
        let collected =
            ringfence_image::store::Store::open(data_dir).and_then(|i| i.collect_unlinked());
        if let Err(e) = collected {
            tracing::warn!(error = %e, "collecting unlinked saved layers");
        }
    }
    n
}

/// MemAvailable from /proc/meminfo, in bytes.
fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn live_id(live: &Live) -> String {
    live.snapshot().map(|r| r.id).unwrap_or_default()
}
