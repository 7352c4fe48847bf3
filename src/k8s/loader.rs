//! The input loader every svclb program shares (the CLI, a proxy, an eBPF
//! loader): manifests as people apply them and watch streams as kubectl
//! writes them, into a [`ServiceTable`], with one set of [`LoadOptions`]:
//!
//! | option | CLI flag | default |
//! |---|---|---|
//! | [`service_cidrs`](LoadOptions::service_cidrs) | `--service-cidr` | `10.96.0.0/12,fd00:10:96::/112` |
//! | [`keep_going`](LoadOptions::keep_going) | `--keep-going` | off |
//! | [`verbose`](LoadOptions::verbose) | `--verbose` | off |
//! | [`limits`](LoadOptions::limits) | `--max-input-bytes`, `--max-depth`, `--max-documents`, `--max-objects` | 256 MiB, 100, 1,000,000, 1,000,000 |
//! | [`max_errors`](LoadOptions::max_errors) | `--max-errors` | 20 |
//! | [`node_port_range`](LoadOptions::node_port_range) | `--service-node-port-range` | `30000-32767` |
//!
//! What it does beyond [`Manifests`]:
//!
//! - **Cluster IPs.** A Service without `spec.clusterIP` (not headless, not
//!   ExternalName) gets one from the service CIDR of its family, as the API
//!   server would: `spec.ipFamilies[0]` if given, else the first CIDR's
//!   family; both families for `PreferDualStack`/`RequireDualStack`. The
//!   address is deterministic: an offset from a pinned hash (FNV-1a 64) of
//!   `namespace/name`, probed upwards past every address in use (given
//!   explicitly anywhere in the input, already in the table, or assigned
//!   before), skipping the network and broadcast addresses and the first
//!   host address (the API server keeps it for `default/kubernetes`).
//!   Services are assigned in key order, so the same input gets the same
//!   IPs run after run, whatever the file order. A [`Note::Assigned`] names
//!   each.
//! - **Errors.** Every bad object of an input is reported (up to
//!   `max_errors`), not only the first; with `keep_going` each is skipped
//!   with a [`Note::BadObject`] and the rest loads, and a change the table
//!   refuses is dropped from its batch with a [`Note::Refused`].
//! - **Watch order.** `--watch` inputs apply event by event, in order,
//!   after the manifests; stale resourceVersions are dropped
//!   ([`ResourceVersions`]).
//! - **Notes** ([`LoadReport::lines`]): skipped kinds are summarised (one
//!   line per kind and reason, with a count) unless `verbose`.
//!
//! # Examples
//! ```
//! use svclb::k8s::loader::{LoadOptions, Loader};
//! use svclb::{ServiceKey, ServiceTable};
//!
//! let text = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80}]}\n";
//! let mut loader = Loader::new(LoadOptions::default());
//! let mut table = ServiceTable::new();
//! let report = loader.apply_manifest_text(&mut table, text, "web.yaml")?;
//! let svc = table.service(&ServiceKey::new("default", "web")).unwrap();
//! let ip = svc.cluster_ip().addrs()[0];
//! assert!("10.96.0.0/12".parse::<svclb::render::Cidr>().unwrap().contains(ip));
//! assert!(report.lines(false)[0].contains(&ip.to_string()));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

// A ManifestError carries its whole context: large, and only on error paths.
#![allow(clippy::result_large_err)]

use core::fmt;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::input::{InputLimits, read_capped};
use super::manifest::{
    ChangeBatch, Manifest, ManifestError, ManifestErrors, Manifests, ObjectRef, Origin,
    ServiceManifest, Skipped, WatchError,
};
use super::watch::{ResourceVersions, StaleEvent};
use crate::error::{UpdateError, ValidationError};
use crate::model::service::{DEFAULT_NODE_PORT_RANGE, ServiceKey};
use crate::render::Cidr;
use crate::table::{ChangeNote, ChangeSet, ServiceTable};

/// The default `--service-cidr`: kubeadm's IPv4 range and an IPv6 one.
pub const DEFAULT_SERVICE_CIDRS: &str = "10.96.0.0/12,fd00:10:96::/112";

