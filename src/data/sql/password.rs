//! The password of a PostgreSQL source, from where libpq's users keep it: the file the source's
//! `password_file` names, else PGPASSWORD, else the first matching line of the password file
//! (PGPASSFILE, else ~/.pgpass; `host:port:database:user:password`, `*` matches anything,
//! ignored unless only its owner may read it, as libpq ignores it). Never from the recipe.

use anyhow::{bail, Context, Result};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use ::postgres::config::Host;

/// The password to connect with, or None when nothing holds one.
pub fn find(config: &::postgres::Config, password_file: Option<&Path>) -> Result<Option<String>> {
    if let Some(file) = password_file {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read password_file {}", file.display()))?;
        let password = text.trim_end_matches(['\n', '\r']);
        if password.is_empty() {
            bail!("password_file {} is empty", file.display());
        }
        return Ok(Some(password.to_string()));
    }
    if let Some(password) = std::env::var("PGPASSWORD").ok().filter(|p| !p.is_empty()) {
        return Ok(Some(password));
    }
    let file = match std::env::var_os("PGPASSFILE") {
        Some(f) => PathBuf::from(f),
        None => match std::env::var_os("HOME") {
            Some(home) => PathBuf::from(home).join(".pgpass"),
            None => return Ok(None),
        },
    };
    Ok(from_password_file(&file, config))
}

/// The password of the first line of a libpq password file that matches the connection.
fn from_password_file(file: &Path, config: &::postgres::Config) -> Option<String> {
    let mode = std::fs::metadata(file).ok()?.permissions().mode();
    if mode & 0o077 != 0 {
        tracing::warn!(
            "password file {} is ignored: others may read it; chmod 600 it",
            file.display()
        );
        return None;
    }
    let text = std::fs::read_to_string(file).ok()?;
    let hosts: Vec<String> = match config.get_hosts().first()? {
        Host::Tcp(name) => vec![name.clone()],
        // libpq looks up sockets as `localhost` (in its default folder) or by their folder.
        Host::Unix(dir) => vec![dir.display().to_string(), "localhost".into()],
    };
    let port = config
        .get_ports()
        .first()
        .copied()
        .unwrap_or(5432)
        .to_string();
    let user = config.get_user()?;
    let database = config.get_dbname().unwrap_or(user);
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let fields = split_fields(line);
            let [h, p, d, u, password, ..] = fields.as_slice() else {
                return None;
            };
            let fits = |pattern: &str, value: &str| pattern == "*" || pattern == value;
            (hosts.iter().any(|host| fits(h, host))
                && fits(p, &port)
                && fits(d, database)
                && fits(u, user))
            .then(|| password.clone())
        })
}

/// The fields of a password file line: split at `:`, with `\:` and `\\` escaped (as libpq does,
/// the password ends at the next unescaped `:`).
fn split_fields(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => fields.last_mut().unwrap().extend(chars.next()),
            ':' => fields.push(String::new()),
            c => fields.last_mut().unwrap().push(c),
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::split_fields;

    #[test]
    fn password_file_lines_split_as_libpq_splits_them() {
        assert_eq!(
            split_fields(r"db:5432:*:anna:ge\:heim\\x:Rest"),
            ["db", "5432", "*", "anna", r"ge:heim\x", "Rest"]
        );
    }
}
