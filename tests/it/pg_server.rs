//! A real PostgreSQL server for the tests: Debian's `postgresql` package (`initdb` on PATH or
//! under /usr/lib/postgresql/*/bin), a cluster in a temporary folder with password
//! (scram-sha-256) authentication for every connection, listening on a free loopback port with
//! its socket in that folder, and stopped when the guard is dropped, also when a test fails.
//! initdb and the server refuse to run as root: as root they run as the `postgres` user (else
//! `nobody`), to whom the folder is given.

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The superuser's password.
pub const PASSWORD: &str = "Passwört-für-Tests";
/// The superuser.
const USER: &str = "feinschliff";

/// A running server; dropping it stops the server, then removes its folder.
pub struct PgServer {
    pub port: u16,
    bin: PathBuf,
    data: PathBuf,
    /// uid and gid the server's programs run as (when the tests run as root).
    run_as: Option<(u32, u32)>,
    dir: tempfile::TempDir,
}

impl PgServer {
    /// Starts a server; None (after saying why) when PostgreSQL is not installed.
    pub fn start() -> Result<Option<Self>, String> {
        let Some(bin) = postgres_bin() else {
            eprintln!("skipped: PostgreSQL is not installed (no initdb on PATH or under /usr/lib/postgresql/*/bin; `apt-get install postgresql`)");
            return Ok(None);
        };
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let run_as = if std::fs::metadata("/proc/self")
            .map_err(|e| e.to_string())?
            .uid()
            == 0
        {
            let ids = unprivileged_user()?;
            std::os::unix::fs::chown(dir.path(), Some(ids.0), Some(ids.1))
                .map_err(|e| e.to_string())?;
            Some(ids)
        } else {
            None
        };
        let password_file = dir.path().join("pw");
        std::fs::write(&password_file, PASSWORD).map_err(|e| e.to_string())?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let server = Self {
            port,
            data: dir.path().join("data"),
            bin,
            run_as,
            dir,
        };
        server.run(
            "initdb",
            &[
                "-D".as_ref(),
                server.data.as_os_str(),
                format!("--username={USER}").as_ref(),
                format!("--pwfile={}", password_file.display()).as_ref(),
                "--auth=scram-sha-256".as_ref(),
                "--encoding=UTF8".as_ref(),
                "--no-locale".as_ref(),
                "--no-sync".as_ref(),
            ],
        )?;
        let options = format!(
            "-p {port} -h 127.0.0.1 -k {} -F",
            server.dir.path().display()
        );
        let log = server.dir.path().join("server.log");
        let started = server.run(
            "pg_ctl",
            &[
                "start".as_ref(),
                "-w".as_ref(),
                "-t".as_ref(),
                "60".as_ref(),
                "-D".as_ref(),
                server.data.as_os_str(),
                "-l".as_ref(),
                log.as_os_str(),
                "-o".as_ref(),
                options.as_ref(),
            ],
        );
        if let Err(e) = started {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(format!("{e}\nserver log:\n{log}"));
        }
        Ok(Some(server))
    }

    /// Runs `sql` (statements separated by `;`) in database `db` as the superuser.
    pub fn execute(&self, db: &str, sql: &str) {
        let mut client = postgres::Config::new()
            .host("127.0.0.1")
            .port(self.port)
            .user(USER)
            .password(PASSWORD)
            .dbname(db)
            .connect(postgres::NoTls)
            .unwrap_or_else(|e| panic!("connect to {db}: {e:?}"));
        client
            .batch_execute(sql)
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }

    /// Runs one of the server's programs (as the unprivileged user when root) in its folder.
    fn run(&self, program: &str, args: &[&std::ffi::OsStr]) -> Result<(), String> {
        let mut command = Command::new(self.bin.join(program));
        command.args(args).current_dir(self.dir.path());
        if let Some((uid, gid)) = self.run_as {
            command.uid(uid).gid(gid);
        }
        let out = command.output().map_err(|e| format!("{program}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{program} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let data = self.data.clone();
        let stopped = self.run(
            "pg_ctl",
            &[
                "stop".as_ref(),
                "-m".as_ref(),
                "immediate".as_ref(),
                "-w".as_ref(),
                "-D".as_ref(),
                data.as_os_str(),
            ],
        );
        if let Err(e) = stopped {
            eprintln!("could not stop the test's PostgreSQL server: {e}");
        }
    }
}

/// The folder of initdb and pg_ctl: initdb on PATH (links followed), else the newest
/// /usr/lib/postgresql/<version>/bin.
fn postgres_bin() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("initdb"))
            .find(|p| p.is_file())
    });
    let debian = || {
        glob::glob("/usr/lib/postgresql/*/bin/initdb")
            .ok()?
            .filter_map(Result::ok)
            .max_by_key(|p| version(p))
    };
    let initdb = on_path.or_else(debian)?.canonicalize().ok()?;
    let bin = initdb.parent()?.to_path_buf();
    bin.join("pg_ctl").is_file().then_some(bin)
}

/// The major version in /usr/lib/postgresql/<version>/bin/initdb.
fn version(initdb: &Path) -> u32 {
    initdb
        .iter()
        .nth_back(2)
        .and_then(|v| v.to_str()?.parse().ok())
        .unwrap_or(0)
}

/// uid and gid of `postgres`, else of `nobody`, from /etc/passwd.
fn unprivileged_user() -> Result<(u32, u32), String> {
    let passwd = std::fs::read_to_string("/etc/passwd").map_err(|e| format!("/etc/passwd: {e}"))?;
    let ids = |name: &str| {
        passwd.lines().find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.len() > 3 && fields[0] == name)
                .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
                .flatten()
        })
    };
    ids("postgres")
        .or_else(|| ids("nobody"))
        .ok_or_else(|| "running as root, and neither `postgres` nor `nobody` is in /etc/passwd to run the server as".into())
}