/// The options every program that loads Kubernetes input takes; see the
/// [module docs](self).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadOptions {
    /// `--service-cidr`: one range per family, the first one primary.
    pub service_cidrs: Vec<Cidr>,
    /// `--keep-going`: skip bad objects (with a note) instead of failing.
    pub keep_going: bool,
    /// `--verbose`: one note per skipped object instead of a summary.
    pub verbose: bool,
    /// Bounds on each input.
    pub limits: InputLimits,
    /// Errors reported per input before the rest are only counted.
    pub max_errors: usize,
    /// `--service-node-port-range`: the API server's range every
    /// `spec.ports[].nodePort` must fall in ([`parse_node_port_range`]).
    pub node_port_range: RangeInclusive<u16>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            service_cidrs: parse_service_cidrs(DEFAULT_SERVICE_CIDRS).expect("the default parses"),
            keep_going: false,
            verbose: false,
            limits: InputLimits::default(),
            max_errors: ManifestErrors::DEFAULT_MAX,
            node_port_range: DEFAULT_NODE_PORT_RANGE,
        }
    }
}

/// Parses `--service-node-port-range` as the API server does: `LOW-HIGH`
/// (both included) or `BASE+SIZE` (`SIZE` ports from `BASE`).
///
/// # Errors
/// [`ValidationError::Invalid`] naming `--service-node-port-range` for
/// anything else, a port outside 1-65535, or an empty range.
pub fn parse_node_port_range(text: &str) -> Result<RangeInclusive<u16>, ValidationError> {
    let invalid = |reason| ValidationError::Invalid {
        field: "--service-node-port-range".into(),
        value: text.into(),
        reason,
    };
    let t = text.trim();
    let num = |s: &str| s.trim().parse::<u32>().ok();
    let (low, high) = if let Some((a, b)) = t.split_once('-') {
        match (num(a), num(b)) {
            (Some(a), Some(b)) => (a, b),
            _ => return Err(invalid("must be LOW-HIGH or BASE+SIZE")),
        }
    } else if let Some((a, n)) = t.split_once('+') {
        match (num(a), num(n)) {
            (Some(a), Some(n)) if n > 0 => (a, a + n - 1),
            (Some(_), Some(_)) => return Err(invalid("the range is empty")),
            _ => return Err(invalid("must be LOW-HIGH or BASE+SIZE")),
        }
    } else {
        return Err(invalid("must be LOW-HIGH or BASE+SIZE"));
    };
    let (Ok(low), Ok(high)) = (u16::try_from(low), u16::try_from(high)) else {
        return Err(invalid("ports must be 1-65535"));
    };
    if low == 0 {
        return Err(invalid("ports must be 1-65535"));
    }
    if low > high {
        return Err(invalid("the range is empty"));
    }
    Ok(low..=high)
}

/// Parses `--service-cidr`: one or two comma-separated CIDRs, at most one
/// per family.
///
/// # Errors
/// [`ValidationError::Invalid`] naming `--service-cidr` for a bad CIDR, two
/// of one family, or a range too small to assign from (IPv4 /31, IPv6 /128).
pub fn parse_service_cidrs(text: &str) -> Result<Vec<Cidr>, ValidationError> {
    let mut out: Vec<Cidr> = Vec::new();
    for part in text.split(',') {
        let cidr = Cidr::parse("--service-cidr", part.trim())?;
        let invalid = |reason| ValidationError::Invalid {
            field: "--service-cidr".into(),
            value: text.into(),
            reason,
        };
        if out
            .iter()
            .any(|c| c.addr().is_ipv4() == cidr.addr().is_ipv4())
        {
            return Err(invalid("at most one range per IP family"));
        }
        let host_bits = if cidr.addr().is_ipv4() { 32 } else { 128 } - u32::from(cidr.prefix_len());
        if host_bits < 2 {
            return Err(invalid("a range must hold at least 4 addresses"));
        }
        out.push(cidr);
    }
    Ok(out)
}

