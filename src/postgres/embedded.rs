//! The embedded default database: a private PostgreSQL cluster that the
//! ledger initialises and runs itself inside its data directory, so a
//! newcomer needs no database set-up.
//!
//! Layout of the data directory:
//! - `ledger.lock` — held (flock) by the one ledger that owns the directory;
//! - `postgres/` — the cluster (initdb), owned by the user the server runs as;
//! - `postgres-run/` — the server's Unix socket (mode 0700: only that user
//!   and root can connect, so `trust` authentication stays private) and log.
//!
//! PostgreSQL refuses to run as root. When the ledger runs as root, the
//! cluster runs as the unprivileged system user [`CLUSTER_USER`], created on
//! first use. That user must be able to reach the cluster's directories: when
//! the data directory lies under one it cannot enter (root's home, mode 0700,
//! is the usual case), `postgres/` and `postgres-run/` are kept in a
//! directory of their own under [`CLUSTER_HOME`] instead, and the data
//! directory's `postgres.location` names it (it is read on every later
//! start; nobody has to loosen a home directory's permissions).
//! The server is started with `pg_ctl` and stopped when the ledger exits; a
//! server left behind by a ledger that crashed is stopped and restarted on
//! the next start.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{chown, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Output;

use nix::fcntl::{Flock, FlockArg};
use nix::unistd::{Gid, Uid, User};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};

/// The unprivileged system user the cluster runs as when the ledger is root.
pub const CLUSTER_USER: &str = "ledgerpg";
/// Where clusters live whose data directory the cluster user cannot reach.
pub const CLUSTER_HOME: &str = "/var/lib/ledger/clusters";
/// The data directory's file naming where its cluster lives, when elsewhere.
const LOCATION_FILE: &str = "postgres.location";
/// The database role and database the ledger uses inside the cluster.
const ROLE_AND_DATABASE: &str = "ledger";
const PORT: u16 = 5432;

/// Why the embedded cluster could not be used. Each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    /// No `initdb`/`pg_ctl` to start a cluster with.
    #[error(
        "PostgreSQL server binaries (initdb, pg_ctl) were not found on PATH or under \
         /usr/lib/postgresql/*/bin. Install them (Debian: `apt-get install postgresql`) \
         or set DATABASE_URL to use an existing PostgreSQL server."
    )]
    BinariesNotFound,
    /// Another ledger holds the data directory's lock.
    #[error(
        "another ledger (pid {pid}) is already using the data directory {dir}; stop it, \
         or give this one its own --data-dir"
    )]
    DirectoryInUse {
        /// The data directory.
        dir: PathBuf,
        /// The process holding it.
        pid: String,
    },
    /// The data directory cannot be created, read or locked.
    #[error("the data directory {dir} cannot be used: {reason}")]
    DataDirectory {
        /// The data directory.
        dir: PathBuf,
        /// What failed.
        reason: String,
    },
    /// Running as root, and the cluster's unprivileged user is missing.
    #[error(
        "running as root, and PostgreSQL refuses to run as root: the unprivileged user \
         '{CLUSTER_USER}' it would run as could not be created ({reason}). Create it \
         (`useradd --system {CLUSTER_USER}`), run the ledger as a normal user, or set DATABASE_URL."
    )]
    ClusterUser {
        /// Why it could not be created.
        reason: String,
    },
    /// `initdb` or `pg_ctl` failed.
    #[error("{command} failed: {detail}")]
    Command {
        /// The command.
        command: String,
        /// What it printed.
        detail: String,
    },
    /// The server started but refuses connections.
    #[error("the embedded PostgreSQL server started but cannot be reached: {0}")]
    Connect(#[from] sqlx::Error),
}

/// Tuning for the cluster the ledger starts.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    /// `max_connections` of the server.
    pub max_connections: u32,
    /// Turn off fsync and friends: for throwaway test clusters only.
    pub durability_off: bool,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        Self {
            max_connections: 100,
            durability_off: false,
        }
    }
}

/// Who runs the cluster's processes.
#[derive(Debug, Clone)]
struct ClusterOwner {
    uid: Uid,
    gid: Gid,
}

/// An embedded cluster owned by this process (the data directory is locked
/// until it is dropped). Dropping it stops the server.
#[derive(Debug)]
pub struct EmbeddedPostgres {
    data_dir: PathBuf,
    /// The directory holding `postgres/` and `postgres-run/`: the data
    /// directory, or one under [`CLUSTER_HOME`].
    cluster_root: PathBuf,
    cluster_dir: PathBuf,
    run_dir: PathBuf,
    bin_dir: PathBuf,
    owner: Option<ClusterOwner>,
    settings: ClusterSettings,
    running: bool,
    _lock: Flock<File>,
}

