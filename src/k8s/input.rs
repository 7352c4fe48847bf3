//! Input that cannot stall us: the bounded, linear-time reader under
//! [`Manifests`](super::manifest::Manifests) and [`watch`](super::watch).
//!
//! - **Limits** ([`InputLimits`]): bytes per input (default 256 MiB),
//!   nesting depth (default 100), documents per input (default 1,000,000)
//!   and objects per input (default 1,000,000). Each is configurable, and
//!   each is reported by [`ManifestError::Limit`] naming the [`Limit`].
//! - **Linear time.** JSON is parsed once, streaming; the depth limit is
//!   checked while parsing. Text that starts with `{` or `[` is read as
//!   JSON, and read again as YAML (flow style) only when the JSON parser
//!   stopped at a character that shows YAML (an unquoted key such as
//!   `{kind: Service}`). YAML's own parser is quadratic in flow nesting
//!   depth, so a linear pre-scan rejects deep `[`/`{` nesting before it
//!   runs.
//! - **Bounded memory.** [`read_capped`] reads at most the byte limit
//!   (plus one byte, to tell), and stops at the first NUL byte or invalid
//!   UTF-8 in a chunk: `/dev/zero` fails after one 64 KiB read.
//! - A UTF-8 byte-order mark is skipped. A duplicate key in an object is a
//!   [`ManifestError::DuplicateKey`] naming the key and its path.
//! - Numbers that fit no 64-bit integer or float, and keys that are not
//!   scalars, are reported in Kubernetes terms, never in the parser's.

// A ManifestError carries its whole context: large, and only on error paths.
#![allow(clippy::result_large_err)]

use core::fmt;
use std::cell::RefCell;
use std::io::Read;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use super::manifest::{ManifestError, Origin};

/// One of the [`InputLimits`], as named in errors and CLI flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Limit {
    /// Bytes in one input (file, stream or string).
    Bytes,
    /// Nesting depth of lists and objects.
    Depth,
    /// Documents (YAML `---` documents, concatenated JSON values) in one
    /// input.
    Documents,
    /// Objects (documents, list items, watch events) in one input.
    Objects,
}

impl Limit {
    /// The limit's name, as the CLI flag spells it (`max-input-bytes`).
    pub fn name(self) -> &'static str {
        match self {
            Limit::Bytes => "max-input-bytes",
            Limit::Depth => "max-depth",
            Limit::Documents => "max-documents",
            Limit::Objects => "max-objects",
        }
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Bounds on one input; see the [module docs](self).
///
/// # Examples
/// ```
/// use svclb::k8s::input::{InputLimits, Limit};
/// use svclb::k8s::manifest::{ManifestError, Manifests};
///
/// let limits = InputLimits { max_depth: 8, ..InputLimits::default() };
/// let deep = format!("{}{}", "[".repeat(50), "]".repeat(50));
/// let err = Manifests::parse_str_with(&deep, Some("deep.json"), &limits).unwrap_err();
/// assert!(matches!(err, ManifestError::Limit { limit: Limit::Depth, max: 8, .. }));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputLimits {
    /// Bytes per input (default 256 MiB).
    pub max_bytes: u64,
    /// Nesting depth of lists and objects (default 100; a Kubernetes object
    /// with its `managedFields` nests about 15 deep). JSON's parser stops
    /// at 128 whatever this says.
    pub max_depth: usize,
    /// Documents per input (default 1,000,000).
    pub max_documents: usize,
    /// Objects per input: documents, list items and watch events (default
    /// 1,000,000).
    pub max_objects: usize,
}

impl InputLimits {
    /// The default byte limit: 256 MiB.
    pub const DEFAULT_MAX_BYTES: u64 = 256 << 20;
    /// The default depth limit.
    pub const DEFAULT_MAX_DEPTH: usize = 100;
    /// The default document limit.
    pub const DEFAULT_MAX_DOCUMENTS: usize = 1_000_000;
    /// The default object limit.
    pub const DEFAULT_MAX_OBJECTS: usize = 1_000_000;
}