/// Something the loader did or skipped, worth telling the user.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Note {
    /// A Service without `spec.clusterIP` got these addresses.
    Assigned {
        /// Where it came from.
        origin: Origin,
        /// The service.
        service: ServiceKey,
        /// The addresses, primary family first.
        ips: Vec<IpAddr>,
    },
    /// An object not turned into a change (another kind, a slice without
    /// the service-name label, a BOOKMARK).
    Skipped(Skipped),
    /// A bad object skipped under `keep_going`.
    BadObject(ManifestError),
    /// A change the table refused, dropped under `keep_going`.
    Refused {
        /// Where it came from.
        origin: Origin,
        /// Why.
        error: UpdateError,
    },
    /// A watch stream's ERROR event.
    WatchError(WatchError),
    /// A watch event whose resourceVersion went backwards.
    Stale(StaleEvent),
    /// What the table noted (a pending slice, a delete of an absent object).
    Table(ChangeNote),
}

impl fmt::Display for Note {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Note::Assigned {
                origin,
                service,
                ips,
            } => {
                let ips: Vec<String> = ips.iter().map(ToString::to_string).collect();
                write!(
                    f,
                    "{origin}: Service {service}: no spec.clusterIP: assigned {} from --service-cidr",
                    ips.join(",")
                )
            }
            Note::Skipped(s) => write!(f, "{s}"),
            Note::BadObject(e) => write!(f, "skipped (--keep-going): {e}"),
            Note::Refused { origin, error } => {
                write!(f, "{origin}: skipped (--keep-going): {error}")
            }
            Note::WatchError(e) => write!(f, "{e}"),
            Note::Stale(s) => write!(f, "{s}"),
            Note::Table(n) => write!(f, "{n}"),
        }
    }
}

/// What a load did: the table's change sets (one per applied batch, in
/// order) and the notes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// The change sets, in order (a dataplane syncs each).
    pub change_sets: Vec<ChangeSet>,
    /// The notes, in order.
    pub notes: Vec<Note>,
}

impl LoadReport {
    /// The notes as lines for a user: each note, except that skipped
    /// objects are summarised per kind and reason (with a count) unless
    /// `verbose`.
    pub fn lines(&self, verbose: bool) -> Vec<String> {
        let mut out = Vec::new();
        let mut summary: BTreeMap<(String, &'static str), usize> = BTreeMap::new();
        for n in &self.notes {
            match n {
                Note::Skipped(s) if !verbose => {
                    *summary
                        .entry((s.object.kind.clone(), s.reason))
                        .or_default() += 1;
                }
                other => out.push(other.to_string()),
            }
        }
        for ((kind, reason), count) in summary {
            let plural = if count == 1 { "object" } else { "objects" };
            out.push(format!(
                "skipped {count} {kind} {plural}: {reason} (--verbose lists them)"
            ));
        }
        out
    }

    fn extend(&mut self, other: LoadReport) {
        self.change_sets.extend(other.change_sets);
        self.notes.extend(other.notes);
    }
}

/// A load that failed; the table is as it was before the failing input.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum LoadError {
    /// Bad objects (every one, up to the limit) or unreadable input.
    #[error("{0}")]
    Input(ManifestErrors),
    /// The table refused a change.
    #[error("{origin}: {error}")]
    Refused {
        /// Where the change came from.
        origin: Origin,
        /// Why.
        error: UpdateError,
    },
    /// A path could not be listed.
    #[error("{path}: {message}")]
    Io {
        /// The path.
        path: String,
        /// The operating system's message.
        message: String,
    },
}

/// Reads manifests and watch streams into a table; see the
/// [module docs](self). It remembers what it assigned and saw, so later
/// inputs (more watch events) stay consistent with earlier ones.
#[derive(Debug, Clone, Default)]
pub struct Loader {
    options: LoadOptions,
    assigned: BTreeMap<ServiceKey, Vec<IpAddr>>,
    selectors: BTreeMap<ServiceKey, bool>,
    versions: ResourceVersions,
}

/// FNV-1a, 64 bits: pinned so that every run and machine agrees.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn needs_ip(svc: &ServiceManifest) -> bool {
    !svc.is_external_name()
        && svc.spec.cluster_ip.as_deref().is_none_or(str::is_empty)
        && svc.spec.cluster_ips.iter().all(String::is_empty)
}

/// The `offset`-th address of `cidr`.
fn nth(cidr: &Cidr, offset: u128) -> IpAddr {
    match cidr.addr() {
        IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a).wrapping_add(offset as u32))),
        IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a).wrapping_add(offset))),
    }
}