impl EmbeddedPostgres {
    /// Take the data directory (refusing one another ledger holds), find the
    /// PostgreSQL binaries and initialise the cluster if it does not exist.
    pub async fn open(data_dir: &Path, settings: ClusterSettings) -> Result<Self, EmbeddedError> {
        let dir_error = |reason: String| EmbeddedError::DataDirectory {
            dir: data_dir.to_path_buf(),
            reason,
        };
        fs::create_dir_all(data_dir).map_err(|e| dir_error(e.to_string()))?;
        let data_dir = data_dir
            .canonicalize()
            .map_err(|e| dir_error(e.to_string()))?;
        let lock = lock_data_dir(&data_dir)?;
        let bin_dir = find_postgres_binaries()?;
        let owner = if Uid::effective().is_root() {
            Some(ensure_cluster_user()?)
        } else {
            None
        };
        let cluster_root = cluster_root(&data_dir, owner.is_some())?;
        let cluster = Self {
            cluster_dir: cluster_root.join("postgres"),
            run_dir: cluster_root.join("postgres-run"),
            cluster_root,
            data_dir,
            bin_dir,
            owner,
            settings,
            running: false,
            _lock: lock,
        };
        cluster.prepare_directories()?;
        if !cluster.cluster_dir.join("PG_VERSION").exists() {
            cluster.initdb().await?;
        }
        Ok(cluster)
    }

    /// The ledger's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Where the cluster's files are: the data directory, or (when running
    /// as root under a directory the cluster user cannot enter) a directory
    /// under [`CLUSTER_HOME`] that the data directory's `postgres.location`
    /// names.
    pub fn cluster_root(&self) -> &Path {
        &self.cluster_root
    }

    /// Start the server (stopping one a crashed ledger left running) and
    /// make sure the ledger's database exists.
    pub async fn start(&mut self) -> Result<(), EmbeddedError> {
        if self.cluster_dir.join("postmaster.pid").exists() && self.server_running().await {
            tracing::warn!("stopping a PostgreSQL server left running by an earlier ledger");
            self.pg_ctl_stop().await?;
        }
        let socket_dir = self.run_dir.display().to_string();
        let mut server_options = format!(
            "-c listen_addresses='' -c port={PORT} -c unix_socket_directories='{socket_dir}' \
             -c max_connections={}",
            self.settings.max_connections
        );
        if self.settings.durability_off {
            server_options
                .push_str(" -c fsync=off -c synchronous_commit=off -c full_page_writes=off");
        }
        let log_file = self.run_dir.join("postgres.log");
        self.run(
            "pg_ctl",
            &[
                "start".as_ref(),
                "--wait".as_ref(),
                "--timeout=60".as_ref(),
                "--silent".as_ref(),
                "-D".as_ref(),
                self.cluster_dir.as_os_str(),
                "-l".as_ref(),
                log_file.as_os_str(),
                "-o".as_ref(),
                server_options.as_ref(),
            ],
        )
        .await
        .map_err(|error| self.with_server_log(error))?;
        self.running = true;
        self.ensure_database().await?;
        Ok(())
    }

    /// Stop the server (fast shutdown: running transactions are rolled back).
    pub async fn stop(&mut self) -> Result<(), EmbeddedError> {
        if self.running {
            self.pg_ctl_stop().await?;
            self.running = false;
        }
        Ok(())
    }

    /// How to connect to the ledger's database in this cluster.
    pub fn connect_options(&self) -> PgConnectOptions {
        cluster_connect_options(&self.run_dir, ROLE_AND_DATABASE)
    }

    /// The same, as a URL for other programs (e.g. the test suite).
    pub fn database_url(&self) -> String {
        self.url_of_database(ROLE_AND_DATABASE)
    }

    /// The URL of another database of the cluster.
    pub fn url_of_database(&self, database: &str) -> String {
        format!(
            "postgres://{ROLE_AND_DATABASE}@localhost/{database}?host={}&port={PORT}",
            percent_encode_path(&self.run_dir)
        )
    }

