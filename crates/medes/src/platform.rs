//! One platform instance in this process: store, agent, controller, REST API.
//!
//! `medes serve`, `medes demo` and `medes bench startup` all start the platform through
//! [`Platform::start`], so what a benchmark measures is exactly what `serve` runs. The
//! controller side of it (store, keys, auth file, reconcile, timers, API) is a [`Service`],
//! which `medes controller` starts over remote nodes through the same path
//! ([`Service::open`], then [`Service::start`]).

use std::net::SocketAddr;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use anyhow::Context;
use medes_agent::{Agent, NodeAgent};
use medes_controller::Controller;
use medes_core::Namespace;
use medes_store::{ApiKey, Store};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::MedesConfig;

/// File in the data directory holding the default key (`uuid:key`), readable by root only.
pub const AUTH_FILE: &str = "auth.key";

/// Arguments every platform process takes (`serve`, `controller`, `agent`).
#[derive(clap::Args, Debug, Clone)]
pub struct ConfigArgs {
    /// Configuration file (TOML); defaults apply to every missing key.
    #[arg(long, short, env = "MEDES_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory (store, API key, code, dedup stores, bases); overrides `data_dir`.
    #[arg(long, env = "MEDES_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
}

impl ConfigArgs {
    /// Loads the configuration file and applies `--data-dir` (not yet [`MedesConfig::finish`]ed).
    pub fn load(&self) -> anyhow::Result<MedesConfig> {
        let mut cfg = MedesConfig::load(self.config.as_deref())?;
        if let Some(d) = &self.data_dir {
            cfg.data_dir = d.clone();
        }
        Ok(cfg)
    }
}

/// The REST API's arguments (`serve`, `controller`).
#[derive(clap::Args, Debug, Clone)]
pub struct ApiArgs {
    /// REST API listen address (overrides `api.listen`).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
}

impl ApiArgs {
    /// Applies `--listen`.
    pub fn apply(&self, cfg: &mut MedesConfig) {
        if let Some(l) = self.listen {
            cfg.api.listen = l;
        }
    }
}

/// Cancels `token` on SIGINT or SIGTERM (call inside the runtime).
pub fn shutdown_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        token.cancel();
    });
}

/// The store opened and the default key written, before any node is known ([`Service::open`]).
pub struct Opened {
    store: Arc<Store>,
    /// The default key, `uuid:key` (also in [`AUTH_FILE`]).
    pub auth: String,
}

/// The controller side of a platform: store, scheduler, timers and REST API (over any nodes).
pub struct Service {
    /// Base URL of the REST API, e.g. `http://127.0.0.1:3233`.
    pub url: String,
    /// The default key, `uuid:key`.
    pub auth: String,
    /// The data directory.
    pub data_dir: PathBuf,
    /// The scheduler (for in-process inspection by benchmarks).
    pub controller: Arc<Controller>,
    store: Arc<Store>,
    shutdown: CancellationToken,
    api: tokio::task::JoinHandle<std::io::Result<()>>,
    timers: tokio::task::JoinHandle<()>,
}

/// A running platform: a [`Service`] and its in-process node agent.
pub struct Platform {
    service: Service,
    agent: Agent,
}

impl Deref for Platform {
    type Target = Service;
    fn deref(&self) -> &Service {
        &self.service
    }
}

/// The process-wide Prometheus recorder (installed on first use).
pub fn metrics_handle() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| PrometheusBuilder::new().install_recorder().ok())
        .clone()
}

impl Opened {
    /// The store's actions, for the controller's reconciliation of nodes that join or register
    /// again after startup (`Controller::set_action_lookup`).
    pub fn stored_actions(&self) -> medes_controller::StoredActions {
        let store = self.store.clone();
        Arc::new(move |name| store.get_action(name).ok().flatten())
    }
}

impl Service {
    /// Creates the data directory, opens the store, adds the configured keys, writes the
    /// default key to [`AUTH_FILE`] and installs the metrics recorder.
    pub async fn open(cfg: &MedesConfig) -> anyhow::Result<Opened> {
        std::fs::create_dir_all(&cfg.data_dir)
            .with_context(|| format!("creating data directory {}", cfg.data_dir.display()))?;
        let store_path = cfg.data_dir.join("store.redb");
        let store_cfg = cfg.store;
        let store = tokio::task::spawn_blocking(move || Store::open_with(&store_path, store_cfg))
            .await?
            .context("opening the store")?;
        let store = Arc::new(store);
        let key = store
            .ensure_default_key()
            .context("creating the default API key")?;
        for k in &cfg.auth.keys {
            let (uuid, secret) = k.key.split_once(':').context("auth key without ':'")?;
            store
                .add_key(&ApiKey {
                    uuid: uuid.into(),
                    key: secret.into(),
                    namespace: Namespace(k.namespace.clone()),
                    subject: k.namespace.clone(),
                    admin: k.admin,
                })
                .context("storing a configured API key")?;
        }
        let auth = key.auth_string();
        write_auth_file(&cfg.data_dir, &auth)?;
        // The recorder first: the controller registers metric handles from `reconcile` on.
        let _ = metrics_handle();
        Ok(Opened { store, auth })
    }

