//! Reading the sources, merging them, and reading the typed configuration without stopping at
//! the first problem.
//!
//! 1. Each file is read and parsed on its own, so a missing or broken file is named. A source
//!    that cannot be read or parsed stops loading there (its keys are unknown, so checking the
//!    rest would report misleading "required" problems), after all such sources are reported.
//! 2. Environment variables become one layer each, typed by the schema: a variable for a
//!    string key stays a string (`DOORBRIDGE_CLOUD__PASSWORD=007` is `"007"`), others are
//!    parsed as figment values (`42`, `true`, `["a", "b"]`).
//! 3. figment merges the layers (later wins; tables merge key by key, arrays are replaced
//!    whole) and tags every value with its layer, which names the file or variable later.
//! 4. The merged tree is compared with the schema, the tree of a fully populated example
//!    `Config`: a key the schema lacks is unknown; a table where the schema has none (or the
//!    reverse) is the wrong shape. Arrays are compared element by element with the schema's
//!    one element.
//! 5. serde reads the typed `Config`. On an error, the problem is recorded with the error's key
//!    path, the bad value is taken out of the tree (its field falls back to its default) and
//!    reading starts again, a bounded number of times.
//! 6. `validate` checks the rules between values on the typed result.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use figment::error::{Actual, Kind};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider, Source};

use super::keypath::{DEFAULT_SOURCE, KeyPath, Origins, Seg, get_mut, source_of};
use super::values::{BrokerUrl, BrokerUrls, Secret, TrustedKey};
use super::{
    BusConfig, Config, ConfigErrors, DEFAULT_FILE, ENV_PREFIX, Problem, Sources, TlsConfig,
    UnitConfig, validate,
};

/// The most bad values read before giving up (each one costs a read of the whole tree).
const MAX_TYPE_ERRORS: usize = 100;

/// The key of the one-entry table the toml crate represents a date-time with.
const TOML_DATETIME: &str = "$__toml_private_datetime";

/// Variables with [`ENV_PREFIX`] that are not configuration keys.
const NOT_KEYS: [&str; 2] = [super::LOG_ENV, super::CONFIG_ENV];

pub(super) fn load(sources: &Sources) -> Result<(Config, Vec<String>), ConfigErrors> {
    let schema = schema()?;
    let mut layers = Vec::new();
    let mut problems = Vec::new();

    let main = sources.file.display().to_string();
    match read_file(&sources.file) {
        Ok(dict) => layers.push(Layer::new(main.clone(), dict)),
        Err(message) => {
            let message = if sources.file == Path::new(DEFAULT_FILE) {
                format!(
                    "{message} (the default configuration file; name another with --config \
                     PATH or {})",
                    super::CONFIG_ENV
                )
            } else {
                message
            };
            problems.push(file_problem(&sources.file, message));
        }
    }
    match dropin_files(&sources.dropin_dir) {
        Ok(files) => {
            for path in files {
                match read_file(&path) {
                    Ok(dict) => layers.push(Layer::new(path.display().to_string(), dict)),
                    Err(message) => problems.push(file_problem(&path, message)),
                }
            }
        }
        Err(message) => problems.push(file_problem(&sources.dropin_dir, message)),
    }
    if sources.env {
        let (env_layers, env_problems) = env_layers(std::env::vars_os(), &schema);
        layers.extend(env_layers);
        problems.extend(env_problems);
    }
    if !problems.is_empty() {
        return Err(ConfigErrors { problems });
    }
    let names = layers.iter().map(|layer| layer.name.clone()).collect();
    resolve(&layers, &schema, &main).map(|config| (config, names))
}

pub(super) fn load_str(text: &str, source: &str) -> Result<Config, ConfigErrors> {
    let schema = schema()?;
    let dict = parse_toml(text).map_err(|message| ConfigErrors {
        problems: vec![Problem {
            key: String::new(),
            source: source.to_owned(),
            message,
        }],
    })?;
    resolve(&[Layer::new(source.to_owned(), dict)], &schema, source)
}

