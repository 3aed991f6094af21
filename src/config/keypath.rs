//! Where a configuration value sits and where it came from: key paths in the merged tree
//! (`buses[0].units[1].address`) and the file or variable that set each value. Shared by the
//! loader and the validation rules, so that neither reaches into the other.

use std::fmt;

use figment::value::Value;
use figment::{Figment, Source};

use super::ENV_PREFIX;

/// The source named for a value no file or variable set.
pub(super) const DEFAULT_SOURCE: &str = "default";

/// The source that set the value at `path`: its file or variable, or `default`.
pub(super) fn source_of(figment: &Figment, root: &Value, path: &KeyPath) -> String {
    get(root, &path.0).map_or_else(
        || DEFAULT_SOURCE.to_owned(),
        |value| source_name(figment, value),
    )
}

fn source_name(figment: &Figment, value: &Value) -> String {
    match figment
        .get_metadata(value.tag())
        .and_then(|md| md.source.as_ref())
    {
        Some(Source::Custom(name)) => name.clone(),
        Some(Source::File(path)) => path.display().to_string(),
        _ => DEFAULT_SOURCE.to_owned(),
    }
}

/// Where the values of the merged tree came from, for the validation rules.
pub(super) struct Origins<'a> {
    pub(super) figment: &'a Figment,
    pub(super) root: &'a Value,
    pub(super) main: &'a str,
}

impl Origins<'_> {
    /// The file or variable that set `path`, or `default`.
    pub(super) fn source(&self, path: &KeyPath) -> String {
        source_of(self.figment, self.root, path)
    }

    /// Whether some source set `path`.
    pub(super) fn is_set(&self, path: &KeyPath) -> bool {
        get(self.root, &path.0).is_some()
    }

    /// The main file, named for required keys that no source sets.
    pub(super) fn main(&self) -> &str {
        self.main
    }
}

/// A key path in the configuration tree, shown as `buses[0].units[1].address`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct KeyPath(pub(super) Vec<Seg>);

/// One step of a [`KeyPath`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Seg {
    Key(String),
    Index(usize),
}

impl KeyPath {
    pub(super) fn key(&self, key: &str) -> KeyPath {
        let mut path = self.clone();
        path.0.push(Seg::Key(key.to_owned()));
        path
    }

    pub(super) fn index(&self, index: usize) -> KeyPath {
        let mut path = self.clone();
        path.0.push(Seg::Index(index));
        path
    }

    /// A dotted path of plain keys (`cloud.tls.key_file`).
    pub(super) fn of(dotted: &str) -> KeyPath {
        KeyPath(dotted.split('.').map(|k| Seg::Key(k.to_owned())).collect())
    }

    /// The environment variable that sets this key, if one can (not inside an array).
    pub(super) fn env_var(&self) -> Option<String> {
        let keys: Option<Vec<String>> = self
            .0
            .iter()
            .map(|seg| match seg {
                Seg::Key(key) => Some(key.to_ascii_uppercase()),
                Seg::Index(_) => None,
            })
            .collect();
        keys.map(|keys| format!("{ENV_PREFIX}{}", keys.join("__")))
    }

    /// Whether one of the two paths lies within the other (or they are equal).
    pub(super) fn overlaps(&self, other: &KeyPath) -> bool {
        self.0.iter().zip(&other.0).all(|(a, b)| a == b)
    }

    /// figment's error path (array indices as strings) with arrays recognised from the tree.
    pub(super) fn from_figment(root: &Value, keys: &[String]) -> KeyPath {
        let mut path = KeyPath::default();
        let mut at = Some(root);
        for key in keys {
            let seg = match (at, key.parse::<usize>()) {
                (Some(Value::Array(..)), Ok(index)) => Seg::Index(index),
                _ => Seg::Key(key.clone()),
            };
            at = at.and_then(|value| child(value, &seg));
            path.0.push(seg);
        }
        path
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Index(index) => write!(f, "[{index}]")?,
                Seg::Key(key) => {
                    if i > 0 {
                        f.write_str(".")?;
                    }
                    if !key.is_empty()
                        && key
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                    {
                        f.write_str(key)?;
                    } else {
                        write!(f, "{key:?}")?;
                    }
                }
            }
        }
        Ok(())
    }
}

pub(super) fn child<'a>(value: &'a Value, seg: &Seg) -> Option<&'a Value> {
    match (seg, value) {
        (Seg::Key(key), Value::Dict(_, dict)) => dict.get(key),
        (Seg::Index(index), Value::Array(_, items)) => items.get(*index),
        _ => None,
    }
}

pub(super) fn get<'a>(root: &'a Value, path: &[Seg]) -> Option<&'a Value> {
    path.iter().try_fold(root, |value, seg| child(value, seg))
}

pub(super) fn get_mut<'a>(root: &'a mut Value, path: &[Seg]) -> Option<&'a mut Value> {
    path.iter().try_fold(root, |value, seg| match (seg, value) {
        (Seg::Key(key), Value::Dict(_, dict)) => dict.get_mut(key),
        (Seg::Index(index), Value::Array(_, items)) => items.get_mut(*index),
        _ => None,
    })
}