impl Default for InputLimits {
    fn default() -> Self {
        InputLimits {
            max_bytes: Self::DEFAULT_MAX_BYTES,
            max_depth: Self::DEFAULT_MAX_DEPTH,
            max_documents: Self::DEFAULT_MAX_DOCUMENTS,
            max_objects: Self::DEFAULT_MAX_OBJECTS,
        }
    }
}

fn origin_of(source: Option<&str>, document: usize) -> Origin {
    Origin {
        source: source.map(str::to_owned),
        document,
        item: None,
    }
}

/// Reads `reader` to a string, at most `limits.max_bytes`, failing fast on
/// input that is not text.
///
/// # Errors
/// [`ManifestError::Limit`] ([`Limit::Bytes`]) past the byte limit,
/// [`ManifestError::NotText`] at the first NUL byte or invalid UTF-8 (found
/// chunk by chunk, so `/dev/zero` fails after 64 KiB), and
/// [`ManifestError::Read`] for an I/O error.
///
/// # Examples
/// ```
/// use svclb::k8s::input::{InputLimits, read_capped};
/// let limits = InputLimits { max_bytes: 4, ..InputLimits::default() };
/// assert!(read_capped(&b"kind"[..], Some("ok"), &limits).is_ok());
/// assert!(read_capped(&b"kind:"[..], Some("big"), &limits).is_err());
/// assert!(read_capped(&[0u8; 3][..], Some("zero"), &InputLimits::default()).is_err());
/// ```
pub fn read_capped(
    reader: impl Read,
    source: Option<&str>,
    limits: &InputLimits,
) -> Result<String, ManifestError> {
    const CHUNK: usize = 64 << 10;
    let origin = origin_of(source, 0);
    let mut reader = reader.take(limits.max_bytes.saturating_add(1));
    let mut buf: Vec<u8> = Vec::new();
    let mut checked = 0usize;
    loop {
        let start = buf.len();
        buf.resize(start + CHUNK, 0);
        let n = match reader.read(&mut buf[start..]) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => 0,
            Err(e) => {
                return Err(ManifestError::Read {
                    origin,
                    message: e.to_string(),
                });
            }
        };
        buf.truncate(start + n);
        if buf.len() as u64 > limits.max_bytes {
            return Err(ManifestError::Limit {
                origin,
                limit: Limit::Bytes,
                max: limits.max_bytes,
            });
        }
        if let Some(i) = buf[start..].iter().position(|&b| b == 0) {
            return Err(ManifestError::NotText {
                origin,
                offset: (start + i) as u64,
                reason: "a NUL byte (YAML and JSON are text)",
            });
        }
        // Check UTF-8 up to the last complete character.
        match std::str::from_utf8(&buf[checked..]) {
            Ok(_) => checked = buf.len(),
            Err(e) if e.error_len().is_none() => checked += e.valid_up_to(),
            Err(e) => {
                return Err(ManifestError::NotText {
                    origin,
                    offset: (checked + e.valid_up_to()) as u64,
                    reason: "invalid UTF-8",
                });
            }
        }
        if n == 0 {
            break;
        }
    }
    if checked != buf.len() {
        return Err(ManifestError::NotText {
            origin,
            offset: checked as u64,
            reason: "invalid UTF-8 (a truncated character at the end)",
        });
    }
    Ok(String::from_utf8(buf).expect("checked chunk by chunk"))
}

/// Why the value builder stopped, recorded beside serde's stringly error.
#[derive(Debug, Clone)]
enum Stop {
    Depth,
    Duplicate { path: String, key: String },
}

struct Ctx {
    max_depth: usize,
    stop: RefCell<Option<Stop>>,
    path: RefCell<Vec<String>>,
}

impl Ctx {
    fn new(limits: &InputLimits) -> Self {
        Ctx {
            max_depth: limits.max_depth,
            stop: RefCell::new(None),
            path: RefCell::new(Vec::new()),
        }
    }