/// Whether `sources` set no configuration key at all: the main file and every drop-in can be
/// read and parsed and hold nothing but tables without values, and no variable of `vars` is a
/// `DOORBRIDGE_*` key (when `sources.env`). Anything else counts as set, even a file that
/// cannot be read: loading then says what is wrong with it.
pub(super) fn sets_no_key(
    sources: &Sources,
    mut vars: impl Iterator<Item = (OsString, OsString)>,
) -> bool {
    fn holds_no_value(value: &Value) -> bool {
        match value {
            Value::Dict(_, dict) => dict.values().all(holds_no_value),
            _ => false,
        }
    }
    let empty = |path: &Path| read_file(path).is_ok_and(|dict| dict.values().all(holds_no_value));
    empty(&sources.file)
        && dropin_files(&sources.dropin_dir).is_ok_and(|files| files.iter().all(|f| empty(f)))
        && !(sources.env
            && vars.any(|(name, _)| {
                let name = name.to_string_lossy();
                name.starts_with(ENV_PREFIX) && !NOT_KEYS.contains(&name.as_ref())
            }))
}

/// Merges `layers` and reads, checks and validates the result. `main` is named as the place
/// for a required key that no layer sets.
fn resolve(layers: &[Layer], schema: &Value, main: &str) -> Result<Config, ConfigErrors> {
    let figment = layers.iter().fold(Figment::new(), |figment, layer| {
        figment.merge(layer.clone())
    });
    let mut root = match figment.data() {
        Ok(mut profiles) => Value::from(profiles.remove(&Profile::Default).unwrap_or_default()),
        Err(error) => {
            return Err(ConfigErrors {
                problems: vec![Problem {
                    key: String::new(),
                    source: main.to_owned(),
                    message: error.to_string(),
                }],
            });
        }
    };

    let mut problems = Vec::new();
    // Keys whose value was rejected while reading: later rules about them would only repeat it.
    let mut rejected: Vec<KeyPath> = Vec::new();

    let mut misshapen = Vec::new();
    check_shape(&root, schema, &KeyPath::default(), &mut misshapen);
    for (path, message) in misshapen {
        let problem = Problem {
            key: path.to_string(),
            source: source_of(&figment, &root, &path),
            message,
        };
        problems.push((path.clone(), problem));
        neutralize(&mut root, schema, &path);
        rejected.push(path);
    }

    let config = read_typed(&figment, &mut root, schema, &mut problems, &mut rejected);

    if let Some(config) = &config {
        let origins = Origins {
            figment: &figment,
            root: &root,
            main,
        };
        let mut checker = validate::Checker::new(&origins, &rejected);
        checker.check(config);
        problems.extend(checker.into_problems());
    }

    if let (Some(config), true) = (config, problems.is_empty()) {
        return Ok(config);
    }
    // In the order of the keys as declared, so the list reads like the file.
    let order = Order::of_schema();
    problems.sort_by_cached_key(|(path, _)| order.rank(path));
    Err(ConfigErrors {
        problems: problems.into_iter().map(|(_, problem)| problem).collect(),
    })
}

/// The declared order of the configuration's keys (serde's field order), for sorting.
#[derive(Default)]
struct Order(Vec<(String, Order)>);

impl Order {
    fn of_schema() -> Order {
        ciborium::Value::serialized(&schema_example())
            .map_or_else(|_| Order::default(), |v| Order::of(&v))
    }

    fn of(value: &ciborium::Value) -> Order {
        match value {
            ciborium::Value::Map(entries) => Order(
                entries
                    .iter()
                    .filter_map(|(k, v)| Some((k.as_text()?.to_owned(), Order::of(v))))
                    .collect(),
            ),
            // Arrays are transparent: an index ranks by itself at the element's level.
            ciborium::Value::Array(items) => items.first().map_or_else(Order::default, Order::of),
            _ => Order::default(),
        }
    }