    fn prepare_directories(&self) -> Result<(), EmbeddedError> {
        let dir_error = |reason: String| EmbeddedError::DataDirectory {
            dir: self.data_dir.clone(),
            reason,
        };
        for dir in [&self.cluster_dir, &self.run_dir] {
            fs::create_dir_all(dir).map_err(|e| dir_error(e.to_string()))?;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
                .map_err(|e| dir_error(e.to_string()))?;
        }
        if let Some(owner) = &self.owner {
            // The cluster user must be able to reach its directories (a root
            // under CLUSTER_HOME is reachable by construction; one named by
            // an older `postgres.location` may have been moved since).
            if let Some(blocking) = unreachable_ancestor(&self.cluster_root) {
                return Err(dir_error(format!(
                    "the cluster runs as '{CLUSTER_USER}', which cannot enter {} (not searchable by \
                     others): `chmod o+x {}`, or remove {} to keep the cluster under {CLUSTER_HOME}",
                    blocking.display(),
                    blocking.display(),
                    self.data_dir.join(LOCATION_FILE).display()
                )));
            }
            let mode = fs::metadata(&self.cluster_root)
                .map_err(|e| dir_error(e.to_string()))?
                .permissions()
                .mode();
            fs::set_permissions(&self.cluster_root, fs::Permissions::from_mode(mode | 0o711))
                .map_err(|e| dir_error(e.to_string()))?;
            for dir in [&self.cluster_dir, &self.run_dir] {
                chown(dir, Some(owner.uid.as_raw()), Some(owner.gid.as_raw()))
                    .map_err(|e| dir_error(format!("chown {}: {e}", dir.display())))?;
            }
        }
        Ok(())
    }

    async fn initdb(&self) -> Result<(), EmbeddedError> {
        match &self.owner {
            Some(_) => tracing::info!(
                data_dir = %self.cluster_dir.display(),
                "running as root: initialising the embedded PostgreSQL cluster as the \
                 unprivileged system user '{CLUSTER_USER}'"
            ),
            None => tracing::info!(
                data_dir = %self.cluster_dir.display(),
                "initialising the embedded PostgreSQL cluster"
            ),
        }
        self.run(
            "initdb",
            &[
                "-D".as_ref(),
                self.cluster_dir.as_os_str(),
                "--username".as_ref(),
                ROLE_AND_DATABASE.as_ref(),
                "--auth=trust".as_ref(),
                "--encoding=UTF8".as_ref(),
                "--no-locale".as_ref(),
                "--no-instructions".as_ref(),
            ],
        )
        .await?;
        Ok(())
    }

    async fn ensure_database(&self) -> Result<(), EmbeddedError> {
        let mut conn = cluster_connect_options(&self.run_dir, "postgres")
            .connect()
            .await?;
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind(ROLE_AND_DATABASE)
                .fetch_one(&mut conn)
                .await?;
        if !exists {
            sqlx::query(&format!("CREATE DATABASE {ROLE_AND_DATABASE}"))
                .execute(&mut conn)
                .await?;
        }
        conn.close().await?;
        Ok(())
    }

    async fn server_running(&self) -> bool {
        self.command("pg_ctl")
            .arg("status")
            .arg("-D")
            .arg(&self.cluster_dir)
            .output()
            .await
            .is_ok_and(|output| output.status.success())
    }

    async fn pg_ctl_stop(&self) -> Result<(), EmbeddedError> {
        self.run(
            "pg_ctl",
            &[
                "stop".as_ref(),
                "--wait".as_ref(),
                "--silent".as_ref(),
                "-m".as_ref(),
                "fast".as_ref(),
                "-D".as_ref(),
                self.cluster_dir.as_os_str(),
            ],
        )
        .await
        .map(|_| ())
    }

