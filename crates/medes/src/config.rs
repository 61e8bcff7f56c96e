//! The `medes.toml` configuration: one file merging every crate's plain `Config`.
//!
//! Each crate owns its section's meaning and defaults; this module only nests them, fills what
//! depends on other sections (the agent's data directory is the platform's), and validates once.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// The whole configuration (`medes serve --print-config` prints the defaults).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MedesConfig {
    /// Directory for everything the platform keeps: the store (actions, keys, activations), the
    /// default API key, action code. Default `/var/lib/medes`.
    pub data_dir: PathBuf,
    /// Log filter (tracing `EnvFilter` syntax); `RUST_LOG` overrides it. Default `info`.
    pub log: String,
    /// Extra API keys accepted besides the generated default key.
    pub auth: AuthConfig,
    /// The REST edge.
    pub api: medes_api::ApiConfig,
    /// The embedded store.
    pub store: medes_store::StoreConfig,
    /// The scheduler.
    pub controller: medes_controller::ControllerConfig,
    /// The node agent (its `data_dir` is always the platform's `data_dir`).
    pub agent: medes_agent::AgentConfig,
    /// Where the fingerprint registry's index lives: `backend = "memory"` (default) or
    /// `"redis"` with `redis_urls = ["redis://host:port", ...]` (a Redis Cluster's seed nodes).
    pub registry: medes_agent::RegistryConfig,
}

/// API keys from the configuration file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Keys as OpenWhisk writes them, `uuid:key`, each with its namespace.
    pub keys: Vec<KeyEntry>,
}

/// One configured API key.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyEntry {
    /// `uuid:key`.
    pub key: String,
    /// The namespace the key acts in. Default `guest`.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// An operator's key, allowed to change the policy knob. Default `false` (a tenant's key).
    #[serde(default)]
    pub admin: bool,
}

fn default_namespace() -> String {
    "guest".into()
}

impl Default for MedesConfig {
    fn default() -> Self {
        MedesConfig {
            data_dir: "/var/lib/medes".into(),
            log: "info".into(),
            auth: AuthConfig::default(),
            api: medes_api::ApiConfig::default(),
            store: medes_store::StoreConfig::default(),
            controller: medes_controller::ControllerConfig::default(),
            agent: medes_agent::AgentConfig::default(),
            registry: medes_agent::RegistryConfig::default(),
        }
    }
}

