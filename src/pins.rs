//! Manual primaries (`tunnelkeeper pin SERVICE TUNNEL`), persisted in `state_dir/pins.json` so
//! that an operator's choice survives a daemon restart.
//!
//! The file maps service names to tunnel names. Pins whose service or tunnel no longer exists
//! (after a reload or an edit while the daemon was down) are dropped with a warning rather than
//! kept pointing at nothing.

use std::collections::BTreeMap;
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
        let loaded = state::read_optional(&path).and_then(|text| match text {
            None => Ok(BTreeMap::new()),
            Some(text) => serde_json::from_str(&text).with_context(|| {
                format!(
                    "{} is not a JSON object of service → tunnel",
                    path.display()
                )
            }),
        });
        match loaded {
            Ok(pins) => (Pins { path, pins }, None),
            Err(e) => (
                Pins {
                    path,
                    pins: BTreeMap::new(),
                },
                Some(e),
            ),
        }
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
        let known = |service: &str, tunnel: &str| {
            config
                .services
                .iter()
                .any(|s| s.name == service && s.tunnels.iter().any(|t| t.name == tunnel))
        };
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
        let mut text = serde_json::to_string_pretty(pins)?;
        text.push('\n');
        state::write_atomic(&self.path, text.as_bytes())
    }
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