    fn command(&self, program: &str) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(self.bin_dir.join(program));
        command.current_dir(&self.cluster_dir).kill_on_drop(true);
        if let Some(owner) = &self.owner {
            command.uid(owner.uid.as_raw()).gid(owner.gid.as_raw());
        }
        command
    }

    async fn run(&self, program: &str, args: &[&std::ffi::OsStr]) -> Result<Output, EmbeddedError> {
        let output = self
            .command(program)
            .args(args)
            .output()
            .await
            .map_err(|e| EmbeddedError::Command {
                command: program.to_string(),
                detail: e.to_string(),
            })?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let stdout = String::from_utf8_lossy(&output.stdout);
            return Err(EmbeddedError::Command {
                command: program.to_string(),
                detail: format!("{} {}", stderr.trim(), stdout.trim())
                    .trim()
                    .to_string(),
            });
        }
        Ok(output)
    }

    /// Attach the tail of the server log to a start failure: that is where
    /// PostgreSQL says why.
    fn with_server_log(&self, error: EmbeddedError) -> EmbeddedError {
        let log = fs::read_to_string(self.run_dir.join("postgres.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(5).collect();
        match error {
            EmbeddedError::Command { command, detail } if !tail.is_empty() => {
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                EmbeddedError::Command {
                    command,
                    detail: format!("{detail}; server log: {}", tail.join(" | ")),
                }
            }
            other => other,
        }
    }
}

impl Drop for EmbeddedPostgres {
    fn drop(&mut self) {
        if self.running {
            let mut command = std::process::Command::new(self.bin_dir.join("pg_ctl"));
            command
                .args(["stop", "--wait", "--silent", "-m", "fast", "-D"])
                .arg(&self.cluster_dir)
                .current_dir(&self.cluster_dir);
            if let Some(owner) = &self.owner {
                use std::os::unix::process::CommandExt;
                command.uid(owner.uid.as_raw()).gid(owner.gid.as_raw());
            }
            if let Err(error) = command.output() {
                tracing::error!(%error, "could not stop the embedded PostgreSQL server");
            }
        }
    }
}

/// Connection options for a database of a cluster listening on `run_dir`.
fn cluster_connect_options(run_dir: &Path, database: &str) -> PgConnectOptions {
    PgConnectOptions::new()
        .socket(run_dir)
        .port(PORT)
        .username(ROLE_AND_DATABASE)
        .database(database)
}

/// Connection options for the cluster of a data directory another ledger
/// owns and runs (so CLI commands can work beside `ledger serve`), if its
/// server is up.
pub fn running_cluster_options(data_dir: &Path) -> Option<PgConnectOptions> {
    let run_dir = recorded_location(data_dir)
        .unwrap_or_else(|| data_dir.to_path_buf())
        .join("postgres-run");
    run_dir
        .join(format!(".s.PGSQL.{PORT}"))
        .exists()
        .then(|| cluster_connect_options(&run_dir, ROLE_AND_DATABASE))
}

/// The first directory above `dir` that others cannot search (enter).
fn unreachable_ancestor(dir: &Path) -> Option<&Path> {
    dir.ancestors()
        .skip(1)
        .find(|dir| fs::metadata(dir).is_ok_and(|meta| meta.permissions().mode() & 0o001 == 0))
}

/// Where a data directory's `postgres.location` says its cluster lives.
fn recorded_location(data_dir: &Path) -> Option<PathBuf> {
    let text = fs::read_to_string(data_dir.join(LOCATION_FILE)).ok()?;
    let path = PathBuf::from(text.trim());
    path.is_absolute().then_some(path)
}

/// The directory that holds the cluster of `data_dir`: the one its
/// `postgres.location` names; else, when the cluster runs as another user
/// who cannot enter `data_dir`, a new directory under [`CLUSTER_HOME`]
/// (recorded in `postgres.location`); else `data_dir` itself.
fn cluster_root(data_dir: &Path, other_user: bool) -> Result<PathBuf, EmbeddedError> {
    if let Some(recorded) = recorded_location(data_dir) {
        return Ok(recorded);
    }
    if !other_user || unreachable_ancestor(data_dir).is_none() {
        return Ok(data_dir.to_path_buf());
    }
    let dir_error = |reason: String| EmbeddedError::DataDirectory {
        dir: data_dir.to_path_buf(),
        reason,
    };
    let home = Path::new(CLUSTER_HOME);
    fs::create_dir_all(home).map_err(|e| dir_error(format!("{CLUSTER_HOME}: {e}")))?;
    for dir in home
        .ancestors()
        .take_while(|dir| dir.starts_with("/var/lib/ledger"))
    {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
            .map_err(|e| dir_error(format!("{}: {e}", dir.display())))?;
    }
    // A fresh name per data directory: a data directory deleted and made
    // again gets a new, empty cluster (the old one is left for its owner).
    let root = home.join(uuid::Uuid::new_v4().to_string());
    fs::create_dir(&root).map_err(|e| dir_error(format!("{}: {e}", root.display())))?;
    fs::write(
        data_dir.join(LOCATION_FILE),
        format!("{}\n", root.display()),
    )
    .map_err(|e| dir_error(format!("{LOCATION_FILE}: {e}")))?;
    tracing::info!(
        cluster = %root.display(),
        "running as root under a directory '{CLUSTER_USER}' cannot enter: the cluster's files \
         live in {} ({} names it)",
        root.display(),
        data_dir.join(LOCATION_FILE).display()
    );
    Ok(root)
}

fn lock_data_dir(data_dir: &Path) -> Result<Flock<File>, EmbeddedError> {
    let path = data_dir.join("ledger.lock");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| EmbeddedError::DataDirectory {
            dir: data_dir.to_path_buf(),
            reason: format!("{}: {e}", path.display()),
        })?;
    let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => lock,
        Err((mut file, _)) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            return Err(EmbeddedError::DirectoryInUse {
                dir: data_dir.to_path_buf(),
                pid: pid.trim().to_string(),
            });
        }
    };
    // Record who holds it, for the message a second ledger prints.
    let _ = lock.set_len(0);
    let _ = lock.rewind();
    let _ = write!(lock, "{}", std::process::id());
    let _ = lock.flush();
    Ok(lock)
}