    /// Sorts known keys in declared order, unknown keys after them by name, indices by number.
    fn rank(&self, path: &KeyPath) -> Vec<(usize, usize, String)> {
        let empty = Order::default();
        let mut at = self;
        let mut rank = Vec::new();
        for seg in &path.0 {
            match seg {
                Seg::Index(index) => rank.push((0, *index, String::new())),
                Seg::Key(key) => {
                    if let Some(position) = at.0.iter().position(|(name, _)| name == key) {
                        rank.push((0, position, String::new()));
                        at = &at.0[position].1;
                    } else {
                        rank.push((1, 0, key.clone()));
                        at = &empty;
                    }
                }
            }
        }
        rank
    }
}

/// Reads the typed configuration, taking out each value serde rejects until it succeeds.
fn read_typed(
    figment: &Figment,
    root: &mut Value,
    schema: &Value,
    problems: &mut Vec<(KeyPath, Problem)>,
    rejected: &mut Vec<KeyPath>,
) -> Option<Config> {
    for _ in 0..MAX_TYPE_ERRORS {
        let error = match root.deserialize::<Config>() {
            Ok(config) => return Some(config),
            Err(error) => error,
        };
        let path = KeyPath::from_figment(root, &error.path);
        if rejected.contains(&path) {
            // Taking the value out did not help (it always should): stop rather than repeat.
            return None;
        }
        let problem = Problem {
            key: path.to_string(),
            source: source_of(figment, root, &path),
            message: describe(&error.kind),
        };
        problems.push((path.clone(), problem));
        if !neutralize(root, schema, &path) {
            return None;
        }
        rejected.push(path);
    }
    let problem = Problem {
        key: String::new(),
        source: DEFAULT_SOURCE.to_owned(),
        message: format!("more than {MAX_TYPE_ERRORS} bad values; stopped reading"),
    };
    problems.push((KeyPath::default(), problem));
    None
}

/// Takes the value at `path` out of the tree so that reading can go on: a key is removed (its
/// field gets its default); an array element, whose removal would renumber the rest, is
/// replaced by an empty table or, for arrays of plain values, by the schema's example value.
fn neutralize(root: &mut Value, schema: &Value, path: &KeyPath) -> bool {
    let Some((last, parent)) = path.0.split_last() else {
        return false;
    };
    let Some(container) = get_mut(root, parent) else {
        return false;
    };
    match (last, container) {
        (Seg::Key(key), Value::Dict(_, dict)) => dict.remove(key).is_some(),
        (Seg::Index(index), Value::Array(tag, items)) => {
            let tag = *tag;
            let Some(item) = items.get_mut(*index) else {
                return false;
            };
            *item = match schema_at(schema, &path.0) {
                Some(Value::Dict(..)) | None => Value::Dict(tag, Dict::new()),
                Some(example) => example.clone(),
            };
            true
        }
        _ => false,
    }
}

/// A serde error in words an operator can act on.
fn describe(kind: &Kind) -> String {
    match kind {
        Kind::Message(message) => message.clone(),
        Kind::InvalidType(actual, expected) | Kind::InvalidValue(actual, expected) => format!(
            "expected {}, found {}",
            expected_text(expected),
            actual_text(actual)
        ),
        Kind::InvalidLength(len, expected) => {
            format!("expected {}, found {len} items", expected_text(expected))
        }
        Kind::UnknownVariant(found, expected) => format!(
            "unknown value `{found}`: expected {}",
            one_of(expected.iter().copied())
        ),
        other => other.to_string(),
    }
}

