//! The apps a server runs: from a manifest (`--config wasmhive.toml`), or
//! the one component of the command line, which is a manifest of one app
//! serving every path.
//!
//! ```toml
//! [[app]]
//! name = "api"
//! component = "api.wasm"      # relative to the manifest's directory
//! route = "/api"              # path prefix; default "/"
//! host = "api.example.com"    # optional; the request's host must match
//! max-instances = 64          # any per-app setting overrides its flag
//! env = { GREETING = "hi" }
//! allow-outbound = ["backend.internal:8080"]
//! ```
//!
//! Per-app settings (each defaults to its command-line flag):
//! `max-instances`, `max-concurrent-per-instance`, `max-reuse`, `prewarm`,
//! `max-memory`, `request-timeout`, `idle-timeout`; `env` and
//! `allow-outbound` add to the flags'. Each app has its own pool and queue
//! (of `--queue-len`); listeners, client shares, the memory budget and
//! connection timeouts are the server's. With `--workers`, per-app limits
//! apply in each worker.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::Deserialize;

use crate::args::{ServeArgs, parse_duration, parse_size};

/// One app of a manifest, with the settings it is loaded with.
#[derive(Clone, Debug)]
pub struct AppSpec {
    /// Names the app in logs and in metrics' `app` label.
    pub name: String,
    /// The path prefix it serves (`/` for every path), without a trailing
    /// slash except for `/` itself.
    pub route: String,
    /// The host it serves (lowercase, no port), or any host.
    pub host: Option<String>,
    /// The flags with this app's component and settings in place.
    pub args: ServeArgs,
}

/// Where the apps come from, read again on every reload.
#[derive(Clone, Debug)]
pub enum Source {
    /// `--config FILE`.
    Manifest(PathBuf),
    /// The component on the command line (or the demo app).
    CommandLine,
}

impl Source {
    pub fn of(args: &ServeArgs) -> Source {
        match &args.config {
            Some(path) => Source::Manifest(path.clone()),
            None => Source::CommandLine,
        }
    }

    /// The apps, with `args` as every app's defaults.
    pub fn read(&self, args: &ServeArgs) -> anyhow::Result<Vec<AppSpec>> {
        match self {
            Source::CommandLine => Ok(vec![AppSpec {
                name: args
                    .component
                    .as_deref()
                    .and_then(Path::file_stem)
                    .map_or("demo".into(), |stem| stem.to_string_lossy().into_owned()),
                route: "/".into(),
                host: None,
                args: args.clone(),
            }]),
            Source::Manifest(path) => read_manifest(path, args),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(rename = "app", default)]
    apps: Vec<Entry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Entry {
    name: String,
    component: PathBuf,
    route: Option<String>,
    host: Option<String>,
    max_instances: Option<u32>,
    max_concurrent_per_instance: Option<u32>,
    max_reuse: Option<u32>,
    prewarm: Option<usize>,
    #[serde(default, deserialize_with = "size")]
    max_memory: Option<u64>,
    #[serde(default, deserialize_with = "duration")]
    request_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    idle_timeout: Option<Duration>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "authorities")]
    allow_outbound: Vec<wasmhive::OutboundAuthority>,
}

fn size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let value = String::deserialize(d)?;
    parse_size(&value)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

fn duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let value = String::deserialize(d)?;
    parse_duration(&value)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

fn authorities<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Vec<wasmhive::OutboundAuthority>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|value| value.parse().map_err(serde::de::Error::custom))
        .collect()
}

/// Reads and checks the manifest at `path`; a syntax or type error names
/// the line and column.
fn read_manifest(path: &Path, defaults: &ServeArgs) -> anyhow::Result<Vec<AppSpec>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let file: File =
        toml::from_str(&text).map_err(|error| anyhow::anyhow!("{}: {error}", path.display()))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut specs: Vec<AppSpec> = Vec::new();
    for entry in file.apps {
        let spec = entry
            .into_spec(dir, defaults)
            .with_context(|| format!("{}", path.display()))?;
        if let Some(other) = specs.iter().find(|other| other.name == spec.name) {
            bail!("{}: two apps are named `{}`", path.display(), other.name);
        }
        if let Some(other) = specs
            .iter()
            .find(|other| other.route == spec.route && other.host == spec.host)
        {
            bail!(
                "{}: apps `{}` and `{}` have the same route and host",
                path.display(),
                other.name,
                spec.name
            );
        }
        specs.push(spec);
    }
    if specs.is_empty() {
        bail!("{}: no [[app]] to serve", path.display());
    }
    Ok(specs)
}

impl Entry {
    fn into_spec(self, dir: &Path, defaults: &ServeArgs) -> anyhow::Result<AppSpec> {
        let name = self.name;
        let valid_name = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !valid_name {
            bail!("app name `{name}`: use letters, digits, `-` and `_`");
        }
        let route = match self.route.as_deref() {
            None | Some("/") => "/".to_string(),
            Some(route) if route.starts_with('/') && !route.contains(['?', '#', ' ']) => {
                match route.trim_end_matches('/') {
                    "" => "/".to_string(),
                    route => route.to_string(),
                }
            }
            Some(route) => bail!("app `{name}`: route `{route}` must be a path starting with `/`"),
        };
        let host = match self.host {
            None => None,
            Some(host) => match host.parse::<http::uri::Authority>() {
                Ok(authority)
                    if authority.port().is_none()
                        && !authority.host().is_empty()
                        && !host.contains('@') =>
                {
                    Some(authority.host().to_ascii_lowercase())
                }
                _ => bail!("app `{name}`: host `{host}` must be a host name without a port"),
            },
        };
        let mut args = defaults.clone();
        args.component = Some(dir.join(self.component));
        args.max_instances = self.max_instances.unwrap_or(args.max_instances);
        args.max_concurrent_per_instance = self
            .max_concurrent_per_instance
            .or(args.max_concurrent_per_instance);
        args.max_reuse = self.max_reuse.or(args.max_reuse);
        args.prewarm = self.prewarm.unwrap_or(args.prewarm);
        args.max_memory = self.max_memory.unwrap_or(args.max_memory);
        args.request_timeout = self.request_timeout.unwrap_or(args.request_timeout);
        args.idle_timeout = self.idle_timeout.unwrap_or(args.idle_timeout);
        args.env.extend(self.env);
        args.allow_outbound.extend(self.allow_outbound);
        for (what, value) in [
            ("max-instances", self.max_instances),
            (
                "max-concurrent-per-instance",
                self.max_concurrent_per_instance,
            ),
            ("max-reuse", self.max_reuse),
        ] {
            if value == Some(0) {
                bail!("app `{name}`: {what} must be at least 1");
            }
        }
        Ok(AppSpec {
            name,
            route,
            host,
            args,
        })
    }
}
