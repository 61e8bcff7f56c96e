//! Per-function templates (issue 8): one post-init checkpoint per action version, from which
//! new sandboxes are restored instead of cold-started, and against which they are
//! deduplicated.
//!
//! - [`Command::MakeTemplate`](crate::Command::MakeTemplate) checkpoints a warm sandbox with
//!   `--leave-running` (it keeps serving) into `<images>/tmpl/<key>-<n>/` on the tmpfs; every
//!   image file is checksummed (xxh3-64) and the full image is kept. The key is the action
//!   (`/namespace/name`, so a template is never shared across tenants) and its version.
//! - [`Command::TemplateStart`](crate::Command::TemplateStart) verifies the checksums, then
//!   restores a new, independent sandbox with [`medes_sandbox::Sandbox::restore`] (the plain
//!   full-image restore: own cgroup, network namespace, PID namespace and socket; the runtime
//!   is reseeded like after a dedup start). A missing, disabled or corrupt template is
//!   [`AgentError::TemplateUnavailable`](crate::AgentError::TemplateUnavailable) (a corrupt one
//!   is deleted); a failed restore is
//!   [`AgentError::TemplateStartFailed`](crate::AgentError::TemplateStartFailed), and the
//!   third in a row disables the template of that action version (logged with the reason).
//! - One template per action: a template of another version (the action was updated) is
//!   deleted when a new version is spawned or templated. A template being restored stays on
//!   the tmpfs until its last restore ends (reference counted).
//!
//! **The template is its function's first base** (phase 2). Once made, its pages join the
//! dedup domain's registry as a base ([`TemplateBase`]): the base's pages file
//! `bases/<id>.pages` is a hard link to the template's own pages image (no second copy), served
//! and fingerprinted **raw** (one layout: no pointer rebasing needed). A sandbox restored from
//! the template (or the one it was taken from) is remembered as born from it; its dedup runs
//! [`medes_dedup::dedup_with_template`]: every page is first tried against the template's page
//! at the same address, so most pages are `Same` or a small patch and a rebuild is a copy.
//! The base is never retired while a dedup store depends on it: when the template is replaced
//! (new action version), deleted (corrupt) or disabled, its restore image goes at once but its
//! base stays, reported as an `orphan_base` template entry with the bytes it holds, until its
//! last dependent store (and born sandbox) is gone; it is then retired.
//!
//! Templates survive an agent restart like stores and bases (see `persist.rs`): the image and
//! its metadata stay on the tmpfs at shutdown, and the next agent verifies every checksum,
//! re-registers the base and reports the template in [`crate::NodeStatus::templates`], from
//! which the controller re-learns it.

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use medes_core::{ActionName, SandboxId};
use medes_dedup::{BaseId, BaseMeta, DumpImage, TemplateHint, TemplateLayout};
use parking_lot::Mutex;
use tracing::{info, warn};

use crate::{BaseRec, SandboxInfo};

/// Restores of one template that fail in a row before it is disabled.
pub(crate) const MAX_FAILURES: u32 = 3;

/// A template's base: its raw pages registered in its dedup domain. Dropped when neither the
/// template nor a sandbox born from it needs it any more; it is then retired, or, while dedup
/// stores depend on it, kept as an orphan until they are gone.
pub(crate) struct TemplateBase {
    pub(crate) rec: Arc<BaseRec>,
    pub(crate) layout: TemplateLayout,
    action: ActionName,
    version: String,
    orphans: Arc<Mutex<Vec<Orphan>>>,
    keep: Arc<AtomicBool>,
}

/// A template base whose template is gone while dedup stores depend on it.
struct Orphan {
    action: ActionName,
    version: String,
    rec: Arc<BaseRec>,
}

impl Drop for TemplateBase {
    fn drop(&mut self) {
        if self.keep.load(Ordering::SeqCst) {
            return; // agent shutdown: kept for the next agent
        }
        match self.rec.domain.retire(self.rec.id) {
            Ok(()) => {
                info!(action = %self.action, base = self.rec.id.0, "template base retired");
            }
            Err(crate::domain::RetireError::InUse(n)) => {
                info!(action = %self.action, base = self.rec.id.0, dependents = n,
                      "template gone; its base stays while dedup sandboxes depend on it");
                self.orphans.lock().push(Orphan {
                    action: self.action.clone(),
                    version: self.version.clone(),
                    rec: self.rec.clone(),
                });
            }
        }
    }
}

/// One template: a full CRIU image of a post-init sandbox.
pub(crate) struct Template {
    /// The images directory.
    pub(crate) dir: PathBuf,
    /// The sandbox it was taken from (code directory, environment, domain, action, version).
    pub(crate) info: Arc<SandboxInfo>,
    /// Every image file and its xxh3-64.
    sums: Vec<(String, u64)>,
    /// Bytes held on the tmpfs (each file rounded up to pages).
    pub(crate) held_bytes: u64,
    /// Bytes of its page images.
    pub(crate) image_bytes: u64,
    /// Failed restores in a row.
    failures: AtomicU32,
    /// Its base (set once, after the template is made or reloaded).
    pub(crate) base: Mutex<Option<Arc<TemplateBase>>>,
    /// Set at agent shutdown: the files stay for the next agent.
    keep: Arc<AtomicBool>,
}