fn one_of<'a>(options: impl Iterator<Item = &'a str>) -> String {
    let quoted: Vec<String> = options.map(|o| format!("`{o}`")).collect();
    match quoted.as_slice() {
        [] => "nothing".to_owned(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

fn expected_text(expected: &str) -> String {
    let text = match expected {
        "a boolean" => "true or false",
        "a sequence" => "an array",
        "u8" => "an integer from 0 to 255",
        "u16" => "an integer from 0 to 65535",
        "u32" => "an integer from 0 to 4294967295",
        "u64" => "a non-negative integer",
        "a string" => "a string (in quotes)",
        other if other.starts_with("struct ") => "a table",
        other => other,
    };
    text.to_owned()
}

fn actual_text(actual: &Actual) -> String {
    match actual {
        Actual::Bool(b) => format!("`{b}`"),
        Actual::Unsigned(n) => format!("the number {n}"),
        Actual::Signed(n) => format!("the number {n}"),
        Actual::Float(n) => format!("the number {n}"),
        Actual::Char(c) => format!("{c:?}"),
        Actual::Str(s) => format!("the string {s:?}"),
        Actual::Seq => "an array".to_owned(),
        Actual::Map => "a table".to_owned(),
        other => other.to_string(),
    }
}

/// Compares the merged tree with the schema: unknown keys, and tables or arrays where the
/// schema has something else (serde would quietly read a table from an array). Pushes
/// `(path, message)`; each such value is to be taken out before reading.
fn check_shape(value: &Value, schema: &Value, path: &KeyPath, out: &mut Vec<(KeyPath, String)>) {
    match (value, schema) {
        (Value::Dict(_, dict), Value::Dict(_, known)) => {
            for (key, child) in dict {
                let child_path = path.key(key);
                if let Some(child_schema) = known.get(key) {
                    check_shape(child, child_schema, &child_path, out);
                } else {
                    let message = unknown_key_message(key, known, &schema_root_paths(key));
                    out.push((child_path, message));
                }
            }
        }
        (Value::Array(_, items), Value::Array(_, example)) => {
            if let Some(example) = example.first() {
                for (index, item) in items.iter().enumerate() {
                    check_shape(item, example, &path.index(index), out);
                }
            }
        }
        // `cloud.url` takes one URL as well as a list of them.
        (Value::String(..), Value::Array(..)) if *path == KeyPath::of("cloud.url") => {}
        (Value::Dict(..) | Value::Array(..), _) | (_, Value::Dict(..) | Value::Array(..)) => {
            let message = format!("expected {}, found {}", shape(schema), shape(value));
            out.push((path.clone(), message));
        }
        _ => {}
    }
}

fn shape(value: &Value) -> &'static str {
    match value {
        // How the toml crate hands a date-time to serde.
        Value::Dict(_, dict) if dict.len() == 1 && dict.contains_key(TOML_DATETIME) => {
            "a date-time"
        }
        Value::Dict(..) => "a table",
        Value::Array(..) => "an array",
        Value::String(..) | Value::Char(..) => "a string",
        Value::Num(..) => "a number",
        Value::Bool(..) => "true or false",
        Value::Empty(..) => "nothing",
    }
}

fn unknown_key_message(key: &str, siblings: &Dict, elsewhere: &[String]) -> String {
    let close = siblings
        .keys()
        .filter(|known| is_close(key, known))
        .min_by_key(|known| edit_distance(key, known));
    if let Some(known) = close {
        return format!("unknown key (did you mean `{known}`?)");
    }
    match elsewhere {
        [] => "unknown key".to_owned(),
        [path] => format!("unknown key here (the known key of that name is `{path}`)"),
        paths => format!(
            "unknown key here (the known keys of that name are {})",
            one_of(paths.iter().map(String::as_str))
        ),
    }
}

/// Whether an unknown key looks like a typo of `known`.
fn is_close(key: &str, known: &str) -> bool {
    let normal = |s: &str| s.to_ascii_lowercase().replace('-', "_");
    normal(key) == normal(known) || edit_distance(key, known) <= 2.min(known.len() / 3).max(1)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let cost = usize::from(ca != cb);
            let next = (row[j + 1] + 1).min(row[j] + 1).min(prev + cost);
            prev = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

/// Where a key named `name` is known in the schema, as paths such as `cloud.trusted_keys` or
/// `buses[].units[].door`.
fn schema_root_paths(name: &str) -> Vec<String> {
    fn walk(value: &Value, prefix: &str, name: &str, out: &mut Vec<String>) {
        match value {
            Value::Dict(_, dict) => {
                for (key, child) in dict {
                    let path = if prefix.is_empty() {
                        key.clone()
                    } else {
                        format!("{prefix}.{key}")
                    };
                    if key == name {
                        out.push(path.clone());
                    }
                    walk(child, &path, name, out);
                }
            }
            Value::Array(_, items) => {
                if let Some(first) = items.first() {
                    walk(first, &format!("{prefix}[]"), name, out);
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    if let Ok(schema) = schema() {
        walk(&schema, "", name, &mut out);
    }
    out
}

/// The schema: a `Config` with every optional value present and every array holding one
/// element, as a figment value tree.
fn schema() -> Result<Value, ConfigErrors> {
    Value::serialize(schema_example()).map_err(|error| ConfigErrors {
        problems: vec![Problem {
            key: String::new(),
            source: DEFAULT_SOURCE.to_owned(),
            message: format!("internal error: cannot build the configuration schema: {error}"),
        }],
    })
}

fn schema_example() -> Config {
    let mut config = Config::default();
    config.site.name = Some(String::new());
    // An array, so that a list is the schema's shape (one URL alone is allowed too).
    config.cloud.url = BrokerUrls::try_from(vec![
        BrokerUrl::default(),
        "mqtt://localhost".parse().unwrap_or_default(),
    ])
    .unwrap_or_default();
    config.cloud.username = Some(String::new());
    config.cloud.password = Some(Secret::default());
    config.cloud.trusted_keys = vec![TrustedKey([0; 32])];
    config.telemetry.metrics_file = Some(PathBuf::new());
    config.cloud.tls = TlsConfig {
        ca_file: Some(PathBuf::new()),
        cert_file: Some(PathBuf::new()),
        key_file: Some(PathBuf::new()),
    };
    config.buses = vec![BusConfig {
        name: Some(String::new()),
        port: PathBuf::from("/dev/null"),
        units: vec![UnitConfig {
            address: 1,
            door: "example".into(),
            name: Some(String::new()),
            inner: false,
            behind: vec!["example".into()],
            osdp: Some(super::OsdpReaderConfig {
                key_file: Some(PathBuf::new()),
                door_contact: Some(0),
                floors: vec![super::FloorOutput::default()],
                ..super::OsdpReaderConfig::default()
            }),
        }],
        ..BusConfig::default()
    }];
    config
}

/// The example value the schema holds at `path`, following arrays through their one element.
fn schema_at<'a>(schema: &'a Value, path: &[Seg]) -> Option<&'a Value> {
    path.iter()
        .try_fold(schema, |value, seg| match (seg, value) {
            (Seg::Key(key), Value::Dict(_, dict)) => dict.get(key),
            (Seg::Index(_), Value::Array(_, items)) => items.first(),
            _ => None,
        })
}

/// One source's keys, as a figment provider whose metadata names the source.
#[derive(Clone)]
struct Layer {
    name: String,
    dict: Dict,
}

impl Layer {
    fn new(name: String, dict: Dict) -> Self {
        Layer { name, dict }
    }
}

impl Provider for Layer {
    fn metadata(&self) -> Metadata {
        Metadata::named("doorbridge configuration source").source(Source::Custom(self.name.clone()))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.dict.clone()))
    }
}

fn file_problem(path: &Path, message: String) -> Problem {
    Problem {
        key: String::new(),
        source: path.display().to_string(),
        message,
    }
}

fn read_file(path: &Path) -> Result<Dict, String> {
    let text = fs::read_to_string(path).map_err(|error| match error.kind() {
        io::ErrorKind::NotFound => "configuration file not found".to_owned(),
        _ => format!("cannot read the configuration file: {error}"),
    })?;
    parse_toml(&text)
}

fn parse_toml(text: &str) -> Result<Dict, String> {
    use figment::providers::{Format, Toml};

    match Toml::string(text).data() {
        Ok(mut profiles) => Ok(profiles.remove(&Profile::Default).unwrap_or_default()),
        Err(error) => Err(format!(
            "not valid TOML: {}",
            condense_toml_error(&error.to_string())
        )),
    }
}

/// The toml crate's message spans lines with a source excerpt; keep the position and the
/// explanation on one line: ``line 2, column 2: invalid array, expected `]` ``.
fn condense_toml_error(message: &str) -> String {
    let mut lines = message
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty());
    let first = lines.next().unwrap_or_default();
    let position = first.strip_prefix("TOML parse error at ").unwrap_or(first);
    let explanation: Vec<&str> = lines
        .filter(|line| {
            let rest = line.trim_start_matches(|c: char| c.is_ascii_digit() || c == ' ');
            !rest.starts_with('|')
        })
        .collect();
    if explanation.is_empty() {
        position.to_owned()
    } else {
        format!("{position}: {}", explanation.join(", "))
    }
}

/// The `*.toml` files in `dir`, sorted by name; none when `dir` does not exist. Hidden files
/// (editor leftovers such as `.#x.toml`) and directories are skipped.
fn dropin_files(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(format!("cannot list the drop-in directory: {error}")),
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|error| format!("cannot list the drop-in directory: {error}"))?;
        let name = entry.file_name();
        let name_text = name.to_string_lossy();
        if name_text.starts_with('.') || !name_text.ends_with(".toml") || entry.path().is_dir() {
            continue;
        }
        files.push((name, entry.path()));
    }
    files.sort();
    Ok(files.into_iter().map(|(_, path)| path).collect())
}

