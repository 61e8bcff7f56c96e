//! Where the dedup domains' fingerprint indexes live (`[registry]` in the configuration): in
//! memory (the default), or in a Redis Cluster, one key prefix per node and domain
//! (`<key_prefix>:<node>:<domain>`), opened (emptied of what an earlier agent left) when the
//! domain is created.

use std::sync::Arc;

use medes_dedup::Registry;
use medes_registry_redis::{BackendKind, ConnectError, RedisCluster, RegistryConfig};

/// The registry backend of a node's dedup domains.
pub(crate) struct RegistryBackends {
    cfg: RegistryConfig,
    node: String,
    cluster: Option<Arc<RedisCluster>>,
}

impl RegistryBackends {
    /// Connects to the Redis Cluster if the configuration asks for one.
    pub(crate) fn new(cfg: &RegistryConfig, node: &str) -> Result<Self, ConnectError> {
        let cluster = match cfg.backend {
            BackendKind::Memory => None,
            BackendKind::Redis => Some(RedisCluster::connect(cfg)?),
        };
        if cluster.is_some() {
            tracing::info!(urls = ?cfg.redis_urls, "fingerprint registry index in redis cluster");
        }
        Ok(Self {
            cfg: cfg.clone(),
            node: node.to_string(),
            cluster,
        })
    }

    /// A new domain's registry. If its Redis prefix cannot be opened, the domain's index stays
    /// in memory (logged): dedups go on, only without the larger index.
    pub(crate) fn registry(&self, domain: &str) -> Registry {
        let Some(cluster) = &self.cluster else {
            return Registry::new();
        };
        let prefix = self.cfg.domain_prefix(&self.node, domain);
        match cluster.registry(&prefix) {
            Ok(r) => Registry::with_backend(Arc::new(r)),
            Err(error) => {
                tracing::warn!(%prefix, error = %error_chain(&error), "registry index kept in memory");
                Registry::new()
            }
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_get_redis_indexes_or_fall_back_to_memory() {
        let memory = RegistryBackends::new(&RegistryConfig::default(), "node-0").expect("memory");
        assert!(memory.registry("guest").backend().is_none());
        if let Some(why) = medes_registry_redis::redis_server_missing() {
            assert_ne!(
                std::env::var("CI").as_deref(),
                Ok("true"),
                "CI=true but {why}"
            );
            eprintln!("skipping the redis part: {why}");
            return;
        }
        let cluster = medes_registry_redis::LocalCluster::start(3).expect("local redis cluster");
        let cfg = RegistryConfig::redis(cluster.urls());
        let b = RegistryBackends::new(&cfg, "node-1").expect("connects");
        let guest = b.registry("guest");
        assert!(guest.backend().is_some());
        // The node's dedup domains get theirs from it.
        let domains = crate::domain::Domains::new(None)
            .with_registry_backends(RegistryBackends::new(&cfg, "node-1").expect("connects"));
        assert!(domains.get("tenant-a").registry().backend().is_some());
        drop(cluster);
        // A domain created while the cluster is down keeps its index in memory.
        assert!(b.registry("other").backend().is_none());
        assert!(RegistryBackends::new(&cfg, "node-1").is_err());
    }
}