    fn path_string(&self) -> String {
        let path = self.path.borrow();
        let mut out = String::new();
        for seg in path.iter() {
            if seg.starts_with('[') {
                out.push_str(seg);
            } else {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(seg);
            }
        }
        out
    }
}

/// Builds a [`Value`], checking depth and duplicate keys as it goes.
struct Node<'c> {
    ctx: &'c Ctx,
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for Node<'_> {
    type Value = Value;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl Node<'_> {
    fn deeper<E: de::Error>(&self) -> Result<Node<'_>, E> {
        if self.depth >= self.ctx.max_depth {
            *self.ctx.stop.borrow_mut() = Some(Stop::Depth);
            return Err(E::custom(format_args!(
                "nested deeper than the {} limit of {}",
                Limit::Depth,
                self.ctx.max_depth
            )));
        }
        Ok(Node {
            ctx: self.ctx,
            depth: self.depth + 1,
        })
    }
}

impl<'de> Visitor<'de> for Node<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a value")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Value, E> {
        i64::try_from(v).map(Value::from).map_err(|_| {
            E::custom(format_args!(
                "number {v} is out of range of a 64-bit integer"
            ))
        })
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Value, E> {
        u64::try_from(v).map(Value::from).map_err(|_| {
            E::custom(format_args!(
                "number {v} is out of range of a 64-bit integer"
            ))
        })
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        serde_json::Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom(format_args!("number {v} is not a finite number")))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let inner = self.deeper()?;
        let mut out = Vec::new();
        loop {
            self.ctx.path.borrow_mut().push(format!("[{}]", out.len()));
            let next = seq.next_element_seed(Node {
                ctx: inner.ctx,
                depth: inner.depth,
            });
            self.ctx.path.borrow_mut().pop();
            match next? {
                Some(v) => out.push(v),
                None => break,
            }
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let inner = self.deeper()?;
        let mut out = Map::new();
        while let Some(key) = map.next_key_seed(KeySeed)? {
            if out.contains_key(&key) {
                let path = self.ctx.path_string();
                *self.ctx.stop.borrow_mut() = Some(Stop::Duplicate {
                    path,
                    key: key.clone(),
                });
                return Err(de::Error::custom(format_args!("duplicate key {key:?}")));
            }
            self.ctx.path.borrow_mut().push(key);
            let value = map.next_value_seed(Node {
                ctx: inner.ctx,
                depth: inner.depth,
            });
            let key = self.ctx.path.borrow_mut().pop().expect("pushed above");
            out.insert(key, value?);
        }
        Ok(Value::Object(out))
    }
}

/// An object key: a string, or a YAML scalar read as its text.
struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = String;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = String;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name (a string)")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        Ok(v.to_owned())
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<String, E> {
        Ok(v)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_unit<E: de::Error>(self) -> Result<String, E> {
        Ok("null".to_owned())
    }
}

/// The error for a failed parse: the recorded limit or duplicate, else a
/// syntax error in `format`.
fn parse_error(ctx: &Ctx, origin: Origin, format: &'static str, message: String) -> ManifestError {
    match ctx.stop.borrow_mut().take() {
        Some(Stop::Depth) => ManifestError::Limit {
            origin,
            limit: Limit::Depth,
            max: ctx.max_depth as u64,
        },
        Some(Stop::Duplicate { path, key }) => ManifestError::DuplicateKey {
            origin,
            field: path,
            key,
            location: message,
        },
        None if message.contains("recursion limit exceeded") => ManifestError::Limit {
            origin,
            limit: Limit::Depth,
            max: ctx.max_depth.min(128) as u64,
        },
        None => ManifestError::Syntax {
            origin,
            format,
            message,
        },
    }
}

/// Which format a text is in, decided from its first character.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    Json,
    Yaml,
}

/// Strips a UTF-8 byte-order mark.
pub(crate) fn strip_bom(text: &str) -> &str {
    text.strip_prefix('\u{feff}').unwrap_or(text)
}

