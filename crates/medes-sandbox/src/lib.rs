//! Isolated, CRIU-checkpointable sandboxes running medes' OpenWhisk-compatible Python runtime.
//!
//! (Design notes are filled in as the implementation lands.)
#![deny(missing_docs)]

mod types;

use std::path::Path;

use medes_core::SandboxId;

pub use types::*;

/// One running sandbox: a process tree in its own namespaces and cgroup.
#[derive(Debug)]
pub struct Sandbox {
    id: SandboxId,
}

impl Sandbox {
    /// Starts a sandbox; returns once the runtime answers on its socket.
    pub async fn start(cfg: &SandboxConfig, spec: SandboxSpec) -> Result<Sandbox, StartError> {
        let _ = (cfg, spec);
        todo!()
    }
    /// Loads the action's code and resolves the entry function.
    pub async fn init(&self, req: InitRequest) -> Result<InitReply, RunError> {
        let _ = req;
        todo!()
    }
    /// Runs the action once.
    pub async fn run(&self, req: RunRequest) -> Result<RunReply, RunError> {
        let _ = req;
        todo!()
    }
    /// The sandbox's id.
    pub fn id(&self) -> &SandboxId {
        &self.id
    }
    /// Current memory of the sandbox.
    pub fn memory(&self) -> Result<MemoryUsage, MemoryError> {
        todo!()
    }
    /// Whether the sandbox's init process is still alive.
    pub fn is_alive(&self) -> bool {
        todo!()
    }
    /// Dumps the sandbox with CRIU into `images_dir`.
    pub async fn checkpoint(
        &self,
        images_dir: &Path,
        mode: CheckpointMode,
    ) -> Result<CheckpointInfo, CheckpointError> {
        let _ = (images_dir, mode);
        todo!()
    }
    /// Restores a new sandbox from a checkpoint.
    pub async fn restore(
        cfg: &SandboxConfig,
        spec: SandboxSpec,
        images_dir: &Path,
    ) -> Result<Sandbox, RestoreError> {
        let _ = (cfg, spec, images_dir);
        todo!()
    }
    /// Kills the process tree and removes cgroup, network namespace and run directory.
    pub async fn destroy(self) -> Result<(), DestroyError> {
        todo!()
    }
}

/// Checks that this host can run sandboxes.
pub fn preflight(cfg: &SandboxConfig) -> Result<(), PreflightError> {
    let _ = cfg;
    todo!()
}

/// Makes the calling process a child subreaper, so orphaned sandbox processes are reparented to
/// it (and must be reaped by it) instead of the host's init.
pub fn become_subreaper() -> std::io::Result<()> {
    todo!()
}