/// Where `initdb` and `pg_ctl` live: on PATH, else the newest
/// /usr/lib/postgresql/N/bin (Debian does not put them on PATH).
fn find_postgres_binaries() -> Result<PathBuf, EmbeddedError> {
    find_postgres_binaries_in(std::env::var_os("PATH"), Path::new("/usr/lib/postgresql"))
}

fn find_postgres_binaries_in(
    path: Option<std::ffi::OsString>,
    versioned_root: &Path,
) -> Result<PathBuf, EmbeddedError> {
    let has_both = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    if let Some(path) = path {
        if let Some(dir) = std::env::split_paths(&path).find(|dir| has_both(dir)) {
            return Ok(dir);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir(versioned_root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            has_both(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .ok_or(EmbeddedError::BinariesNotFound)
}

fn ensure_cluster_user() -> Result<ClusterOwner, EmbeddedError> {
    let lookup = || {
        User::from_name(CLUSTER_USER).map_err(|e| EmbeddedError::ClusterUser {
            reason: e.to_string(),
        })
    };
    let user = match lookup()? {
        Some(user) => user,
        None => {
            let output = std::process::Command::new("useradd")
                .args([
                    "--system",
                    "--user-group",
                    "--no-create-home",
                    "--home-dir",
                    "/nonexistent",
                    "--shell",
                    "/usr/sbin/nologin",
                    CLUSTER_USER,
                ])
                .output()
                .map_err(|e| EmbeddedError::ClusterUser {
                    reason: format!("useradd: {e}"),
                })?;
            // Another process may have created it meanwhile: look again.
            match lookup()? {
                Some(user) => user,
                None => {
                    return Err(EmbeddedError::ClusterUser {
                        reason: String::from_utf8_lossy(&output.stderr).trim().to_string(),
                    })
                }
            }
        }
    };
    Ok(ClusterOwner {
        uid: user.uid,
        gid: user.gid,
    })
}

fn percent_encode_path(path: &Path) -> String {
    path.display()
        .to_string()
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'/' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_bin_dir(root: &Path, relative: &str) -> PathBuf {
        let dir = root.join(relative);
        fs::create_dir_all(&dir).unwrap();
        for program in ["initdb", "pg_ctl"] {
            fs::write(dir.join(program), "").unwrap();
        }
        dir
    }

    #[test]
    fn binaries_on_path_win_over_the_debian_directories() {
        let root = tempfile::tempdir().unwrap();
        let on_path = fake_bin_dir(root.path(), "custom/bin");
        fake_bin_dir(root.path(), "lib/16/bin");
        let path = std::env::join_paths([root.path().join("empty"), on_path.clone()]).unwrap();
        let found = find_postgres_binaries_in(Some(path), &root.path().join("lib")).unwrap();
        assert_eq!(found, on_path);
    }

    #[test]
    fn the_newest_debian_version_is_used_when_path_has_none() {
        let root = tempfile::tempdir().unwrap();
        fake_bin_dir(root.path(), "lib/9/bin");
        let newest = fake_bin_dir(root.path(), "lib/15/bin");
        fs::create_dir_all(root.path().join("lib/17/bin")).unwrap(); // incomplete install
        let found = find_postgres_binaries_in(None, &root.path().join("lib")).unwrap();
        assert_eq!(found, newest);
    }

    #[test]
    fn missing_binaries_name_what_to_install_or_set() {
        let root = tempfile::tempdir().unwrap();
        let error = find_postgres_binaries_in(None, &root.path().join("nothing")).unwrap_err();
        assert_eq!(
            error.to_string(),
            "PostgreSQL server binaries (initdb, pg_ctl) were not found on PATH or under \
             /usr/lib/postgresql/*/bin. Install them (Debian: `apt-get install postgresql`) \
             or set DATABASE_URL to use an existing PostgreSQL server."
        );
    }

    #[test]
    fn the_database_url_escapes_the_socket_path() {
        assert_eq!(
            percent_encode_path(Path::new("/tmp/my data/postgres-run")),
            "/tmp/my%20data/postgres-run"
        );
    }
}
