//! Where an SQL source's query runs: `sqlite://FILE` (relative paths from the recipe's folder) or
//! `postgres://USER@HOST[:PORT]/DB`. A connection that holds a password is refused: passwords
//! live outside the recipe (see [`super::password`]), so no recipe or resolved copy carries one.

use anyhow::{anyhow, bail, Result};
use std::path::PathBuf;

use crate::recipe::Recipe;

/// Where the password of a PostgreSQL source goes instead of the connection.
pub const WHERE_PASSWORDS_GO: &str =
    "put the password in PGPASSWORD, in a file named by `password_file`, or in ~/.pgpass (or the file PGPASSFILE names)";

/// A parsed `connection`.
pub enum Connection {
    /// An SQLite database file, resolved against the recipe's folder.
    Sqlite(PathBuf),
    /// A PostgreSQL server, without a password.
    Postgres(Box<::postgres::Config>),
}

impl Connection {
    /// Reads `text`. Its errors do not repeat it: the caller names the source, by
    /// [`without_password`].
    pub fn parse(text: &str, recipe: &Recipe) -> Result<Self> {
        if let Some(path) = text.strip_prefix("sqlite://") {
            if path.is_empty() {
                bail!("`connection` names no database file; write sqlite://faq.db (from the recipe's folder) or sqlite:///absolute/path.db");
            }
            return Ok(Self::Sqlite(recipe.resolve(path)));
        }
        if !text.starts_with("postgres://") && !text.starts_with("postgresql://") {
            bail!("`connection` is neither sqlite://FILE nor postgres://USER@HOST[:PORT]/DB");
        }
        let config: ::postgres::Config = text
            .parse()
            .map_err(|e| anyhow!("`connection`: {}", super::pg::server_message(&e)))?;
        if config.get_password().is_some() {
            bail!("`connection` holds a password, which a recipe must not: {WHERE_PASSWORDS_GO}");
        }
        if config.get_user().is_none() {
            bail!("`connection` names no user; write postgres://USER@HOST[:PORT]/DB");
        }
        if config.get_hosts().is_empty() {
            bail!("`connection` names no host; write postgres://USER@HOST[:PORT]/DB");
        }
        Ok(Self::Postgres(Box::new(config)))
    }
}

/// The connection with any password taken out (the user info after `:`, a `password=`
/// parameter), for messages, reports and model cards.
pub fn without_password(text: &str) -> String {
    let Some((scheme, rest)) = ["postgres://", "postgresql://"]
        .into_iter()
        .find_map(|s| text.strip_prefix(s).map(|rest| (s, rest)))
    else {
        return text.to_string();
    };
    // As libpq and tokio-postgres read it: the user info runs to the first `@`.
    let (user, rest) = match rest.split_once('@') {
        Some((info, rest)) => (
            format!("{}@", info.split(':').next().unwrap_or_default()),
            rest,
        ),
        None => (String::new(), rest),
    };
    let (place, query) = rest.split_once('?').unwrap_or((rest, ""));
    let params: Vec<&str> = query
        .split('&')
        .filter(|p| !p.is_empty() && !p.starts_with("password="))
        .collect();
    let query = if params.is_empty() {
        String::new()
    } else {
        format!("?{}", params.join("&"))
    };
    format!("{scheme}{user}{place}{query}")
}

#[cfg(test)]
mod tests {
    use super::without_password;

    #[test]
    fn passwords_are_taken_out() {
        for (written, shown) in [
            (
                "postgres://anna:geheim@db:5433/faq",
                "postgres://anna@db:5433/faq",
            ),
            ("postgresql://anna@db/faq", "postgresql://anna@db/faq"),
            (
                "postgres://db/faq?password=geheim&sslmode=disable",
                "postgres://db/faq?sslmode=disable",
            ),
            (
                "postgres://anna:@db/faq?password=x",
                "postgres://anna@db/faq",
            ),
            ("sqlite://daten/faq@2024.db", "sqlite://daten/faq@2024.db"),
        ] {
            assert_eq!(without_password(written), shown);
        }
    }
}