impl Drop for Template {
    fn drop(&mut self) {
        if !self.keep.load(Ordering::SeqCst) {
            crate::persist::remove_template(&self.dir);
        }
    }
}

/// The state of an action's template.
enum Slot {
    /// A make-template is in progress.
    Building,
    Ready(Arc<Template>),
    /// Disabled after repeated restore failures: the reason.
    Disabled(String),
}

struct Rec {
    version: String,
    slot: Slot,
}

/// What [`Templates::get`] found instead of a usable template.
pub(crate) enum Unavailable {
    /// No template of this version.
    Missing,
    /// Being built.
    Building,
    /// Disabled, with the reason.
    Disabled(String),
}

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unavailable::Missing => f.write_str("no template of this version"),
            Unavailable::Building => f.write_str("the template is being built"),
            Unavailable::Disabled(r) => write!(f, "the template is disabled: {r}"),
        }
    }
}

/// Counts of the template paths since the agent started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TemplateCounters {
    /// Templates made.
    pub made: u64,
    /// Template starts that succeeded.
    pub starts: u64,
    /// Template starts whose restore failed.
    pub start_failures: u64,
    /// Templates found corrupt (checksum) and deleted.
    pub corrupt: u64,
    /// Templates disabled after repeated failures.
    pub disabled: u64,
    /// Templates deleted because their action changed version.
    pub invalidated: u64,
    /// Pages of template-born sandboxes stored against the template's page at their own
    /// address (identical or patched), summed over their dedups.
    #[serde(default)]
    pub positional_pages: u64,
}

/// The node's templates, one per action.
pub(crate) struct Templates {
    root: PathBuf,
    map: Mutex<HashMap<ActionName, Rec>>,
    next: AtomicU64,
    pub(crate) counters: Mutex<TemplateCounters>,
    /// Sandboxes born from a template (restored from it, or the one it was taken from) that
    /// may still be deduplicated against it.
    born: Mutex<HashMap<SandboxId, Arc<TemplateBase>>>,
    /// Bases of gone templates that dedup stores still depend on.
    orphans: Arc<Mutex<Vec<Orphan>>>,
    /// Set at agent shutdown (templates and their bases are kept for the next agent).
    keep: Arc<AtomicBool>,
}

impl Templates {
    /// Templates under `<images>/tmpl`, with those an earlier agent kept (`loaded`, verified
    /// by `persist::load`).
    pub(crate) fn new(
        images: &Path,
        loaded: Vec<crate::persist::LoadedTemplate>,
    ) -> std::io::Result<Templates> {
        let root = images.join("tmpl");
        fs::create_dir_all(&root)?;
        let t = Templates {
            root,
            map: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
            counters: Mutex::new(TemplateCounters::default()),
            born: Mutex::new(HashMap::new()),
            orphans: Arc::new(Mutex::new(Vec::new())),
            keep: Arc::new(AtomicBool::new(false)),
        };
        for l in loaded {
            let (files, image_bytes) = sizes(&l.dir);
            let tmpl = Template {
                dir: l.dir,
                info: l.info,
                sums: l.sums,
                held_bytes: files,
                image_bytes,
                failures: AtomicU32::new(0),
                base: Mutex::new(None),
                keep: t.keep.clone(),
            };
            if let Some((rec, layout)) = l.base {
                *tmpl.base.lock() = Some(t.base_of(&tmpl.info, rec, layout));
            }
            let (action, version) = (tmpl.info.action.clone(), tmpl.info.version.clone());
            info!(action = %action, version = %version, base = ?tmpl.base.lock().as_ref().map(|b| b.rec.id.0),
                  "template kept by the previous agent reloaded");
            t.map.lock().insert(
                action,
                Rec {
                    version,
                    slot: Slot::Ready(Arc::new(tmpl)),
                },
            );
        }
        Ok(t)
    }

    /// Wraps a template's registered base.
    fn base_of(
        &self,
        info: &SandboxInfo,
        rec: Arc<BaseRec>,
        layout: TemplateLayout,
    ) -> Arc<TemplateBase> {
        Arc::new(TemplateBase {
            rec,
            layout,
            action: info.action.clone(),
            version: info.version.clone(),
            orphans: self.orphans.clone(),
            keep: self.keep.clone(),
        })
    }

    /// Agent shutdown: forgets every template, keeping their files (and their bases) for the
    /// next agent. Restores in flight keep theirs until they end.
    pub(crate) fn clear(&self) {
        self.keep.store(true, Ordering::SeqCst);
        let all: Vec<Rec> = self.map.lock().drain().map(|(_, r)| r).collect();
        drop(all);
        self.born.lock().clear();
        self.orphans.lock().clear();
    }