    /// Reconciles the dedup sandboxes the nodes kept (adopting those of unchanged actions),
    /// starts the controller's timers and the REST API, and returns once the API accepts
    /// connections. Cancelling `shutdown` stops it ([`Service::stop`]).
    pub async fn start(
        cfg: &MedesConfig,
        opened: Opened,
        controller: Arc<Controller>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Service> {
        controller.set_action_lookup(opened.stored_actions());
        let Opened { store, auth } = opened;
        let kept = {
            let store = store.clone();
            controller
                .reconcile(&move |name| store.get_action(name).ok().flatten())
                .await
        };
        if kept.adopted > 0 || !kept.purged.is_empty() || kept.left > 0 {
            info!(adopted = kept.adopted, purged = ?kept.purged, kept_bases = kept.left,
                  "dedup sandboxes kept by the nodes reconciled");
        }
        let timers = tokio::spawn(controller.clone().run_timers(shutdown.clone()));

        let listener = tokio::net::TcpListener::bind(cfg.api.listen)
            .await
            .with_context(|| format!("binding {}", cfg.api.listen))?;
        let addr = listener.local_addr()?;
        let state = medes_api::ApiState {
            store: store.clone(),
            invoker: controller.clone(),
            metrics: metrics_handle(),
            config: cfg.api.clone(),
            policy: Some(controller.clone()),
        };
        let token = shutdown.clone();
        let api = tokio::spawn(medes_api::serve(listener, state, async move {
            token.cancelled().await
        }));
        let url = format!("http://{addr}");
        info!(%url, data_dir = %cfg.data_dir.display(), "platform started");
        Ok(Service {
            url,
            auth,
            data_dir: cfg.data_dir.clone(),
            controller,
            store,
            shutdown,
            api,
            timers,
        })
    }

    /// A token that, when cancelled, stops the service (used for signals).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops accepting requests, lets running ones finish, destroys every sandbox through the
    /// controller, flushes the store.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        let api = self.api.await;
        let _ = self.timers.await;
        self.controller.shutdown().await;
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.flush()).await??;
        api??;
        Ok(())
    }
}

impl Platform {
    /// Checks the host, opens the store, starts agent, controller and API, and returns once the
    /// API accepts connections.
    pub async fn start(cfg: MedesConfig) -> anyhow::Result<Platform> {
        medes_sandbox::preflight(&cfg.agent.sandbox)
            .context("this machine cannot run sandboxes (run scripts/setup.sh as root)")?;
        medes_sandbox::become_subreaper().context("becoming a child subreaper")?;
        let opened = Service::open(&cfg).await?;
        let agent = Agent::new(cfg.agent.clone()).context("starting the node agent")?;
        let node: Arc<dyn NodeAgent> = Arc::new(agent.clone());
        let controller = Controller::new(
            cfg.controller.clone(),
            vec![(cfg.agent.node_id.clone(), node)],
        );
        let service = Service::start(&cfg, opened, controller, CancellationToken::new()).await?;
        Ok(Platform { service, agent })
    }

    /// The node agent (for in-process inspection by benchmarks).
    pub fn agent(&self) -> &Agent {
        &self.agent
    }

    /// [`Platform::stop`], then removes what the node keeps across restarts (dedup stores,
    /// bases): for benchmarks and tests with a throw-away data directory.
    pub async fn stop_and_purge(self) -> anyhow::Result<()> {
        let agent = self.agent.clone();
        self.stop().await?;
        agent.purge_kept().await;
        Ok(())
    }

    /// Waits until the shutdown token is cancelled, then stops.
    pub async fn run_until_shutdown(self) -> anyhow::Result<()> {
        self.service.shutdown.cancelled().await;
        self.stop().await
    }

    /// Stops accepting requests, lets running ones finish, destroys every sandbox, flushes the
    /// store.
    pub async fn stop(self) -> anyhow::Result<()> {
        let Platform { service, agent } = self;
        // The service's stop flushes the store after the controller destroyed the sandboxes;
        // the agent then stops what is left (its reaper, kept stores stay).
        let stopped = service.stop().await;
        agent.shutdown().await;
        stopped?;
        info!("platform stopped");
        Ok(())
    }
}

fn write_auth_file(dir: &Path, auth: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(AUTH_FILE);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    writeln!(f, "{auth}")?;
    Ok(())
}

/// Reads the default key that `medes serve` wrote into `data_dir`.
pub fn read_auth_file(data_dir: &Path) -> anyhow::Result<String> {
    let path = data_dir.join(AUTH_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading the API key from {} (is `medes serve` running with this data directory? \
             or pass --auth uuid:key)",
            path.display()
        )
    })?;
    Ok(text.trim().to_string())
}

/// Installs the tracing subscriber (once per process).
pub fn init_tracing(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