pub(crate) fn sniff(text: &str) -> Format {
    match text.trim_start().as_bytes().first() {
        Some(b'{') | Some(b'[') => Format::Json,
        _ => Format::Yaml,
    }
}

/// Calls `f` with each document's value, in order, within the limits.
/// Returns the format read.
pub(crate) fn for_each_document(
    text: &str,
    source: Option<&str>,
    limits: &InputLimits,
    format: Option<Format>,
    mut f: impl FnMut(Value, Origin) -> Result<(), ManifestError>,
) -> Result<(), ManifestError> {
    let text = strip_bom(text);
    if text.len() as u64 > limits.max_bytes {
        return Err(ManifestError::Limit {
            origin: origin_of(source, 0),
            limit: Limit::Bytes,
            max: limits.max_bytes,
        });
    }
    match format.unwrap_or_else(|| sniff(text)) {
        Format::Yaml => yaml_documents(text, source, limits, &mut f),
        Format::Json => {
            let mut seen = 0usize;
            match json_documents(text, source, limits, &mut seen, &mut f) {
                // `{kind: Service}` is YAML flow style: read it again as YAML
                // only when the JSON parser stopped, in its first document,
                // at a character JSON cannot have there but YAML can.
                Err(JsonStop::Syntax { err, at }) if seen == 0 && shows_yaml(text, at) => {
                    let _ = err;
                    yaml_documents(text, source, limits, &mut f)
                }
                Err(JsonStop::Syntax { err, .. }) => Err(err),
                Err(JsonStop::Other(e)) => Err(e),
                Ok(()) => Ok(()),
            }
        }
    }
}

enum JsonStop {
    /// A syntax error at a byte offset.
    Syntax {
        err: ManifestError,
        at: usize,
    },
    Other(ManifestError),
}

/// The byte offset of a 1-based line and column.
fn offset_of(text: &str, line: usize, column: usize) -> usize {
    let mut start = 0;
    for (i, l) in text.split_inclusive('\n').enumerate() {
        if i + 1 == line {
            return start + column.saturating_sub(1).min(l.len());
        }
        start += l.len();
    }
    text.len()
}

/// Whether the character at `at` starts a YAML plain scalar that JSON
/// cannot have: a letter or a quote JSON does not use.
fn shows_yaml(text: &str, at: usize) -> bool {
    // The JSON parser's position may fall inside a multi-byte character:
    // step back to its start (slicing there would panic).
    let mut at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    let rest = &text[at..];
    let rest = rest.trim_start();
    if ["true", "false", "null"]
        .iter()
        .any(|k| rest.starts_with(k))
    {
        return false;
    }
    matches!(rest.chars().next(), Some(c) if c.is_alphabetic() || c == '\'' || c == '_' || c == '.' || c == '/')
}

fn json_documents(
    text: &str,
    source: Option<&str>,
    limits: &InputLimits,
    seen: &mut usize,
    f: &mut impl FnMut(Value, Origin) -> Result<(), ManifestError>,
) -> Result<(), JsonStop> {
    let mut de = serde_json::Deserializer::from_str(text);
    let mut document = 0usize;
    loop {
        // Only white space left: the end of the input.
        if de.end().is_ok() {
            return Ok(());
        }
        document += 1;
        let origin = origin_of(source, document);
        if document > limits.max_documents {
            return Err(JsonStop::Other(ManifestError::Limit {
                origin,
                limit: Limit::Documents,
                max: limits.max_documents as u64,
            }));
        }
        let ctx = Ctx::new(limits);
        let value = Node {
            ctx: &ctx,
            depth: 0,
        }
        .deserialize(&mut de);
        match value {
            Ok(v) => {
                *seen += 1;
                f(v, origin).map_err(JsonStop::Other)?;
            }
            Err(e) => {
                let at = offset_of(text, e.line(), e.column());
                let syntax = e.is_syntax() || e.is_eof();
                let err = parse_error(&ctx, origin, "JSON", e.to_string());
                return Err(match (&err, syntax) {
                    (ManifestError::Syntax { .. }, true) => JsonStop::Syntax { err, at },
                    _ => JsonStop::Other(err),
                });
            }
        }
    }
}

