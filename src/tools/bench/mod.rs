//! Benchmarks: each measures the ledger beside a raw PostgreSQL reference
//! in the same run, on a throwaway embedded cluster.

pub mod close;
pub mod import;
pub mod ingest;
pub mod rebuild;
pub mod reconcile;
pub mod webhooks;

use crate::postgres::embedded::{ClusterSettings, EmbeddedPostgres};

/// A throwaway embedded cluster for a benchmark, with production's durable
/// settings, in its own directory under the data directory.
pub struct Throwaway {
    /// The running cluster.
    pub cluster: EmbeddedPostgres,
    dir: std::path::PathBuf,
}

impl Throwaway {
    /// Start a durable cluster named `name` under `data_dir`.
    pub async fn start(
        data_dir: &std::path::Path,
        name: &str,
        max_connections: u32,
    ) -> anyhow::Result<Self> {
        let dir = data_dir.join(format!("{name}-{}", std::process::id()));
        let settings = ClusterSettings {
            max_connections,
            durability_off: false,
        };
        let mut cluster = EmbeddedPostgres::open(&dir, settings).await?;
        cluster.start().await?;
        Ok(Self { cluster, dir })
    }

    /// Stop the cluster and delete its directory.
    pub async fn remove(mut self) -> anyhow::Result<()> {
        self.cluster.stop().await?;
        let root = self.cluster.cluster_root().to_path_buf();
        drop(self.cluster);
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_dir_all(root);
        Ok(())
    }
}

/// Peak resident set size of this process, in MiB.
pub fn peak_rss_mib() -> u64 {
    nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        .map(|usage| usage.max_rss() as u64 / 1024)
        .unwrap_or(0)
}
