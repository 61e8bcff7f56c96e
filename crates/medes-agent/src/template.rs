//! Per-function templates (issue 8): one post-init checkpoint per action version, from which
//! new sandboxes are restored instead of cold-started.
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
//! - Templates are not kept across an agent restart (the directory is emptied at start and at
//!   shutdown).

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use medes_core::ActionName;
use parking_lot::Mutex;
use tracing::{info, warn};

use crate::SandboxInfo;

/// Restores of one template that fail in a row before it is disabled.
pub(crate) const MAX_FAILURES: u32 = 3;

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
}

impl Drop for Template {
    fn drop(&mut self) {
        if let Err(error) = fs::remove_dir_all(&self.dir)
            && error.kind() != std::io::ErrorKind::NotFound
        {
            warn!(path = %self.dir.display(), %error, "removing a template");
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
}

/// The node's templates, one per action.
pub(crate) struct Templates {
    root: PathBuf,
    map: Mutex<HashMap<ActionName, Rec>>,
    next: AtomicU64,
    pub(crate) counters: Mutex<TemplateCounters>,
}

impl Templates {
    /// Templates under `<images>/tmpl`, emptied (templates do not survive an agent restart).
    pub(crate) fn new(images: &Path) -> std::io::Result<Templates> {
        let root = images.join("tmpl");
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root)?;
        Ok(Templates {
            root,
            map: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
            counters: Mutex::new(TemplateCounters::default()),
        })
    }

    /// Removes every template (agent shutdown). Restores in flight keep theirs until they end.
    pub(crate) fn clear(&self) {
        let all: Vec<Rec> = self.map.lock().drain().map(|(_, r)| r).collect();
        drop(all);
        let _ = fs::remove_dir_all(&self.root);
    }

    /// A fresh directory for a template of `action` at `version`.
    pub(crate) fn new_dir(&self, action: &ActionName, version: &str) -> PathBuf {
        let key = xxhash_rust::xxh3::xxh3_64(format!("{action}\0{version}").as_bytes());
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        self.root.join(format!("{key:016x}-{n}"))
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
                        t.held_bytes,
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

impl Template {
    /// A template over the checkpoint in `dir` (checksummed now). Blocking.
    pub(crate) fn seal(dir: PathBuf, info: Arc<SandboxInfo>) -> Result<Template, String> {
        let _ = fs::remove_file(dir.join("dump.log"));
        let files = checksum_dir(&dir).map_err(|e| format!("checksumming {dir:?}: {e}"))?;
        if files.is_empty() {
            return Err(format!("the checkpoint in {dir:?} has no files"));
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
        })
    }

    /// Checks every image file against its checksum. Blocking.
    pub(crate) fn verify(&self) -> Result<(), String> {
        for (name, want) in &self.sums {
            let path = self.dir.join(name);
            let (got, _) = checksum_file(&path).map_err(|e| format!("reading {path:?}: {e}"))?;
            if got != *want {
                return Err(format!(
                    "checksum mismatch in {name}: {got:016x}, expected {want:016x}"
                ));
            }
        }
        Ok(())
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
            Err(reason) => {
                self.templates.finish(&info.action, &info.version, None);
                warn!(sandbox = %id, action = %info.action, %reason, "template not made");
                if lost {
                    self.drop_lost(&id, &slot).await;
                }
                crate::release(slot).await;
                Err(self.not_deduplicable(id, reason, !lost))
            }
        }
    }

    async fn make_template_of(
        self: &Arc<Self>,
        slot: &Arc<crate::Slot>,
    ) -> Result<(Template, crate::TemplateReply), String> {
        let _permit = self
            .dedups
            .acquire()
            .await
            .map_err(|_| "the node agent is shutting down".to_string())?;
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
            return Err(crate::error_chain(&e));
        }
        let t1 = std::time::Instant::now();
        let d2 = dir.clone();
        let sealed = tokio::task::spawn_blocking(move || Template::seal(d2, info))
            .await
            .unwrap_or_else(|e| Err(format!("checksum task failed: {e}")));
        let t = match sealed {
            Ok(t) => t,
            Err(reason) => {
                let _ = fs::remove_dir_all(&dir);
                return Err(reason);
            }
        };
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
