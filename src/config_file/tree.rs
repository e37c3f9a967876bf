//! From text to typed sections: parsing, `"off"`, unknown keys, and error
//! messages that name the key path.

use std::{collections::HashSet, path::Path};

use serde::{Deserialize, Serialize, de::DeserializeOwned};
// YAML: `serde_yaml` is deprecated and unmaintained, and `serde_yml` was
// withdrawn as unsound (RUSTSEC-2025-0068); `serde_yaml_ng` is the maintained
// continuation of `serde_yaml` 0.9, with the same API and parser.
use serde_yaml_ng::{Mapping, Value};

use super::{ConfigError, Format, OFF, invalid};
use crate::backend::tcp::TcpOptions;

/// The key of the TCP back-end's options inside `transport`.
const TCP: &str = "tcp";

/// The sections of a file, `transport.tcp` apart from the rest of `transport`.
pub(super) struct Sections<T, A> {
    pub(super) transport: T,
    pub(super) tcp: TcpOptions,
    pub(super) auth: A,
}

/// The layout of a file; checks and paths are applied after deserializing.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Document<T, A> {
    #[serde(default)]
    transport: T,
    auth: A,
}

/// `transport.tcp` alone, so that its errors keep their key path.
#[derive(Deserialize)]
struct TcpDocument {
    transport: TcpSection,
}

#[derive(Deserialize)]
struct TcpSection {
    tcp: TcpOptions,
}

pub(super) fn read_text(path: &Path) -> Result<(String, Format), ConfigError> {
    let format = Format::from_path(path).ok_or_else(|| ConfigError::UnknownFormat {
        path: path.to_owned(),
    })?;
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    Ok((text, format))
}

fn to_value<T: Serialize>(value: &T) -> Value {
    serde_yaml_ng::to_value(value).expect("settings serialize to a YAML value")
}

/// The keys `transport` accepts, with their defaults' shape: those of `T`
/// (only the names are used: a client's default id is a fresh UUID) and `tcp`.
fn transport_keys<T: Serialize + Default>() -> Value {
    let mut keys = to_value(&T::default());
    if let Value::Mapping(map) = &mut keys {
        map.insert(TCP.into(), to_value(&TcpOptions::default()));
    }
    keys
}

/// Parses `text` into a tree, then deserializes the sections from it with
/// key paths.
///
/// Going through a tree lets `"off"` stand for null in TOML, and lets
/// unknown keys be refused in sections whose struct accepts them (`tcp`):
/// `transport` is compared against its defaults, serialized.
pub(super) fn deserialize<T, A>(
    text: &str,
    format: Format,
    path: &Path,
) -> Result<Sections<T, A>, ConfigError>
where
    T: Serialize + Default + DeserializeOwned,
    A: DeserializeOwned,
{
    let mut tree = parse(text, format, path)?;
    let mut turned_off = HashSet::new();
    let mut tcp = None;
    if let Some(transport) = tree.get_mut("transport") {
        let mut at = vec!["transport".to_owned()];
        turn_off(transport, &mut at, &mut turned_off);
        check_known_keys(transport, &transport_keys::<T>(), &mut at)
            .map_err(|(field, message)| invalid(path, &field, &message))?;
        // The back-end's options are not part of `T`: read on their own.
        if let Value::Mapping(section) = transport {
            tcp = section.shift_remove(TCP);
        }
    }
    let document: Document<T, A> = from_tree(&tree, path, &turned_off)?;
    let tcp = match tcp {
        None => TcpOptions::default(),
        Some(tcp) => {
            let mut section = Mapping::new();
            section.insert(TCP.into(), tcp);
            let mut tree = Mapping::new();
            tree.insert("transport".into(), Value::Mapping(section));
            let tcp: TcpDocument = from_tree(&Value::Mapping(tree), path, &turned_off)?;
            tcp.transport.tcp
        }
    };
    Ok(Sections {
        transport: document.transport,
        tcp,
        auth: document.auth,
    })
}

