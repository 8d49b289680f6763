//! An operator's choices that survive a daemon restart: manual primaries (`tunnelkeeper pin
//! SERVICE TUNNEL`, in `state_dir/pins.json`) and drained tunnels (`tunnelkeeper drain SERVICE
//! TUNNEL`, in `state_dir/drains.json`).
//!
//! `pins.json` maps service names to tunnel names; `drains.json` maps service names to the
//! list of their drained tunnels. Entries whose service or tunnel no longer exists (after a
//! reload or an edit while the daemon was down) are dropped with a warning rather than kept
//! pointing at nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::config::spec::Config;
use crate::state;

/// The pins in force and where they are kept.
#[derive(Debug)]
pub struct Pins {
    path: PathBuf,
    pins: BTreeMap<String, String>,
}

impl Pins {
    /// Reads `state_dir/pins.json`; a missing file means no pins. A damaged file is an error
    /// the caller reports (and starts without pins): it is never silently overwritten before
    /// the operator pins again.
    pub fn load(state_dir: &Path) -> (Pins, Option<anyhow::Error>) {
        let path = state_dir.join("pins.json");
        let (pins, damaged) = load_map(&path, "service → tunnel");
        (Pins { path, pins }, damaged)
    }

    /// Every pin, service → tunnel.
    pub fn all(&self) -> &BTreeMap<String, String> {
        &self.pins
    }

    /// Sets (Some) or removes (None) the pin of `service` and writes the file.
    pub fn set(&mut self, service: &str, tunnel: Option<&str>) -> anyhow::Result<()> {
        let mut next = self.pins.clone();
        match tunnel {
            Some(t) => next.insert(service.to_owned(), t.to_owned()),
            None => next.remove(service),
        };
        self.save(&next)?;
        self.pins = next;
        Ok(())
    }

    /// Drops pins whose service or tunnel `config` lacks; returns them as `service/tunnel`.
    pub fn retain_known(&mut self, config: &Config) -> Vec<String> {
        let known = |service: &str, tunnel: &str| known(config, service, tunnel);
        let stale: Vec<String> = self
            .pins
            .iter()
            .filter(|(s, t)| !known(s, t))
            .map(|(s, t)| format!("{s}/{t}"))
            .collect();
        if !stale.is_empty() {
            let mut next = self.pins.clone();
            next.retain(|s, t| known(s, t));
            if let Err(e) = self.save(&next) {
                tracing::warn!("dropping stale pins: {e:#}");
            }
            self.pins = next;
        }
        stale
    }

    fn save(&self, pins: &BTreeMap<String, String>) -> anyhow::Result<()> {
        save_map(&self.path, pins)
    }
}

/// The drained tunnels and where they are kept.
#[derive(Debug)]
pub struct Drains {
    path: PathBuf,
    drains: BTreeMap<String, BTreeSet<String>>,
}

impl Drains {
    /// Reads `state_dir/drains.json`, like [`Pins::load`].
    pub fn load(state_dir: &Path) -> (Drains, Option<anyhow::Error>) {
        let path = state_dir.join("drains.json");
        let (drains, damaged) = load_map(&path, "service → [tunnel]");
        (Drains { path, drains }, damaged)
    }

    /// Every drained tunnel, as (service, tunnel).
    pub fn all(&self) -> Vec<(String, String)> {
        self.drains
            .iter()
            .flat_map(|(s, ts)| ts.iter().map(move |t| (s.clone(), t.clone())))
            .collect()
    }

    /// Drains (true) or undrains (false) `service/tunnel` and writes the file.
    pub fn set(&mut self, service: &str, tunnel: &str, drained: bool) -> anyhow::Result<()> {
        let mut next = self.drains.clone();
        let tunnels = next.entry(service.to_owned()).or_default();
        if drained {
            tunnels.insert(tunnel.to_owned());
        } else {
            tunnels.remove(tunnel);
        }
        next.retain(|_, ts| !ts.is_empty());
        save_map(&self.path, &next)?;
        self.drains = next;
        Ok(())
    }