    /// A fresh directory for a template of `action` at `version`.
    pub(crate) fn new_dir(&self, action: &ActionName, version: &str) -> PathBuf {
        let key = xxhash_rust::xxh3::xxh3_64(format!("{action}\0{version}").as_bytes());
        loop {
            let n = self.next.fetch_add(1, Ordering::Relaxed);
            let dir = self.root.join(format!("{key:016x}-{n}"));
            if !dir.exists() && !crate::persist::template_meta_path(&dir).exists() {
                return dir;
            }
        }
    }

    /// Remembers that `sandbox` was born from the template whose base is `base`.
    pub(crate) fn set_born(&self, sandbox: &SandboxId, base: Arc<TemplateBase>) {
        self.born.lock().insert(sandbox.clone(), base);
    }

    /// The template base `sandbox` was born from, if any (taken: one dedup per sandbox).
    pub(crate) fn take_born(&self, sandbox: &SandboxId) -> Option<Arc<TemplateBase>> {
        self.born.lock().remove(sandbox)
    }

    /// Forgets born sandboxes that are gone, and retires orphaned template bases nothing
    /// depends on any more.
    pub(crate) fn sweep(&self, alive: impl Fn(&SandboxId) -> bool) {
        let gone: Vec<Arc<TemplateBase>> = {
            let mut b = self.born.lock();
            let ids: Vec<SandboxId> = b.keys().filter(|id| !alive(id)).cloned().collect();
            ids.iter().filter_map(|id| b.remove(id)).collect()
        };
        drop(gone);
        self.orphans.lock().retain(|o| {
            if o.rec.domain.dependents(o.rec.id) > 0 {
                return true;
            }
            match o.rec.domain.retire(o.rec.id) {
                Ok(()) => {
                    info!(action = %o.action, base = o.rec.id.0, "orphaned template base retired");
                    false
                }
                Err(_) => true,
            }
        });
    }

    /// Deletes the template of `action` if it is of another version than `version`.
    pub(crate) fn invalidate_other(&self, action: &ActionName, version: &str) {
        let old = {
            let mut m = self.map.lock();
            match m.get(action) {
                Some(r) if r.version != version && !matches!(r.slot, Slot::Building) => {
                    m.remove(action)
                }
                _ => None,
            }
        };
        if let Some(r) = old {
            self.counters.lock().invalidated += 1;
            info!(action = %action, old_version = %r.version, new_version = %version, "template of an older version deleted");
        }
    }

    /// Marks a make-template of `action` at `version` as in progress. `Ok(Some(t))`: a ready
    /// template of this version exists already; `Err`: it cannot be made now.
    pub(crate) fn begin(
        &self,
        action: &ActionName,
        version: &str,
    ) -> Result<Option<Arc<Template>>, Unavailable> {
        let mut m = self.map.lock();
        if let Some(r) = m.get(action)
            && r.version == version
        {
            return match &r.slot {
                Slot::Ready(t) => Ok(Some(t.clone())),
                Slot::Building => Err(Unavailable::Building),
                Slot::Disabled(reason) => Err(Unavailable::Disabled(reason.clone())),
            };
        }
        let old = m.insert(
            action.clone(),
            Rec {
                version: version.to_string(),
                slot: Slot::Building,
            },
        );
        drop(m);
        if old.is_some() {
            self.counters.lock().invalidated += 1;
        }
        Ok(None)
    }

    /// Ends a make-template begun with [`Templates::begin`]: `Some` installs it, `None`
    /// forgets the attempt.
    pub(crate) fn finish(&self, action: &ActionName, version: &str, t: Option<Arc<Template>>) {
        let mut m = self.map.lock();
        let ours = m
            .get(action)
            .is_some_and(|r| r.version == version && matches!(r.slot, Slot::Building));
        if !ours {
            return; // invalidated meanwhile: `t` is dropped (deleted)
        }
        match t {
            Some(t) => {
                m.insert(
                    action.clone(),
                    Rec {
                        version: version.to_string(),
                        slot: Slot::Ready(t),
                    },
                );
                drop(m);
                self.counters.lock().made += 1;
            }
            None => {
                m.remove(action);
            }
        }
    }

    /// The ready template of `action` at `version`.
    pub(crate) fn get(
        &self,
        action: &ActionName,
        version: &str,
    ) -> Result<Arc<Template>, Unavailable> {
        match self.map.lock().get(action) {
            Some(r) if r.version == version => match &r.slot {
                Slot::Ready(t) => Ok(t.clone()),
                Slot::Building => Err(Unavailable::Building),
                Slot::Disabled(reason) => Err(Unavailable::Disabled(reason.clone())),
            },
            _ => Err(Unavailable::Missing),
        }
    }

    /// Deletes `t` (found corrupt) if it is still the action's template.
    pub(crate) fn remove(&self, t: &Arc<Template>, reason: &str) {
        let removed = {
            let mut m = self.map.lock();
            let current = m
                .get(&t.info.action)
                .is_some_and(|r| matches!(&r.slot, Slot::Ready(cur) if Arc::ptr_eq(cur, t)));
            if current {
                m.remove(&t.info.action)
            } else {
                None
            }
        };
        if removed.is_some() {
            self.counters.lock().corrupt += 1;
            warn!(action = %t.info.action, version = %t.info.version, %reason, "template deleted");
        }
    }