impl MedesConfig {
    /// Reads `path` (TOML) over the defaults; `None` means defaults only.
    pub fn load(path: Option<&Path>) -> anyhow::Result<MedesConfig> {
        let mut cfg = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading config file {}", p.display()))?;
                toml::from_str(&text)
                    .with_context(|| format!("parsing config file {}", p.display()))?
            }
            None => MedesConfig::default(),
        };
        cfg.finish();
        cfg.validate()?;
        Ok(cfg)
    }

    /// Fills fields derived from others.
    pub fn finish(&mut self) {
        self.agent.data_dir = self.data_dir.clone();
        self.agent.registry = self.registry.clone();
        if self.controller.api_host == medes_controller::ControllerConfig::default().api_host {
            self.controller.api_host = format!("http://{}", self.api.listen);
        }
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> anyhow::Result<()> {
        for k in &self.auth.keys {
            let ok = k
                .key
                .split_once(':')
                .is_some_and(|(u, s)| !u.is_empty() && !s.is_empty());
            anyhow::ensure!(ok, "auth key {:?} is not of the form uuid:key", k.key);
        }
        anyhow::ensure!(
            self.api.max_payload_bytes > 0,
            "api.max_payload_bytes must be positive"
        );
        self.controller
            .policy
            .validate()
            .context("controller.policy")?;
        if self.registry.backend == medes_agent::registry_redis::BackendKind::Redis {
            anyhow::ensure!(
                !self.registry.redis_urls.is_empty(),
                "registry.backend = \"redis\" needs registry.redis_urls"
            );
        }
        anyhow::ensure!(
            self.registry.buckets > 0,
            "registry.buckets must be positive"
        );
        Ok(())
    }

    /// The defaults as commented TOML.
    pub fn default_toml() -> String {
        let body = toml::to_string_pretty(&MedesConfig::default())
            .unwrap_or_else(|e| format!("# cannot render defaults: {e}\n"));
        format!(
            "# medes configuration: every key with its default value.\n\
             # Pass a file with `medes serve --config FILE`; missing keys keep their defaults.\n\
             # Sizes: *_mb in MiB; times: *_ms milliseconds, *_s seconds.\n\
             # agent.data_dir is always replaced by data_dir.\n\n{body}"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printed_defaults_parse_back() {
        let text = MedesConfig::default_toml();
        let cfg: MedesConfig = toml::from_str(&text).expect("defaults parse");
        assert_eq!(cfg.api.listen.port(), 3233);
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = toml::from_str::<MedesConfig>("nonsense = 1").unwrap_err();
        assert!(err.to_string().contains("nonsense"), "{err}");
    }

    #[test]
    fn the_policy_knob_is_read_and_checked() {
        let cfg: MedesConfig = toml::from_str(
            "[controller.policy]\npolicy = \"medes\"\nmode = \"latency\"\nalpha = 1.5\n\
             keep_alive_s = 120\n[controller.policy.functions.linalg]\nbudget_mb = 512.0\n",
        )
        .expect("parses");
        cfg.validate().expect("valid");
        let p = &cfg.controller.policy;
        assert_eq!(p.policy, medes_policy::PolicyChoice::Medes);
        assert_eq!((p.alpha, p.keep_alive_s), (1.5, Some(120)));
        assert_eq!(p.functions["linalg"].budget_mb, Some(512.0));
        let bad: MedesConfig =
            toml::from_str("[controller.policy]\nalpha = 0.5\n").expect("parses");
        assert!(bad.validate().is_err());
        assert!(toml::from_str::<MedesConfig>("[controller.policy]\npolicy = \"lru\"\n").is_err());
    }

    #[test]
    fn release_base_process_is_read_from_the_policy_section_and_off_by_default() {
        let cfg: MedesConfig =
            toml::from_str("[controller.policy]\nrelease_base_process = true\n").expect("parses");
        cfg.validate().expect("valid");
        assert!(cfg.controller.policy.release_base_process);
        assert!(
            !MedesConfig::default()
                .controller
                .policy
                .release_base_process
        );
    }

    #[test]
    fn the_base_rules_are_read_from_the_policy_section_and_checked() {
        let cfg: MedesConfig = toml::from_str(
            "[controller.policy]\npolicy = \"medes\"\nidle_period_s = 30\nkeep_alive_s = 60\n\
             keep_dedup_s = 720\ndedup_at_keep_alive = true\nbases_on_demand = true\n\
             base_cost_factor = 2.0\nretire_bases = true\n",
        )
        .expect("parses");
        cfg.validate().expect("valid");
        let p = &cfg.controller.policy;
        assert!(p.dedup_at_keep_alive && p.bases_on_demand && p.retire_bases);
        assert_eq!((p.base_cost_factor, p.idle_period_s), (Some(2.0), Some(30)));
        let d = MedesConfig::default();
        assert!(!d.controller.policy.bases_on_demand && !d.controller.policy.retire_bases);
        let bad: MedesConfig =
            toml::from_str("[controller.policy]\nbase_cost_factor = -1.0\n").expect("parses");
        let err = bad.validate().unwrap_err();
        assert!(format!("{err:#}").contains("base_cost_factor"), "{err:#}");
    }

    #[test]
    fn armed_dedup_starts_and_early_answer_are_read_from_the_agent_section() {
        let d = MedesConfig::default();
        assert_eq!(d.agent.armed_per_function, 1);
        assert!(d.agent.lazy_early_answer);
        let cfg: MedesConfig = toml::from_str(
            "[agent]
armed_per_function = 0
lazy_early_answer = false
",
        )
        .expect("parses");
        assert_eq!(cfg.agent.armed_per_function, 0);
        assert!(!cfg.agent.lazy_early_answer);
    }

    #[test]
    fn template_starts_are_off_unless_switched_on() {
        assert!(!MedesConfig::default().controller.template_starts);
        let cfg: MedesConfig =
            toml::from_str("[controller]\ntemplate_starts = true\n").expect("parses");
        assert!(cfg.controller.template_starts);
    }

    #[test]
    fn the_registry_backend_is_read_checked_and_reaches_the_agent() {
        let mut cfg: MedesConfig = toml::from_str(
            "[registry]\nbackend = \"redis\"\nredis_urls = [\"redis://10.0.0.5:7000\"]\n",
        )
        .expect("parses");
        cfg.finish();
        cfg.validate().expect("valid");
        assert_eq!(cfg.agent.registry.redis_urls, ["redis://10.0.0.5:7000"]);
        assert_eq!(
            cfg.agent.registry.backend,
            medes_agent::registry_redis::BackendKind::Redis
        );
        let bad: MedesConfig = toml::from_str("[registry]\nbackend = \"redis\"\n").expect("parses");
        assert!(bad.validate().is_err());
        assert!(toml::from_str::<MedesConfig>("[registry]\nbackend = \"etcd\"\n").is_err());
        assert_eq!(
            MedesConfig::default().registry.backend,
            medes_agent::registry_redis::BackendKind::Memory
        );
    }

    #[test]
    fn the_kubernetes_config_map_parses() {
        let yaml = include_str!("../../../deploy/k8s/config.yaml");
        let text: Vec<&str> = yaml
            .lines()
            .skip_while(|l| l.trim() != "medes.toml: |")
            .skip(1)
            .map(|l| l.strip_prefix("    ").unwrap_or(l))
            .collect();
        assert!(text.len() > 3, "no medes.toml in the config map");
        let mut cfg: MedesConfig = toml::from_str(&text.join("\n")).expect("parses");
        cfg.finish();
        cfg.validate().expect("valid");
        assert_eq!(cfg.agent.dedup.images_dir, Path::new("/run/medes/images"));
    }

    #[test]
    fn bad_auth_keys_are_rejected() {
        let mut cfg = MedesConfig::default();
        cfg.auth.keys.push(KeyEntry {
            key: "nokey".into(),
            namespace: "guest".into(),
            admin: false,
        });
        assert!(cfg.validate().is_err());
    }
}