impl Loader {
    /// A loader with these options.
    pub fn new(options: LoadOptions) -> Self {
        Loader {
            options,
            ..Loader::default()
        }
    }

    /// The options.
    pub fn options(&self) -> &LoadOptions {
        &self.options
    }

    /// The manifest files under `path` (itself if not a directory): `.yaml`,
    /// `.yml` and `.json`, sorted, subdirectories included.
    ///
    /// # Errors
    /// [`LoadError::Io`] if a directory cannot be listed.
    pub fn manifest_files(path: &Path) -> Result<Vec<PathBuf>, LoadError> {
        let io = |e: std::io::Error| LoadError::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        let meta = std::fs::metadata(path).map_err(io)?;
        if !meta.is_dir() {
            return Ok(vec![path.to_owned()]);
        }
        let mut out = Vec::new();
        for entry in std::fs::read_dir(path).map_err(io)? {
            let p = entry.map_err(io)?.path();
            if p.is_dir() {
                out.extend(Self::manifest_files(&p)?);
            } else if matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            ) {
                out.push(p);
            }
        }
        out.sort();
        Ok(out)
    }

    fn read_file(&self, file: &Path) -> Result<String, ManifestError> {
        let source = file.display().to_string();
        let f = std::fs::File::open(file).map_err(|e| ManifestError::Read {
            origin: Origin {
                source: Some(source.clone()),
                ..Origin::default()
            },
            message: e.to_string(),
        })?;
        read_capped(f, Some(&source), &self.options.limits)
    }

    /// Reads every manifest file under `path` and applies them as one
    /// batch (`--manifests PATH`).
    ///
    /// # Errors
    /// See [`Loader::apply_manifests`].
    pub fn apply_manifest_path(
        &mut self,
        table: &mut ServiceTable,
        path: &Path,
    ) -> Result<LoadReport, LoadError> {
        let mut all = Manifests::new();
        let mut errors = ManifestErrors::default();
        for file in Self::manifest_files(path)? {
            let source = file.display().to_string();
            match self.read_file(&file) {
                Ok(text) => {
                    let (m, errs) =
                        Manifests::read(&text, Some(&source), &self.options.limits, None);
                    all.extend(m);
                    for e in errs {
                        errors.push(e, self.options.max_errors);
                    }
                }
                Err(e) => errors.push(e, self.options.max_errors),
            }
        }
        self.apply_manifests(table, all, errors)
    }

    /// Applies a manifest text as one batch.
    ///
    /// # Errors
    /// See [`Loader::apply_manifests`].
    pub fn apply_manifest_text(
        &mut self,
        table: &mut ServiceTable,
        text: &str,
        source: &str,
    ) -> Result<LoadReport, LoadError> {
        let (m, errs) = Manifests::read(text, Some(source), &self.options.limits, None);
        let mut errors = ManifestErrors::default();
        for e in errs {
            errors.push(e, self.options.max_errors);
        }
        self.apply_manifests(table, m, errors)
    }

    /// Applies objects already read (with the errors met reading them) as
    /// one batch: assigns cluster IPs, mirrors Endpoints, converts, and
    /// applies whole.
    ///
    /// # Errors
    /// [`LoadError::Input`] with every bad object (unless `keep_going`),
    /// [`LoadError::Refused`] if the table refuses the batch (unless
    /// `keep_going`, which drops the refused changes one by one). The table
    /// is untouched on error.
    pub fn apply_manifests(
        &mut self,
        table: &mut ServiceTable,
        mut manifests: Manifests,
        mut errors: ManifestErrors,
    ) -> Result<LoadReport, LoadError> {
        let mut report = LoadReport::default();
        for s in self.versions.retain_fresh(&mut manifests) {
            report.notes.push(Note::Stale(s));
        }
        let mut used = Self::used_ips(table);
        report
            .notes
            .extend(self.assign_ips(&mut manifests, &mut used));
        let (batch, bad) = self.convert(&manifests);
        for e in bad {
            errors.push(e, self.options.max_errors);
        }
        self.absorb_errors(errors, &mut report)?;
        self.note_read(&manifests, &batch, &mut report);
        let cs = self.apply_batch(table, batch, &mut report)?;
        report
            .notes
            .extend(cs.notes.iter().cloned().map(Note::Table));
        report.change_sets.push(cs);
        Ok(report)
    }

    /// Reads a watch stream (`--watch FILE`, `-` for standard input: read
    /// to its end, within the byte limit) and applies its events one by
    /// one, in order.
    ///
    /// # Errors
    /// See [`Loader::apply_watch_text`]; unreadable input is a
    /// [`LoadError::Input`].
    pub fn apply_watch_reader(
        &mut self,
        table: &mut ServiceTable,
        reader: impl Read,
        source: &str,
    ) -> Result<LoadReport, LoadError> {
        let text = read_capped(reader, Some(source), &self.options.limits).map_err(|e| {
            LoadError::Input(ManifestErrors {
                errors: vec![e],
                more: 0,
            })
        })?;
        self.apply_watch_text(table, &text, source)
    }

    /// Applies a watch stream's events one by one, in order: ADDED and
    /// MODIFIED upsert, DELETED deletes, BOOKMARK is skipped, ERROR noted,
    /// a stale resourceVersion noted and ignored. Plain objects read as
    /// ADDED.
    ///
    /// # Errors
    /// [`LoadError::Input`] with every bad event (unless `keep_going`;
    /// nothing is applied then), [`LoadError::Refused`] at the first event
    /// the table refuses (unless `keep_going`; the events before it stay
    /// applied, as they would in a real watch).
    pub fn apply_watch_text(
        &mut self,
        table: &mut ServiceTable,
        text: &str,
        source: &str,
    ) -> Result<LoadReport, LoadError> {
        let (mut manifests, errs) = Manifests::read(text, Some(source), &self.options.limits, None);
        let mut errors = ManifestErrors::default();
        for e in errs {
            errors.push(e, self.options.max_errors);
        }
        let mut report = LoadReport::default();
        for s in self.versions.retain_fresh(&mut manifests) {
            report.notes.push(Note::Stale(s));
        }
        let mut used = Self::used_ips(table);
        report
            .notes
            .extend(self.assign_ips(&mut manifests, &mut used));
        let (batch, bad) = self.convert(&manifests);
        for e in bad {
            errors.push(e, self.options.max_errors);
        }
        self.absorb_errors(errors, &mut report)?;
        self.note_read(&manifests, &batch, &mut report);
        for (change, origin) in batch.changes.into_iter().zip(batch.origins) {
            match table.apply(change) {
                Ok(cs) => {
                    report
                        .notes
                        .extend(cs.notes.iter().cloned().map(Note::Table));
                    report.change_sets.push(cs);
                }
                Err(error) if self.options.keep_going => {
                    report.notes.push(Note::Refused { origin, error });
                }
                Err(error) => return Err(LoadError::Refused { origin, error }),
            }
        }
        Ok(report)
    }

    /// Every `--manifests` path as its own batch, then every `--watch`
    /// input event by event (`-` is standard input).
    ///
    /// # Errors
    /// The first input that fails; see [`Loader::apply_manifest_path`] and
    /// [`Loader::apply_watch_reader`].
    pub fn load(
        &mut self,
        table: &mut ServiceTable,
        manifests: &[PathBuf],
        watches: &[PathBuf],
    ) -> Result<LoadReport, LoadError> {
        let mut report = LoadReport::default();
        for path in manifests {
            report.extend(self.apply_manifest_path(table, path)?);
        }
        for path in watches {
            let r = if path.as_os_str() == "-" {
                self.apply_watch_reader(table, std::io::stdin().lock(), "<stdin>")?
            } else {
                let source = path.display().to_string();
                let f = std::fs::File::open(path).map_err(|e| LoadError::Io {
                    path: source.clone(),
                    message: e.to_string(),
                })?;
                self.apply_watch_reader(table, f, &source)?
            };
            report.extend(r);
        }
        Ok(report)
    }

    fn absorb_errors(
        &self,
        errors: ManifestErrors,
        report: &mut LoadReport,
    ) -> Result<(), LoadError> {
        if errors.is_empty() {
            return Ok(());
        }
        if !self.options.keep_going {
            return Err(LoadError::Input(errors));
        }
        report
            .notes
            .extend(errors.errors.into_iter().map(Note::BadObject));
        Ok(())
    }

    fn note_read(&self, manifests: &Manifests, batch: &ChangeBatch, report: &mut LoadReport) {
        report
            .notes
            .extend(manifests.skipped.iter().cloned().map(Note::Skipped));
        report
            .notes
            .extend(batch.skipped.iter().cloned().map(Note::Skipped));
        report
            .notes
            .extend(manifests.watch_errors.iter().cloned().map(Note::WatchError));
    }

    fn convert(&mut self, manifests: &Manifests) -> (ChangeBatch, Vec<ManifestError>) {
        for (_, s) in manifests.services() {
            self.selectors.insert(s.key(), s.spec.selector.is_some());
        }
        let selectors = &self.selectors;
        manifests.changes_lenient_in(self.options.node_port_range.clone(), |key| {
            selectors.get(key).copied()
        })
    }

    /// Applies a batch whole; under `keep_going`, drops each refused change
    /// (with a note) and tries again.
    fn apply_batch(
        &self,
        table: &mut ServiceTable,
        mut batch: ChangeBatch,
        report: &mut LoadReport,
    ) -> Result<ChangeSet, LoadError> {
        loop {
            match table.apply_batch(batch.changes.clone()) {
                Ok(cs) => return Ok(cs),
                Err(e) => {
                    let (index, error) = match e {
                        UpdateError::InBatch { index, source } => (index, *source),
                        other => (0, other),
                    };
                    let origin = batch.origins.get(index).cloned().unwrap_or_default();
                    if !self.options.keep_going || index >= batch.changes.len() {
                        return Err(LoadError::Refused { origin, error });
                    }
                    batch.changes.remove(index);
                    batch.origins.remove(index);
                    report.notes.push(Note::Refused { origin, error });
                }
            }
        }
    }

    fn used_ips(table: &ServiceTable) -> HashSet<IpAddr> {
        table
            .views()
            .flat_map(|v| v.service().cluster_ip().addrs().iter().copied())
            .collect()
    }

    /// Fills `spec.clusterIP(s)` of the services that have none.
    fn assign_ips(&mut self, manifests: &mut Manifests, used: &mut HashSet<IpAddr>) -> Vec<Note> {
        for (_, s) in manifests.services() {
            for ip in s.spec.cluster_ips.iter().chain(&s.spec.cluster_ip) {
                if let Ok(ip) = ip.parse::<IpAddr>() {
                    used.insert(ip);
                }
            }
        }
        used.extend(self.assigned.values().flatten().copied());
        // Key order, so that file order does not change the result.
        let mut todo: BTreeSet<(ServiceKey, usize)> = BTreeSet::new();
        for (i, d) in manifests.documents.iter().enumerate() {
            if let Manifest::Service(s) = &d.manifest {
                if needs_ip(s) && d.event != super::manifest::EventType::Deleted {
                    todo.insert((s.key(), i));
                }
            }
        }
        let mut notes = Vec::new();
        for (key, i) in todo {
            let d = &mut manifests.documents[i];
            let Manifest::Service(s) = &mut d.manifest else {
                unreachable!("collected above")
            };
            let ips = match self.assigned.get(&key) {
                Some(ips) => ips.clone(),
                None => {
                    let ips = self.pick(&key, s, used);
                    if ips.is_empty() {
                        continue;
                    }
                    self.assigned.insert(key.clone(), ips.clone());
                    ips
                }
            };
            s.spec.cluster_ip = Some(ips[0].to_string());
            s.spec.cluster_ips = ips.iter().map(ToString::to_string).collect();
            notes.push(Note::Assigned {
                origin: d.origin.clone(),
                service: key,
                ips,
            });
        }
        notes
    }

    fn pick(
        &self,
        key: &ServiceKey,
        s: &ServiceManifest,
        used: &mut HashSet<IpAddr>,
    ) -> Vec<IpAddr> {
        let cidrs = &self.options.service_cidrs;
        let family_cidr = |v6: bool| cidrs.iter().find(|c| c.addr().is_ipv6() == v6);
        let primary_v6 = match s.spec.ip_families.first().map(String::as_str) {
            Some("IPv6") => true,
            Some("IPv4") => false,
            _ => cidrs.first().is_some_and(|c| c.addr().is_ipv6()),
        };
        let dual = matches!(
            s.spec.ip_family_policy.as_deref(),
            Some("PreferDualStack" | "RequireDualStack")
        ) || s.spec.ip_families.len() > 1;
        let mut families = vec![primary_v6];
        if dual {
            families.push(!primary_v6);
        }
        let name = key.to_string();
        let mut out = Vec::new();
        for v6 in families {
            let Some(cidr) = family_cidr(v6) else {
                continue;
            };
            let bits = if v6 { 128 } else { 32 } - u32::from(cidr.prefix_len());
            // Usable offsets: 2 ..= last (1 is the kubernetes service's;
            // IPv4 also loses the broadcast address). Capped at 2^64.
            let size: u128 = if bits >= 64 { 1 << 64 } else { 1u128 << bits };
            let last = if v6 { size - 1 } else { size - 2 };
            let span = last - 1; // offsets 2..=last
            let start = if name == "default/kubernetes" {
                1
            } else {
                2 + u128::from(fnv1a(name.as_bytes())) % span
            };
            // Probe upwards, wrapping, at most `used.len() + 1` times: one
            // of those addresses is free (or the range is full).
            let tries = (used.len() as u128 + 1).min(span + 1);
            let mut off = start;
            for _ in 0..tries {
                let ip = nth(cidr, off);
                if used.insert(ip) {
                    out.push(ip);
                    break;
                }
                off = if off >= last { 2 } else { off + 1 };
            }
        }
        out
    }
}