    /// Drops drains whose service or tunnel `config` lacks; returns them as `service/tunnel`.
    pub fn retain_known(&mut self, config: &Config) -> Vec<String> {
        let stale: Vec<String> = self
            .all()
            .into_iter()
            .filter(|(s, t)| !known(config, s, t))
            .map(|(s, t)| format!("{s}/{t}"))
            .collect();
        if !stale.is_empty() {
            let mut next = self.drains.clone();
            for (service, tunnels) in next.iter_mut() {
                tunnels.retain(|t| known(config, service, t));
            }
            next.retain(|_, ts| !ts.is_empty());
            if let Err(e) = save_map(&self.path, &next) {
                tracing::warn!("dropping stale drains: {e:#}");
            }
            self.drains = next;
        }
        stale
    }
}

/// Whether `config` has a tunnel `tunnel` in service `service`.
fn known(config: &Config, service: &str, tunnel: &str) -> bool {
    config
        .services
        .iter()
        .any(|s| s.name == service && s.tunnels.iter().any(|t| t.name == tunnel))
}

/// Reads a JSON object from `path`: empty when the file is missing, empty and an error naming
/// the file (and the `shape` expected) when it is damaged.
fn load_map<T: serde::de::DeserializeOwned + Default>(
    path: &Path,
    shape: &str,
) -> (T, Option<anyhow::Error>) {
    let loaded = state::read_optional(path).and_then(|text| match text {
        None => Ok(T::default()),
        Some(text) => serde_json::from_str(&text)
            .with_context(|| format!("{} is not a JSON object of {shape}", path.display())),
    });
    match loaded {
        Ok(map) => (map, None),
        Err(e) => (T::default(), Some(e)),
    }
}

fn save_map<T: serde::Serialize>(path: &Path, map: &T) -> anyhow::Result<()> {
    let mut text = serde_json::to_string_pretty(map)?;
    text.push('\n');
    state::write_atomic(path, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_survive_a_reload_from_disk_and_unpinning_removes_them() {
        let dir = tempfile::tempdir().unwrap();
        let (mut pins, err) = Pins::load(dir.path());
        assert!(err.is_none());
        pins.set("home", Some("vps")).unwrap();
        pins.set("web", Some("cf")).unwrap();
        pins.set("web", None).unwrap();
        let (again, err) = Pins::load(dir.path());
        assert!(err.is_none());
        assert_eq!(
            again.all().iter().collect::<Vec<_>>(),
            [(&"home".to_owned(), &"vps".to_owned())]
        );
    }

    #[test]
    fn drains_survive_a_reload_from_disk_and_undraining_removes_them() {
        let dir = tempfile::tempdir().unwrap();
        let (mut drains, err) = Drains::load(dir.path());
        assert!(err.is_none());
        drains.set("home", "vps", true).unwrap();
        drains.set("home", "lte", true).unwrap();
        drains.set("web", "cf", true).unwrap();
        drains.set("web", "cf", false).unwrap();
        let (again, err) = Drains::load(dir.path());
        assert!(err.is_none());
        assert_eq!(
            again.all(),
            [("home".into(), "lte".into()), ("home".into(), "vps".into())]
        );
        let text = std::fs::read_to_string(dir.path().join("drains.json")).unwrap();
        assert!(!text.contains("web"), "{text}");
    }

    #[test]
    fn a_damaged_file_is_reported_and_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pins.json"), "{not json").unwrap();
        let (pins, err) = Pins::load(dir.path());
        assert!(pins.all().is_empty());
        assert!(format!("{:#}", err.unwrap()).contains("pins.json"));
        assert_eq!(
            std::fs::read_to_string(dir.path().join("pins.json")).unwrap(),
            "{not json"
        );
    }
}