fn yaml_documents(
    text: &str,
    source: Option<&str>,
    limits: &InputLimits,
    f: &mut impl FnMut(Value, Origin) -> Result<(), ManifestError>,
) -> Result<(), ManifestError> {
    if let Some(line) = yaml_flow_too_deep(text, limits.max_depth) {
        return Err(ManifestError::Limit {
            origin: origin_of(source, document_at_line(text, line)),
            limit: Limit::Depth,
            max: limits.max_depth as u64,
        });
    }
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let origin = origin_of(source, i + 1);
        if i >= limits.max_documents {
            return Err(ManifestError::Limit {
                origin,
                limit: Limit::Documents,
                max: limits.max_documents as u64,
            });
        }
        let ctx = Ctx::new(limits);
        let value = Node {
            ctx: &ctx,
            depth: 0,
        }
        .deserialize(doc)
        .map_err(|e| parse_error(&ctx, origin.clone(), "YAML", e.to_string()))?;
        f(value, origin)?;
    }
    Ok(())
}

/// The document number (from 1) that line `line` (from 1) falls in.
fn document_at_line(text: &str, line: usize) -> usize {
    1 + text
        .lines()
        .take(line.saturating_sub(1))
        .filter(|l| l.starts_with("---"))
        .count()
}

/// A linear pre-scan of YAML nesting: the line (from 1) where `[`/`{`
/// nesting, or a chain of `- ` block indicators on one line, passes `max`,
/// if it does. Brackets count inside flow
/// collections, and in block context only where a value starts; quoted
/// scalars and comments are skipped. It may count a bracket YAML would
/// read as text, never the reverse for input made of brackets.
fn yaml_flow_too_deep(text: &str, max: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut quote: Option<u8> = None;
    for (n, line) in text.split('\n').enumerate() {
        if quote.is_none() && (line.starts_with("---") || line.starts_with("...")) {
            depth = 0;
        }
        let bytes = line.as_bytes();
        if quote.is_none() && depth == 0 {
            // Block context: `- - - x` (or `? ? x`) opens one sequence (or
            // mapping) per indicator on a single line, a lower bound of the
            // nesting there. YAML's parser would load every one of them
            // before the depth check could run.
            let mut chain = 0usize;
            let mut rest = line.trim_start_matches(' ');
            while let Some(r) = rest
                .strip_prefix("- ")
                .or_else(|| rest.strip_prefix("-\t"))
                .or_else(|| rest.strip_prefix("? "))
            {
                chain += 1;
                if chain > max {
                    return Some(n + 1);
                }
                rest = r.trim_start_matches([' ', '\t']);
            }
        }
        let mut prev: Option<u8> = None;
        let mut i = 0;
        while i < bytes.len() {
            let c = bytes[i];
            match quote {
                Some(b'"') => {
                    if c == b'\\' {
                        i += 1;
                    } else if c == b'"' {
                        quote = None;
                    }
                }
                Some(_) => {
                    if c == b'\'' {
                        quote = None;
                    }
                }
                None => {
                    let value_start =
                        depth > 0 || matches!(prev, None | Some(b':' | b'-' | b'?' | b','));
                    match c {
                        b'#' if i == 0 || bytes[i - 1] == b' ' || bytes[i - 1] == b'\t' => break,
                        b'"' | b'\'' if value_start => quote = Some(c),
                        b'[' | b'{' if value_start => {
                            depth += 1;
                            if depth > max {
                                return Some(n + 1);
                            }
                        }
                        b']' | b'}' if depth > 0 => depth -= 1,
                        _ => {}
                    }
                }
            }
            if c != b' ' && c != b'\t' {
                prev = Some(c);
            }
            i += 1;
        }
        if depth == 0 && quote == Some(b'\'') {
            // A lone apostrophe in block text: not a quoted scalar.
            quote = None;
        }
    }
    None
}