/// The identity of a noted object, for callers matching notes.
impl Note {
    /// The object a note is about, when it is about one.
    pub fn object(&self) -> Option<ObjectRef> {
        match self {
            Note::Assigned { service, .. } => Some(ObjectRef {
                kind: "Service".into(),
                namespace: service.namespace.clone(),
                name: service.name.clone(),
            }),
            Note::Skipped(s) => Some(s.object.clone()),
            Note::Stale(s) => Some(s.object.clone()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignment_is_deterministic_and_avoids_explicit_ips() {
        let text = |order: &[usize]| {
            let docs = [
                "kind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 80}]}",
                "kind: Service\nmetadata: {name: b, namespace: x}\nspec: {ipFamilies: [IPv6], ports: [{port: 80}]}",
                "kind: Service\nmetadata: {name: c}\nspec: {ipFamilyPolicy: PreferDualStack, ports: [{port: 80}]}",
                "kind: Service\nmetadata: {name: h}\nspec: {clusterIP: None, ports: [{port: 80}]}",
            ];
            order
                .iter()
                .map(|&i| docs[i])
                .collect::<Vec<_>>()
                .join("\n---\n")
        };
        let load = |t: &str| {
            let mut table = ServiceTable::new();
            Loader::default()
                .apply_manifest_text(&mut table, t, "s.yaml")
                .unwrap();
            table.snapshot()
        };
        let first = load(&text(&[0, 1, 2, 3]));
        assert_eq!(first, load(&text(&[3, 2, 1, 0])));
        let ips = |k: ServiceKey| first.services[&k].service.cluster_ip().addrs().to_vec();
        let a = ips(ServiceKey::new("default", "a"));
        assert!(a[0].is_ipv4());
        assert!(ips(ServiceKey::new("x", "b"))[0].is_ipv6());
        assert_eq!(ips(ServiceKey::new("default", "c")).len(), 2);
        assert!(
            first.services[&ServiceKey::new("default", "h")]
                .service
                .is_headless()
        );
        // An explicit IP equal to the one `a` would get moves `a`, never
        // clashes.
        let taken = format!(
            "kind: Service\nmetadata: {{name: z}}\nspec: {{clusterIP: {}, ports: [{{port: 80}}]}}\n---\n{}",
            a[0],
            text(&[0])
        );
        let snap = load(&taken);
        let a2 = snap.services[&ServiceKey::new("default", "a")]
            .service
            .cluster_ip()
            .addrs()[0];
        assert_ne!(a2, a[0]);
    }

    #[test]
    fn the_node_port_range_is_the_api_servers_flag() {
        assert_eq!(
            parse_node_port_range("30000-32767").unwrap(),
            30_000..=32_767
        );
        assert_eq!(parse_node_port_range("8000+100").unwrap(), 8_000..=8_099);
        assert_eq!(parse_node_port_range("80-80").unwrap(), 80..=80);
        for bad in [
            "",
            "30000",
            "0-100",
            "100-65536",
            "200-100",
            "100+0",
            "a-b",
            "70000+1",
        ] {
            let e = parse_node_port_range(bad).unwrap_err().to_string();
            assert!(e.contains("--service-node-port-range"), "{bad}: {e}");
        }
        // nodePort 8080: refused in the default range, loaded in 8000-9000.
        let text = "kind: Service\nmetadata: {name: a}\nspec: {type: NodePort, clusterIP: 10.96.0.5, ports: [{port: 80, nodePort: 8080}]}";
        let mut table = ServiceTable::new();
        let err = Loader::new(LoadOptions::default())
            .apply_manifest_text(&mut table, text, "t")
            .unwrap_err()
            .to_string();
        assert!(err.contains("spec.ports[0].nodePort"), "{err}");
        assert!(err.contains("\"8080\""), "{err}");
        let options = LoadOptions {
            node_port_range: parse_node_port_range("8000-9000").unwrap(),
            ..LoadOptions::default()
        };
        Loader::new(options)
            .apply_manifest_text(&mut table, text, "t")
            .unwrap();
        let svc = table.service(&ServiceKey::new("default", "a")).unwrap();
        assert_eq!(svc.ports()[0].node_port(), Some(8080));
    }

    #[test]
    fn a_tiny_range_fills_then_stops() {
        let options = LoadOptions {
            service_cidrs: parse_service_cidrs("10.0.0.0/30").unwrap(),
            ..LoadOptions::default()
        };
        let mut table = ServiceTable::new();
        // /30: offsets 2 only (0 network, 1 reserved, 3 broadcast). The
        // second service finds the range full: an error naming the field,
        // or skipped with --keep-going.
        let text = "kind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 80}]}\n---\nkind: Service\nmetadata: {name: b}\nspec: {ports: [{port: 80}]}";
        let err = Loader::new(options.clone())
            .apply_manifest_text(&mut table, text, "t")
            .unwrap_err();
        assert!(err.to_string().contains("spec.clusterIP"), "{err}");
        let mut loader = Loader::new(LoadOptions {
            keep_going: true,
            ..options
        });
        let report = loader.apply_manifest_text(&mut table, text, "t").unwrap();
        let assigned = report
            .notes
            .iter()
            .filter(|n| matches!(n, Note::Assigned { .. }))
            .count();
        assert_eq!(assigned, 1);
        assert_eq!(table.len(), 1);
        assert!(parse_service_cidrs("10.0.0.0/8,10.1.0.0/16").is_err());
        assert!(parse_service_cidrs("10.0.0.0/31").is_err());
    }

    #[test]
    fn keep_going_skips_bad_objects_and_summarises_kinds() {
        let text = "kind: Service\nmetadata: {name: bad}\nspec: {ports: [{port: 0}]}\n---\nkind: Service\nmetadata: {name: ok}\nspec: {ports: [{port: 80}]}\n---\nkind: Deployment\nmetadata: {name: a}\n---\nkind: Deployment\nmetadata: {name: b}\n---\nkind: ConfigMap\nmetadata: {name: c}\n";
        let mut table = ServiceTable::new();
        let err = Loader::default()
            .apply_manifest_text(&mut table, text, "t")
            .unwrap_err();
        assert!(
            matches!(err, LoadError::Input(ref e) if e.errors.len() == 1),
            "{err}"
        );
        assert!(table.is_empty());
        let mut loader = Loader::new(LoadOptions {
            keep_going: true,
            ..LoadOptions::default()
        });
        let report = loader.apply_manifest_text(&mut table, text, "t").unwrap();
        assert_eq!(table.len(), 1);
        let lines = report.lines(false);
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("skipped 2 Deployment objects")),
            "{lines:#?}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("skipped 1 ConfigMap object:")),
            "{lines:#?}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.contains("--keep-going") && l.contains("bad")),
            "{lines:#?}"
        );
        assert_eq!(report.lines(true).len(), lines.len() + 1);
    }
}