/// One layer per `DOORBRIDGE_*` variable, sorted by name, typed by the schema.
fn env_layers(
    vars: impl Iterator<Item = (OsString, OsString)>,
    schema: &Value,
) -> (Vec<Layer>, Vec<Problem>) {
    let mut layers = Vec::new();
    let mut problems = Vec::new();
    let mut vars: Vec<(OsString, OsString)> = vars
        .filter(|(name, _)| name.to_string_lossy().starts_with(ENV_PREFIX))
        .collect();
    vars.sort();
    for (name, value) in vars {
        let name = name.to_string_lossy().into_owned();
        if NOT_KEYS.contains(&name.as_str()) {
            continue;
        }
        let problem = |message: String| Problem {
            key: String::new(),
            source: name.clone(),
            message,
        };
        let keys: Vec<String> = name[ENV_PREFIX.len()..]
            .split("__")
            .map(str::to_ascii_lowercase)
            .collect();
        let valid_key =
            |k: &String| !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !keys.iter().all(valid_key) {
            problems.push(problem(format!(
                "not a configuration variable: expected {ENV_PREFIX}<SECTION>__<KEY>, with `__` \
                 between nested keys (e.g. {ENV_PREFIX}STORAGE__PATH)"
            )));
            continue;
        }
        let Some(raw) = value.to_str() else {
            problems.push(problem("the value is not valid UTF-8".to_owned()));
            continue;
        };
        let path: Vec<Seg> = keys.iter().cloned().map(Seg::Key).collect();
        let value = match schema_at(schema, &path) {
            Some(Value::String(..)) => Value::from(raw.to_owned()),
            _ => raw.parse().unwrap_or_else(|_| Value::from(raw.to_owned())),
        };
        let nested = keys.iter().rev().fold(value, |inner, key| {
            Value::from(Dict::from([(key.clone(), inner)]))
        });
        if let Value::Dict(_, dict) = nested {
            layers.push(Layer::new(name.clone(), dict));
        }
    }
    (layers, problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The package's /etc/doorbridge/doorbridge.toml is unconfigured until any source sets
    /// any key; a source that cannot be read or parsed is not passed over as unconfigured.
    #[test]
    fn only_a_configuration_that_sets_no_key_is_unconfigured() {
        let shipped = include_str!("../../packaging/doorbridge.toml");
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("doorbridge.toml");
        fs::write(&main, shipped).unwrap();
        let sources = Sources::new(Some(&main));
        let vars = |names: &[&str]| -> Vec<(OsString, OsString)> {
            names.iter().map(|n| (n.into(), "x".into())).collect()
        };
        let unconfigured =
            |vars: Vec<(OsString, OsString)>| sets_no_key(&sources, vars.into_iter());

        // As shipped: refused by load (naming the missing gateway.id), and unconfigured,
        // also with the variables that are not keys, and with a config.d of empty tables,
        // notes and editor leftovers.
        let mut quiet = sources.clone();
        quiet.env = false;
        let errors = load(&quiet).unwrap_err();
        assert!(
            errors.problems.iter().any(|p| p.key == "gateway.id"),
            "{errors}"
        );
        assert!(unconfigured(vars(&[])));
        assert!(unconfigured(vars(&[
            "DOORBRIDGE_LOG",
            "DOORBRIDGE_CONFIG",
            "PATH"
        ])));
        fs::create_dir(&sources.dropin_dir).unwrap();
        fs::write(sources.dropin_dir.join("README"), "gateway.id = 1").unwrap();
        fs::write(sources.dropin_dir.join(".10-x.toml"), "not toml =").unwrap();
        fs::write(
            sources.dropin_dir.join("10-empty.toml"),
            "[gateway]\n[cloud.tls]\n",
        )
        .unwrap();
        assert!(unconfigured(vars(&[])));

        // Any key set by any source: configured (load then judges the rest).
        assert!(!unconfigured(vars(&["DOORBRIDGE_CLOUD__PASSWORD"])));
        assert!(!unconfigured(vars(&["DOORBRIDGE_NOT_A_KEY"])));
        assert!(sets_no_key(
            &quiet,
            vars(&["DOORBRIDGE_CLOUD__PASSWORD"]).into_iter()
        ));
        fs::write(
            sources.dropin_dir.join("20-log.toml"),
            "[log]\nlevel = \"debug\"",
        )
        .unwrap();
        assert!(!unconfigured(vars(&[])));
        fs::remove_file(sources.dropin_dir.join("20-log.toml")).unwrap();
        fs::write(&main, shipped.replace("# id = ", "id = ")).unwrap();
        assert!(!unconfigured(vars(&[])));
        fs::write(&main, format!("{shipped}\nbuses = []\n")).unwrap();
        assert!(!unconfigured(vars(&[])));

        // Broken sources are not unconfigured: a syntax error, a missing main file.
        fs::write(&main, format!("{shipped}\n[gateway\n")).unwrap();
        assert!(!unconfigured(vars(&[])));
        fs::write(&main, shipped).unwrap();
        fs::write(sources.dropin_dir.join("30-bad.toml"), "[site\n").unwrap();
        assert!(!unconfigured(vars(&[])));
        fs::remove_file(sources.dropin_dir.join("30-bad.toml")).unwrap();
        assert!(unconfigured(vars(&[])));
        fs::remove_file(&main).unwrap();
        assert!(!unconfigured(vars(&[])));
    }

    #[test]
    fn toml_errors_fit_on_one_line() {
        let Err(message) = parse_toml("a = [1\n b=2") else {
            panic!("bad TOML parsed");
        };
        assert!(!message.contains('\n'), "{message}");
        assert!(
            message.starts_with("not valid TOML: line 2, column 2: "),
            "{message}"
        );
    }

    #[test]
    fn key_paths_print_like_toml() {
        let path = KeyPath::of("buses")
            .index(0)
            .key("units")
            .index(1)
            .key("address");
        assert_eq!(path.to_string(), "buses[0].units[1].address");
        assert_eq!(KeyPath::of("cloud").key("a.b").to_string(), "cloud.\"a.b\"");
        assert!(KeyPath::of("buses").overlaps(&path));
        assert!(path.overlaps(&KeyPath::of("buses")));
        assert!(!KeyPath::of("cloud").overlaps(&path));
    }

    #[test]
    fn env_values_are_typed_by_the_schema() {
        let schema = schema().unwrap();
        let vars = [
            ("DOORBRIDGE_CLOUD__PASSWORD", "007"),
            ("DOORBRIDGE_BUSES", "[{port = \"/dev/ttyS0\"}]"),
            ("DOORBRIDGE_PIN_LOCKOUT__ATTEMPTS", "7"),
            ("DOORBRIDGE_LOG", "debug,rumqttc=warn"),
            ("DOORBRIDGE_CONFIG", "/tmp/x.toml"),
            ("DOORBRIDGE_STORAGE__", "x"),
            ("PATH", "/usr/bin"),
        ]
        .map(|(k, v)| (OsString::from(k), OsString::from(v)));
        let (layers, problems) = env_layers(vars.into_iter(), &schema);
        let names: Vec<&str> = layers.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "DOORBRIDGE_BUSES",
                "DOORBRIDGE_CLOUD__PASSWORD",
                "DOORBRIDGE_PIN_LOCKOUT__ATTEMPTS"
            ]
        );
        let value = |i: usize, path: &str| Value::from(layers[i].dict.clone()).find(path).unwrap();
        assert_eq!(value(1, "cloud.password").as_str(), Some("007"));
        assert_eq!(value(2, "pin_lockout.attempts").to_u128(), Some(7));
        assert!(value(0, "buses").as_array().is_some());
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].source, "DOORBRIDGE_STORAGE__");
    }

    #[test]
    fn the_broker_url_from_the_environment_is_one_url_or_a_list() {
        let schema = schema().unwrap();
        for (raw, want) in [
            ("mqtt://10.0.0.1:1883", 1),
            ("[\"mqtt://a:1883\", \"mqtts://b\"]", 2),
        ] {
            let vars = [(OsString::from("DOORBRIDGE_CLOUD__URL"), OsString::from(raw))];
            let (layers, problems) = env_layers(vars.into_iter(), &schema);
            assert!(problems.is_empty());
            let value = Value::from(layers[0].dict.clone())
                .find("cloud.url")
                .unwrap();
            let urls: crate::config::BrokerUrls = value.deserialize().unwrap();
            assert_eq!(urls.len(), want, "{raw}");
        }
    }

    #[test]
    fn typos_get_suggestions() {
        let schema = schema().unwrap();
        let Value::Dict(_, root) = &schema else {
            panic!()
        };
        assert_eq!(
            unknown_key_message("gatway", root, &[]),
            "unknown key (did you mean `gateway`?)"
        );
        assert_eq!(
            unknown_key_message(
                "trusted_keys",
                &Dict::new(),
                &schema_root_paths("trusted_keys")
            ),
            "unknown key here (the known key of that name is `cloud.trusted_keys`)"
        );
    }
}