/// A decode message in Kubernetes terms: no Rust type names, no JSON.
pub(crate) fn kubernetes_terms(message: &str) -> String {
    const TYPES: &[(&str, &str)] = &[
        ("ServicePortManifest", "a ServicePort object"),
        ("EndpointPortManifest", "an EndpointPort object"),
        ("EndpointManifest", "an Endpoint object"),
        ("EndpointHints", "an EndpointHints object"),
        ("HintName", "a hint object ({name: ...})"),
        ("Conditions", "an EndpointConditions object"),
        ("ObjectMeta", "an ObjectMeta object (metadata)"),
        ("ServiceSpec", "a ServiceSpec object"),
        ("SessionAffinityConfig", "a SessionAffinityConfig object"),
        ("ClientIpConfig", "a ClientIPConfig object"),
        ("ServiceManifest", "a Service object"),
        ("EndpointSliceManifest", "an EndpointSlice object"),
        ("EndpointsManifest", "an Endpoints object"),
        ("EndpointSubset", "an EndpointSubset object"),
        ("EndpointAddressManifest", "an EndpointAddress object"),
    ];
    let mut out = message.replace(
        "data did not match any variant of untagged enum IntOrString",
        "expected an integer or a string (IntOrString)",
    );
    for (ty, k8s) in TYPES {
        out = out.replace(&format!("struct {ty}"), k8s);
    }
    for int in ["i8", "i16", "i32", "i64", "u8", "u16", "u32", "u64"] {
        out = out.replace(&format!("expected {int}"), "expected an integer");
    }
    for (from, to) in [
        ("expected a sequence", "expected a list"),
        ("invalid type: sequence", "invalid type: list"),
        ("invalid type: map", "invalid type: object"),
        ("expected a map", "expected an object"),
        ("floating point", "number"),
        ("unit value", "null"),
        ("expected a borrowed string", "expected a string"),
        ("expected option", "expected a value"),
        ("JSON ", ""),
    ] {
        out = out.replace(from, to);
    }
    if let Some(rest) = out.strip_prefix("missing field `") {
        if let Some(name) = rest.strip_suffix('`') {
            out = format!("missing required field \"{name}\"");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(text: &str, limits: &InputLimits) -> Result<Vec<Value>, ManifestError> {
        let mut out = Vec::new();
        for_each_document(text, Some("t"), limits, None, |v, _| {
            out.push(v);
            Ok(())
        })?;
        Ok(out)
    }

    /// Found by the `manifest_parse` fuzz target: a JSON syntax error whose
    /// position falls inside a multi-byte character (here a BOM that is not
    /// at the start) made the YAML sniff slice mid-character and panic.
    #[test]
    fn a_json_error_inside_a_multibyte_character_is_an_error_not_a_panic() {
        let text = "\u{1}{\"kiitemkA\u{feff}";
        let l = InputLimits::default();
        let r = for_each_document(text, Some("t"), &l, Some(Format::Json), |_, _| Ok(()));
        assert!(r.is_err());
        for cut in ["{\"a\u{e9}", "{\"a\":\u{1F600}", "{\u{e9}"] {
            let r = for_each_document(cut, Some("t"), &l, Some(Format::Json), |_, _| Ok(()));
            assert!(r.is_err(), "{cut:?}");
        }
    }

    #[test]
    fn bom_duplicates_depth_and_numbers() {
        let l = InputLimits::default();
        assert_eq!(values("\u{feff}a: 1\n", &l).unwrap().len(), 1);
        assert_eq!(values("\u{feff}{\"a\": 1}", &l).unwrap().len(), 1);
        let err = values("metadata:\n  name: a\n  name: b\n", &l).unwrap_err();
        match &err {
            ManifestError::DuplicateKey { field, key, .. } => {
                assert_eq!((field.as_str(), key.as_str()), ("metadata", "name"));
            }
            other => panic!("{other:?}"),
        }
        assert!(err.to_string().contains("duplicate key \"name\""), "{err}");
        let err = values(r#"{"spec": {"ports": [{"port": 1, "port": 2}]}}"#, &l).unwrap_err();
        assert_eq!(err.field(), "spec.ports[0]");
        for deep in ["[".repeat(5000), "{\"a\":".repeat(5000), "- ".repeat(300)] {
            let err = values(&deep, &l).unwrap_err();
            assert!(
                matches!(
                    err,
                    ManifestError::Limit {
                        limit: Limit::Depth,
                        ..
                    }
                ),
                "{err:?}"
            );
        }
        let err = values("a: 99999999999999999999999\n", &l).unwrap_err();
        assert!(!err.to_string().contains("JSON"), "{err}");
        assert!(err.to_string().contains("64-bit"), "{err}");
    }

    #[test]
    fn yaml_flow_after_json_failure_only_when_it_shows_yaml() {
        let l = InputLimits::default();
        assert_eq!(values("{kind: Service, a: [1]}", &l).unwrap().len(), 1);
        let err = values("{\"kind\": \"Service\",", &l).unwrap_err();
        assert!(
            matches!(err, ManifestError::Syntax { format: "JSON", .. }),
            "{err}"
        );
        let err = values("[1, 2", &l).unwrap_err();
        assert!(
            matches!(err, ManifestError::Syntax { format: "JSON", .. }),
            "{err}"
        );
    }

    #[test]
    fn prescan_leaves_block_text_alone() {
        assert_eq!(yaml_flow_too_deep("a: x[[[[[\nb: 'it''s [[[['\n", 2), None);
        assert_eq!(yaml_flow_too_deep("a: [[[\n", 2), Some(1));
        assert_eq!(yaml_flow_too_deep("# [[[[[\na: {b: [c]}\n", 2), None);
        assert_eq!(yaml_flow_too_deep("- - x\n- - - y\n", 2), Some(2));
        assert_eq!(yaml_flow_too_deep("- - x\n  - - y\n", 2), None);
        assert_eq!(yaml_flow_too_deep("a: '- - - -'\n", 2), None);
    }

    #[test]
    fn documents_and_bytes_limits() {
        let l = InputLimits {
            max_documents: 2,
            max_bytes: 64,
            ..InputLimits::default()
        };
        let err = values("a: 1\n---\na: 2\n---\na: 3\n", &l).unwrap_err();
        assert!(matches!(
            err,
            ManifestError::Limit {
                limit: Limit::Documents,
                max: 2,
                ..
            }
        ));
        let err = values("{} {} {}", &l).unwrap_err();
        assert!(matches!(
            err,
            ManifestError::Limit {
                limit: Limit::Documents,
                ..
            }
        ));
        let err = values(&"a".repeat(65), &l).unwrap_err();
        assert!(matches!(
            err,
            ManifestError::Limit {
                limit: Limit::Bytes,
                max: 64,
                ..
            }
        ));
        assert!(err.to_string().contains("max-input-bytes"), "{err}");
    }

    #[test]
    fn read_capped_fails_fast_on_zeros_and_bad_utf8() {
        let zeros = std::io::repeat(0).take(1 << 30);
        let err = read_capped(zeros, Some("/dev/zero"), &InputLimits::default()).unwrap_err();
        assert!(
            matches!(err, ManifestError::NotText { offset: 0, .. }),
            "{err:?}"
        );
        let err = read_capped(&b"ab\xff"[..], None, &InputLimits::default()).unwrap_err();
        assert!(
            matches!(err, ManifestError::NotText { offset: 2, .. }),
            "{err:?}"
        );
        // A character split across reads is fine.
        let text = "é".repeat(100_000);
        assert_eq!(
            read_capped(text.as_bytes(), None, &InputLimits::default()).unwrap(),
            text
        );
    }
}