/// The document's tree; an empty document is an empty mapping.
fn parse(text: &str, format: Format, path: &Path) -> Result<Value, ConfigError> {
    let syntax = |line, column, message| ConfigError::Syntax {
        path: path.to_owned(),
        format,
        line,
        column,
        message,
    };
    let tree: Value = match format {
        Format::Toml => toml::from_str(text).map_err(|err| {
            // The message is built here: toml's own quotes the offending
            // line, which may hold a private key.
            let (line, column) = err.span().map(|span| line_column(text, span.start)).unzip();
            let mut message = err.message().trim_end().to_owned();
            if let (Some(line), Some(column)) = (line, column) {
                message.push_str(&format!(" at line {line} column {column}"));
            }
            syntax(line, column, message)
        })?,
        Format::Yaml => {
            let mut tree: Value = serde_yaml_ng::from_str(text).map_err(|err| {
                let location = err.location();
                syntax(
                    location.as_ref().map(|l| l.line()),
                    location.as_ref().map(|l| l.column()),
                    err.to_string(),
                )
            })?;
            tree.apply_merge()
                .map_err(|err| syntax(None, None, err.to_string()))?;
            tree
        }
    };
    Ok(match tree {
        Value::Null => Value::Mapping(Mapping::new()),
        tree => tree,
    })
}

/// Deserializes `T` from `tree`, naming the key path in errors.
fn from_tree<T: DeserializeOwned>(
    tree: &Value,
    path: &Path,
    turned_off: &HashSet<String>,
) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(tree).map_err(|err| {
        let mut field = err.path().to_string();
        let message = explain(tree, err.path(), &field, turned_off, err.inner());
        // The path names the unknown or missing key itself.
        if let Some(key) = ["unknown field `", "missing field `"]
            .iter()
            .find_map(|prefix| message.strip_prefix(prefix))
            .and_then(|rest| rest.split_once('`'))
            .map(|(key, _)| key)
            && field.rsplit('.').next() != Some(key)
        {
            field = match field.as_str() {
                "." => key.to_owned(),
                parent => format!("{parent}.{key}"),
            };
        }
        invalid(path, &field, &message)
    })
}

/// 1-based line and column of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Replaces every `"off"` string under `value` by null, recording where.
fn turn_off(value: &mut Value, at: &mut Vec<String>, turned_off: &mut HashSet<String>) {
    match value {
        Value::String(text) if text == OFF => {
            *value = Value::Null;
            turned_off.insert(at.join("."));
        }
        Value::Mapping(map) => {
            for (key, child) in map.iter_mut() {
                at.push(key_name(key));
                turn_off(child, at, turned_off);
                at.pop();
            }
        }
        _ => {}
    }
}

/// Refuses keys of `value`'s mappings that `reference` lacks, where
/// `reference` has a mapping.
fn check_known_keys(
    value: &Value,
    reference: &Value,
    at: &mut Vec<String>,
) -> Result<(), (String, String)> {
    let (Value::Mapping(map), Value::Mapping(known)) = (value, reference) else {
        return Ok(());
    };
    for (key, child) in map {
        at.push(key_name(key));
        let Some(expected) = known.get(key) else {
            let names: Vec<String> = known.keys().map(|k| format!("`{}`", key_name(k))).collect();
            return Err((
                at.join("."),
                format!(
                    "unknown field `{}`, expected one of {}",
                    key_name(key),
                    names.join(", ")
                ),
            ));
        };
        check_known_keys(child, expected, at)?;
        at.pop();
    }
    Ok(())
}

fn key_name(key: &Value) -> String {
    match key {
        Value::String(text) => text.clone(),
        other => serde_yaml_ng::to_string(other)
            .map(|text| text.trim_end().to_owned())
            .unwrap_or_default(),
    }
}

/// The deserializer's message, made specific where it is vague.
fn explain(
    tree: &Value,
    at: &serde_path_to_error::Path,
    field: &str,
    turned_off: &HashSet<String>,
    err: &serde_yaml_ng::Error,
) -> String {
    let message = err.to_string();
    if turned_off.contains(field) {
        return format!("\"{OFF}\" turns off optional settings only; this one needs a value");
    }
    if message.ends_with("expected a duration") {
        let raw = at.iter().try_fold(tree, |value, segment| match segment {
            serde_path_to_error::Segment::Map { key } => value.get(key.as_str()),
            serde_path_to_error::Segment::Seq { index } => value.get(*index),
            _ => None,
        });
        return match raw {
            Some(Value::String(text)) => {
                let reason = humantime_serde::re::humantime::parse_duration(text)
                    .err()
                    .map_or(String::new(), |err| format!(": {err}"));
                format!("invalid duration {text:?}{reason}")
            }
            _ => format!("{message} (a string such as \"30s\", \"500ms\" or \"1m 30s\")"),
        };
    }
    message
}