    /// A restore of `t` succeeded.
    pub(crate) fn succeeded(&self, t: &Template) {
        t.failures.store(0, Ordering::SeqCst);
        self.counters.lock().starts += 1;
    }

    /// A restore of `t` failed; the [`MAX_FAILURES`]th in a row disables it for its action
    /// version. Returns whether it is now disabled.
    pub(crate) fn failed(&self, t: &Arc<Template>, reason: &str) -> bool {
        self.counters.lock().start_failures += 1;
        let n = t.failures.fetch_add(1, Ordering::SeqCst) + 1;
        if n < MAX_FAILURES {
            return false;
        }
        let why = format!("{n} restores in a row failed; last: {reason}");
        let disabled = {
            let mut m = self.map.lock();
            match m.get_mut(&t.info.action) {
                Some(r) if matches!(&r.slot, Slot::Ready(cur) if Arc::ptr_eq(cur, t)) => {
                    r.slot = Slot::Disabled(why.clone());
                    true
                }
                _ => false,
            }
        };
        if disabled {
            self.counters.lock().disabled += 1;
            warn!(action = %t.info.action, version = %t.info.version, reason = %why, "template disabled for this action version");
        }
        disabled
    }

    /// The templates for [`crate::NodeStatus::templates`].
    pub(crate) fn status(&self) -> Vec<crate::TemplateStatus> {
        let mut v: Vec<crate::TemplateStatus> = self
            .map
            .lock()
            .iter()
            .map(|(a, r)| {
                let (state, held_bytes, image_bytes, reason, domain) = match &r.slot {
                    Slot::Building => ("building", 0, 0, None, None),
                    Slot::Ready(t) => (
                        "ready",
                        t.held_bytes
                            + t.base
                                .lock()
                                .as_ref()
                                .map_or(0, |b| b.rec.domain.registry_share(b.rec.pages)),
                        t.image_bytes,
                        None,
                        Some(t.info.domain.key.clone()),
                    ),
                    Slot::Disabled(why) => ("disabled", 0, 0, Some(why.clone()), None),
                };
                crate::TemplateStatus {
                    action: a.clone(),
                    version: r.version.clone(),
                    state: state.to_string(),
                    held_bytes,
                    image_bytes,
                    reason,
                    domain,
                }
            })
            .collect();
        // Bases of gone templates still held for sandboxes born from them.
        let current: Vec<BaseId> = self
            .map
            .lock()
            .values()
            .filter_map(|r| match &r.slot {
                Slot::Ready(t) => t.base.lock().as_ref().map(|b| b.rec.id),
                _ => None,
            })
            .collect();
        let mut held: Vec<Arc<TemplateBase>> = self
            .born
            .lock()
            .values()
            .filter(|b| !current.contains(&b.rec.id))
            .cloned()
            .collect();
        held.sort_by_key(|b| b.rec.id);
        held.dedup_by_key(|b| b.rec.id);
        v.extend(held.iter().map(|b| crate::TemplateStatus {
            action: b.action.clone(),
            version: b.version.clone(),
            state: "orphan_base".to_string(),
            held_bytes: b.rec.held(),
            image_bytes: b.rec.bytes,
            reason: Some(format!(
                "base {} of a gone template; sandboxes born from it may still be deduplicated against it",
                b.rec.id.0
            )),
            domain: Some(b.rec.domain.key.clone()),
        }));
        v.extend(self.orphans.lock().iter().map(|o| crate::TemplateStatus {
            action: o.action.clone(),
            version: o.version.clone(),
            state: "orphan_base".to_string(),
            held_bytes: o.rec.held(),
            image_bytes: o.rec.bytes,
            reason: Some(format!(
                "base {} of a gone template; {} dedup sandboxes depend on it",
                o.rec.id.0,
                o.rec.domain.dependents(o.rec.id)
            )),
            domain: Some(o.rec.domain.key.clone()),
        }));
        v.sort_by_key(|t| t.action.to_string());
        v
    }

    /// The directory of the ready template of `action` (tests: fault injection).
    pub(crate) fn dir_of(&self, action: &ActionName) -> Option<PathBuf> {
        match self.map.lock().get(action).map(|r| &r.slot) {
            Some(Slot::Ready(t)) => Some(t.dir.clone()),
            _ => None,
        }
    }
}

/// Checksums every image file of a checkpoint directory (`*.log` left out). Blocking.
fn checksum_dir(dir: &Path) -> std::io::Result<Vec<(String, u64, u64)>> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".log") || !e.file_type()?.is_file() {
            continue;
        }
        let (sum, len) = checksum_file(&e.path())?;
        out.push((name, sum, len));
    }
    out.sort();
    Ok(out)
}

fn checksum_file(path: &Path) -> std::io::Result<(u64, u64)> {
    let mut f = fs::File::open(path)?;
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        len += n as u64;
    }
    Ok((h.digest(), len))
}