#[cfg(test)]
mod schema_tests {
    use super::super::keypath::get;
    use super::*;

    /// Every key of the schema, with arrays entered at their first element.
    fn leaf_paths(value: &Value, path: &[Seg], out: &mut Vec<Vec<Seg>>) {
        match value {
            Value::Dict(_, dict) => {
                for (key, child) in dict {
                    let mut child_path = path.to_vec();
                    child_path.push(Seg::Key(key.clone()));
                    out.push(child_path.clone());
                    leaf_paths(child, &child_path, out);
                }
            }
            Value::Array(_, items) => {
                if let Some(first) = items.first() {
                    let mut child_path = path.to_vec();
                    child_path.push(Seg::Index(0));
                    leaf_paths(first, &child_path, out);
                }
            }
            _ => {}
        }
    }

    #[test]
    fn the_shipped_example_shows_every_key() {
        let text = include_str!("../../config/doorbridge.toml");
        let example = Value::from(parse_toml(text).unwrap());
        let schema = schema().unwrap();
        let mut paths = Vec::new();
        leaf_paths(&schema, &[], &mut paths);
        assert!(paths.len() > 40, "{}", paths.len());
        // Keys of the OSDP reader table are shown in a commented-out OSDP bus (the example's
        // bus speaks the doorbridge protocol, where they are not allowed).
        let commented = |path: &[Seg]| {
            matches!(path.last(), Some(Seg::Key(k)) if text.lines().any(|l| {
                let l = l.trim_start();
                l.starts_with('#') && (l.contains(&format!("{k} =")) || l.contains(&format!(".{k}]")))
            }))
        };
        for path in paths {
            assert!(
                get(&example, &path).is_some() || commented(&path),
                "config/doorbridge.toml lacks {}",
                KeyPath(path.clone())
            );
        }
    }
}