/// Bytes held on the tmpfs by a template's files and bytes of its page images.
fn sizes(dir: &Path) -> (u64, u64) {
    let (mut held, mut pages) = (0, 0);
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let len = e.metadata().map_or(0, |m| m.len());
            held += crate::images::held_bytes(len);
            if e.file_name().to_string_lossy().starts_with("pages-") {
                pages += len;
            }
        }
    }
    (held, pages)
}

/// Checks every file of `sums` in `dir` against its checksum. Blocking.
pub(crate) fn verify_sums(dir: &Path, sums: &[(String, u64)]) -> Result<(), String> {
    if sums.is_empty() {
        return Err("no checksummed files".into());
    }
    for (name, want) in sums {
        let path = dir.join(name);
        let (got, _) = checksum_file(&path).map_err(|e| format!("reading {path:?}: {e}"))?;
        if got != *want {
            return Err(format!(
                "checksum mismatch in {name}: {got:016x}, expected {want:016x}"
            ));
        }
    }
    Ok(())
}

/// Making a template failed ([`Command::MakeTemplate`](crate::Command::MakeTemplate)).
#[derive(Debug, thiserror::Error)]
pub(crate) enum MakeTemplateError {
    /// The agent is shutting down.
    #[error("the node agent is shutting down")]
    ShuttingDown,
    /// CRIU's dump failed.
    #[error(transparent)]
    Checkpoint(medes_sandbox::CheckpointError),
    /// The checkpoint's files could not be checksummed.
    #[error("checksumming {dir:?}")]
    Checksum {
        /// The checkpoint.
        dir: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The checkpoint has no files.
    #[error("the checkpoint in {dir:?} has no files")]
    Empty {
        /// The checkpoint.
        dir: PathBuf,
    },
    /// The checksumming task was lost (panicked or cancelled).
    #[error("the checksum task failed")]
    SealTask(#[source] tokio::task::JoinError),
    /// The task registering the template as a base was lost (panicked or cancelled).
    #[error("the template base task failed")]
    BaseTask(#[source] tokio::task::JoinError),
}

impl MakeTemplateError {
    /// What failed, by variant (as for a make-base or dedup).
    pub(crate) fn kind(&self) -> crate::CheckpointFailure {
        use crate::CheckpointFailure as K;
        match self {
            MakeTemplateError::Checkpoint(e) => crate::checkpoint_failure(e),
            MakeTemplateError::Checksum { .. }
            | MakeTemplateError::Empty { .. }
            | MakeTemplateError::SealTask(_) => K::Image,
            MakeTemplateError::ShuttingDown | MakeTemplateError::BaseTask(_) => K::Other,
        }
    }
}

impl Template {
    /// A template over the checkpoint in `dir` (checksummed now). Blocking.
    pub(crate) fn seal(
        dir: PathBuf,
        info: Arc<SandboxInfo>,
        keep: Arc<AtomicBool>,
    ) -> Result<Template, MakeTemplateError> {
        let _ = fs::remove_file(dir.join("dump.log"));
        let files = match checksum_dir(&dir) {
            Ok(f) => f,
            Err(source) => return Err(MakeTemplateError::Checksum { dir, source }),
        };
        if files.is_empty() {
            return Err(MakeTemplateError::Empty { dir });
        }
        let held_bytes = files
            .iter()
            .map(|(_, _, l)| crate::images::held_bytes(*l))
            .sum();
        let image_bytes = files
            .iter()
            .filter(|(n, _, _)| n.starts_with("pages-"))
            .map(|(_, _, l)| *l)
            .sum();
        Ok(Template {
            dir,
            info,
            sums: files.into_iter().map(|(n, s, _)| (n, s)).collect(),
            held_bytes,
            image_bytes,
            failures: AtomicU32::new(0),
            base: Mutex::new(None),
            keep,
        })
    }

    /// Checks every image file against its checksum. Blocking.
    pub(crate) fn verify(&self) -> Result<(), String> {
        verify_sums(&self.dir, &self.sums)
    }

    /// Writes the metadata that lets the next agent reload the template.
    fn save_meta(&self) {
        let i = &self.info;
        let meta = crate::persist::TemplateFile {
            format: 1,
            sandbox: i.spec.id.clone(),
            action: i.action.clone(),
            version: i.version.clone(),
            domain: i.domain.key.clone(),
            function: i.function.clone(),
            code_dir: i.spec.code_dir.clone(),
            memory_limit: i.spec.memory_limit,
            env: i.spec.env.clone(),
            sums: self.sums.clone(),
            base: self.base.lock().as_ref().map(|b| b.rec.id),
        };
        if let Err(error) = crate::persist::save_template_meta(&self.dir, &meta) {
            warn!(path = %self.dir.display(), %error, "template metadata not written: the template will not survive an agent restart");
        }
    }
}

impl crate::Inner {
    /// [`Command::MakeTemplate`](crate::Command::MakeTemplate).
    pub(crate) async fn make_template(
        self: &Arc<Self>,
        id: medes_core::SandboxId,
    ) -> Result<crate::TemplateReply, crate::AgentError> {
        use crate::{AgentError, SandboxForm, wrong_form};
        self.check_running()?;
        let slot = self.live(&id)?;
        let info = slot.info.clone();
        let unavailable = |reason: String| AgentError::TemplateUnavailable {
            action: info.action.clone(),
            version: info.version.clone(),
            reason,
        };
        match self.templates.begin(&info.action, &info.version) {
            Ok(Some(t)) => {
                crate::release(slot).await;
                return Ok(crate::TemplateReply {
                    image_bytes: t.image_bytes,
                    held_bytes: t.held_bytes,
                    checkpoint_ms: 0.0,
                    checksum_ms: 0.0,
                    existed: true,
                });
            }
            Ok(None) => {}
            Err(u) => {
                crate::release(slot).await;
                return Err(unavailable(u.to_string()));
            }
        }
        if slot
            .changing
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            self.templates.finish(&info.action, &info.version, None);
            crate::release(slot).await;
            return Err(wrong_form(
                id,
                SandboxForm::Warm,
                "a make-base, dedup or make-template of it is in progress",
            ));
        }
        let r = self.make_template_of(&slot).await;
        slot.changing.store(false, Ordering::SeqCst);
        let lost = r.is_err() && !slot.sandbox.is_alive();
        match r {
            Ok((t, reply)) => {
                info!(sandbox = %id, action = %info.action, version = %info.version,
                      image_bytes = reply.image_bytes, held_bytes = reply.held_bytes,
                      checkpoint_ms = reply.checkpoint_ms, checksum_ms = reply.checksum_ms,
                      "template made");
                self.templates
                    .finish(&info.action, &info.version, Some(Arc::new(t)));
                crate::release(slot).await;
                Ok(reply)
            }
            Err(e) => {
                self.templates.finish(&info.action, &info.version, None);
                let (kind, reason) = (e.kind(), crate::error_chain(&e));
                warn!(sandbox = %id, action = %info.action, %reason, "template not made");
                if lost {
                    self.drop_lost(&id, &slot).await;
                }
                crate::release(slot).await;
                Err(self.not_deduplicable(id, kind, reason, !lost))
            }
        }
    }

    async fn make_template_of(
        self: &Arc<Self>,
        slot: &Arc<crate::Slot>,
    ) -> Result<(Template, crate::TemplateReply), MakeTemplateError> {
        let _permit = self
            .dedups
            .acquire()
            .await
            .map_err(|_| MakeTemplateError::ShuttingDown)?;
        let info = slot.info.clone();
        let dir = self.templates.new_dir(&info.action, &info.version);
        let _ = fs::remove_dir_all(&dir);
        let t0 = std::time::Instant::now();
        let ck = slot
            .sandbox
            .checkpoint(&dir, medes_sandbox::CheckpointMode::LeaveRunning)
            .await;
        let checkpoint_ms = crate::ms(t0.elapsed());
        if let Err(e) = ck {
            let _ = fs::remove_dir_all(&dir);
            return Err(MakeTemplateError::Checkpoint(e));
        }
        let t1 = std::time::Instant::now();
        let d2 = dir.clone();
        let keep = self.templates.keep.clone();
        let sealed = tokio::task::spawn_blocking(move || Template::seal(d2, info, keep))
            .await
            .unwrap_or_else(|e| Err(MakeTemplateError::SealTask(e)));
        let t = match sealed {
            Ok(t) => t,
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        // The template is the function's first base; without one it still serves starts.
        let inner = self.clone();
        let t = tokio::task::spawn_blocking(move || {
            let t0 = std::time::Instant::now();
            match inner.template_base(&t) {
                Ok(b) => {
                    info!(action = %t.info.action, base = b.rec.id.0, pages = b.rec.pages,
                          ms = crate::ms(t0.elapsed()), "template registered as a base");
                    *t.base.lock() = Some(b);
                }
                Err(reason) => {
                    warn!(action = %t.info.action, %reason, "template not registered as a base: no dedup against it");
                }
            }
            t.save_meta();
            t
        })
        .await
        .map_err(MakeTemplateError::BaseTask)?;
        if let Some(b) = t.base.lock().clone() {
            self.templates.set_born(&slot.info.spec.id, b);
        }
        let reply = crate::TemplateReply {
            image_bytes: t.image_bytes,
            held_bytes: t.held_bytes,
            checkpoint_ms,
            checksum_ms: crate::ms(t1.elapsed()),
            existed: false,
        };
        Ok((t, reply))
    }

    /// [`Command::TemplateStart`](crate::Command::TemplateStart).
    pub(crate) async fn template_start(
        self: &Arc<Self>,
        c: crate::TemplateStartCommand,
    ) -> Result<crate::TemplateStartReply, crate::AgentError> {
        use crate::{AgentError, Entry, SandboxForm};
        self.check_running()?;
        let t0 = std::time::Instant::now();
        let unavailable = |reason: String| AgentError::TemplateUnavailable {
            action: c.action.clone(),
            version: c.version.clone(),
            reason,
        };
        if !crate::valid_id(&c.sandbox) {
            return Err(AgentError::BadSandboxId(c.sandbox));
        }
        let t = self
            .templates
            .get(&c.action, &c.version)
            .map_err(|u| unavailable(u.to_string()))?;
        {
            let mut tab = self.sandboxes.lock();
            if tab.contains_key(&c.sandbox) {
                return Err(AgentError::BadSandboxId(c.sandbox));
            }
            tab.insert(
                c.sandbox.clone(),
                Entry::Busy {
                    form: SandboxForm::Warm,
                    purge: false,
                },
            );
        }
        // A start like a cold one: bounded by the same permits.
        let Ok(_permit) = self.starts.acquire().await else {
            self.finish_busy(&c.sandbox, None);
            return Err(AgentError::ShuttingDown);
        };
        // The checksums are verified while CRIU restores (on another core); a restored process
        // is only handed out once its template verified.
        let t2 = t.clone();
        let verify = tokio::task::spawn_blocking(move || {
            let t = std::time::Instant::now();
            t2.verify().map(|()| crate::ms(t.elapsed()))
        });
        let spec = medes_sandbox::SandboxSpec {
            id: c.sandbox.clone(),
            code_dir: t.info.spec.code_dir.clone(),
            memory_limit: c.memory_limit,
            env: c.env,
        };
        let bound = std::time::Duration::from_millis(self.cfg.dedup.restore_timeout_ms.max(1));
        let t1 = std::time::Instant::now();
        let restore = async {
            let r = tokio::time::timeout(
                bound,
                medes_sandbox::Sandbox::restore(&self.cfg.sandbox, spec.clone(), &t.dir),
            )
            .await;
            (r, crate::ms(t1.elapsed()))
        };
        let (verified, (r, restore_ms)) = tokio::join!(verify, restore);
        let verified = verified.unwrap_or_else(|e| Err(format!("checksum task failed: {e}")));
        let verify_ms = match verified {
            Ok(ms) => ms,
            Err(reason) => {
                if let Ok(Ok(sb)) = r {
                    let _ = sb.destroy().await;
                }
                self.finish_busy(&c.sandbox, None);
                self.templates.remove(&t, &reason);
                return Err(unavailable(format!("corrupt, deleted: {reason}")));
            }
        };
        let sandbox = match r {
            Ok(Ok(sb)) => sb,
            Ok(Err(e)) => {
                return Err(self.template_failed(&c.sandbox, &t, crate::error_chain(&e)));
            }
            Err(_) => {
                return Err(self.template_failed(
                    &c.sandbox,
                    &t,
                    format!("no restored runtime within {bound:?}"),
                ));
            }
        };
        self.templates.succeeded(&t);
        if let Some(b) = t.base.lock().clone() {
            self.templates.set_born(&c.sandbox, b);
        }
        let info = Arc::new(SandboxInfo {
            spec,
            domain: t.info.domain.clone(),
            function: t.info.function.clone(),
            action: t.info.action.clone(),
            version: t.info.version.clone(),
        });
        let slot = Arc::new(crate::Slot::new(sandbox, info, None));
        if !self.finish_busy(&c.sandbox, Some(Entry::Live(slot.clone()))) {
            crate::release(slot).await;
            return Err(AgentError::UnknownSandbox(c.sandbox));
        }
        let total_ms = crate::ms(t0.elapsed());
        tracing::debug!(sandbox = %c.sandbox, action = %c.action, verify_ms, restore_ms, total_ms, "template start");
        Ok(crate::TemplateStartReply {
            verify_ms,
            restore_ms,
            total_ms,
        })
    }

    /// Registers template `t` as a base of its domain: its pages image hard-linked as the
    /// base's pages file, fingerprinted raw. Blocking and CPU-heavy.
    fn template_base(&self, t: &Template) -> Result<Arc<TemplateBase>, String> {
        let dump = DumpImage::open(&t.dir).map_err(|e| crate::error_chain(&e))?;
        if dump.n_pages() == 0 {
            return Err("the template has no pages".into());
        }
        let layout = TemplateLayout::of(&dump);
        let id = BaseId(self.next_base.fetch_add(1, Ordering::Relaxed));
        let bases_dir = self.images.join("bases");
        fs::create_dir_all(&bases_dir).map_err(|e| format!("creating {bases_dir:?}: {e}"))?;
        let pages = crate::persist::base_pages_path(&bases_dir, id);
        let _ = fs::remove_file(&pages);
        let linked = match dump.procs.as_slice() {
            [one] => fs::hard_link(t.dir.join(&one.pages_file), &pages),
            // Several processes: their pages in dump order (a copy).
            procs => {
                let all: Vec<u8> = procs.iter().flat_map(|p| p.bytes().to_vec()).collect();
                fs::write(&pages, all)
            }
        };
        linked.map_err(|e| format!("linking the pages as {pages:?}: {e}"))?;
        let fail = |reason: String| {
            crate::persist::remove_base(&bases_dir, id);
            reason
        };
        let image = crate::domain::BaseImage::map(&pages)
            .map_err(|e| fail(format!("mapping {pages:?}: {e}")))?;
        let sum = xxhash_rust::xxh3::xxh3_64(image.data());
        let meta = BaseMeta {
            function: t.info.function.clone(),
            node: self.cfg.dedup.engine.local_node,
        };
        let domain = t.info.domain.clone();
        let engine = self.cfg.dedup.engine;
        let bytes = self
            .bg_pool
            .install(|| domain.add_template_base(id, meta.clone(), &dump, image, &engine))
            .map_err(|e| fail(crate::error_chain(&e)))?;
        // Kept under a name of its own (not its source sandbox's, which may be a base too): an
        // orphaned template base reloaded by the next agent is listed as `tmpl-<id>`.
        let name = SandboxId(format!("tmpl-{}", id.0));
        if let Err(error) =
            crate::persist::save_template_base(&bases_dir, &domain.key, id, &meta, &name, sum)
        {
            warn!(base = id.0, %error, "template base metadata not written: it will not survive a restart");
        }
        let rec = Arc::new(BaseRec {
            domain,
            id,
            bytes,
            pages: dump.n_pages(),
        });
        self.counters.lock().bases += 1;
        Ok(self.templates.base_of(&t.info, rec, layout))
    }

    /// The dedup pass of a sandbox's dump: against its template first if it was born from one
    /// (see the module documentation), else the plain [`medes_dedup::dedup`]. Blocking.
    pub(crate) fn dedup_pass(
        &self,
        sandbox: &SandboxId,
        dump: &DumpImage,
        domain: &crate::domain::Domain,
        bases: &crate::domain::BaseSet,
        engine: &medes_dedup::DedupConfig,
    ) -> Result<(medes_dedup::DedupStore, medes_dedup::DedupStats), medes_dedup::DedupError> {
        use medes_dedup::BasePages;
        let born = self.templates.take_born(sandbox);
        let usable = born
            .as_ref()
            .filter(|b| b.rec.domain.key == domain.key && bases.n_pages(b.rec.id).is_ok());
        let Some(b) = usable else {
            return self
                .bg_pool
                .install(|| medes_dedup::dedup(dump, domain.registry(), bases, engine));
        };
        let hint = TemplateHint::new(b.rec.id, &b.layout, dump);
        let r = self.bg_pool.install(|| {
            medes_dedup::dedup_with_template(dump, domain.registry(), bases, engine, &hint)
        });
        tracing::debug!(sandbox = %sandbox, base = b.rec.id.0, candidates = hint.candidates(),
                        positional = hint.hits(), pages = dump.n_pages(), "dedup against the template");
        self.templates.counters.lock().positional_pages += hint.hits();
        r
    }

    /// Forgets gone born sandboxes and retires orphaned template bases without dependents.
    pub(crate) fn sweep_templates(&self) {
        let alive: std::collections::HashSet<SandboxId> =
            self.sandboxes.lock().keys().cloned().collect();
        self.templates.sweep(|id| alive.contains(id));
    }

    fn template_failed(
        &self,
        sandbox: &medes_core::SandboxId,
        t: &Arc<Template>,
        reason: String,
    ) -> crate::AgentError {
        self.finish_busy(sandbox, None);
        warn!(sandbox = %sandbox, action = %t.info.action, %reason, "template start failed");
        let disabled = self.templates.failed(t, &reason);
        crate::AgentError::TemplateStartFailed {
            sandbox: sandbox.clone(),
            reason,
            disabled,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::MakeTemplateError;

    #[tokio::test]
    async fn make_template_errors_map_to_their_failure_kinds() {
        let join_error = || async {
            let h = tokio::spawn(std::future::pending::<()>());
            h.abort();
            h.await.expect_err("aborted")
        };
        let cases = [
            (MakeTemplateError::ShuttingDown, "not_deduplicable"),
            (
                MakeTemplateError::Checkpoint(medes_sandbox::CheckpointError::TcpSocket {
                    status: "exit status: 1".into(),
                    log_tail: "Connected TCP socket".into(),
                }),
                "tcp_socket",
            ),
            (
                MakeTemplateError::Checkpoint(medes_sandbox::CheckpointError::NotRunning),
                "sandbox_gone",
            ),
            (
                MakeTemplateError::Checksum {
                    dir: "/t".into(),
                    source: std::io::Error::from(std::io::ErrorKind::NotFound),
                },
                "checkpoint_failed",
            ),
            (
                MakeTemplateError::Empty { dir: "/t".into() },
                "checkpoint_failed",
            ),
            (
                MakeTemplateError::SealTask(join_error().await),
                "checkpoint_failed",
            ),
            (
                MakeTemplateError::BaseTask(join_error().await),
                "not_deduplicable",
            ),
        ];
        for (e, label) in cases {
            assert_eq!(e.kind().label(), label, "{e}");
        }
    }
}
