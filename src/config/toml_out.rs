//! Prints a configuration back as TOML, keeping the order of the fields as declared.
//!
//! The value goes through `ciborium::Value` (already a dependency, for the cloud payloads)
//! because its maps keep insertion order; a figment value would sort the keys. Only what a
//! configuration holds is needed: tables, arrays of tables, arrays of plain values, strings,
//! integers, booleans. `None` fields are left out (TOML has no null).

use std::fmt::Write as _;

use ciborium::Value;
use serde::Serialize;

/// `value` as a TOML document. Secrets print as whatever their `Serialize` gives (redacted).
pub(super) fn to_toml<T: Serialize>(value: &T) -> String {
    let mut out = String::new();
    match Value::serialized(value) {
        Ok(Value::Map(entries)) => table(&mut out, &[], &entries, Header::Root),
        Ok(other) => out.push_str(&inline(&other)),
        Err(error) => {
            let _ = writeln!(out, "# cannot print the configuration: {error}");
        }
    }
    out
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Header {
    Root,
    Table,
    ArrayElement,
}

/// Whether a value prints as its own `[table]` or `[[array]]` section rather than `k = v`.
fn is_section(value: &Value) -> bool {
    match value {
        Value::Map(_) => true,
        Value::Array(items) => {
            !items.is_empty() && items.iter().all(|i| matches!(i, Value::Map(_)))
        }
        _ => false,
    }
}

fn table(out: &mut String, path: &[String], entries: &[(Value, Value)], header: Header) {
    let dotted = || path.iter().map(|k| key(k)).collect::<Vec<_>>().join(".");
    match header {
        Header::Root => {}
        Header::Table => {
            let _ = writeln!(out, "\n[{}]", dotted());
        }
        Header::ArrayElement => {
            let _ = writeln!(out, "\n[[{}]]", dotted());
        }
    }
    // Plain keys first: after a sub-table header they would belong to the sub-table.
    for (name, value) in entries {
        if !is_section(value) && !matches!(value, Value::Null) {
            let _ = writeln!(out, "{} = {}", key(&name_of(name)), inline(value));
        }
    }
    for (name, value) in entries {
        let mut child = path.to_vec();
        child.push(name_of(name));
        match value {
            Value::Map(inner) => table(out, &child, inner, Header::Table),
            Value::Array(items) if is_section(value) => {
                for item in items {
                    if let Value::Map(inner) = item {
                        table(out, &child, inner, Header::ArrayElement);
                    }
                }
            }
            _ => {}
        }
    }
    if header == Header::Root && out.starts_with('\n') {
        out.remove(0);
    }
}

fn name_of(name: &Value) -> String {
    match name {
        Value::Text(text) => text.clone(),
        other => inline(other),
    }
}

/// A key, bare when TOML allows it, else quoted.
fn key(name: &str) -> String {
    if !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        name.to_owned()
    } else {
        string(name)
    }
}

fn inline(value: &Value) -> String {
    match value {
        Value::Text(text) => string(text),
        Value::Integer(n) => i128::from(*n).to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Float(f) if f.is_nan() => "nan".to_owned(),
        Value::Float(f) if f.is_infinite() => if *f > 0.0 { "inf" } else { "-inf" }.to_owned(),
        Value::Float(f) => format!("{f:?}"),
        Value::Array(items) => {
            let items: Vec<String> = items
                .iter()
                .filter(|i| !matches!(i, Value::Null))
                .map(inline)
                .collect();
            format!("[{}]", items.join(", "))
        }
        Value::Map(entries) => {
            let entries: Vec<String> = entries
                .iter()
                .filter(|(_, v)| !matches!(v, Value::Null))
                .map(|(k, v)| format!("{} = {}", key(&name_of(k)), inline(v)))
                .collect();
            if entries.is_empty() {
                "{}".to_owned()
            } else {
                format!("{{ {} }}", entries.join(", "))
            }
        }
        Value::Bytes(bytes) => {
            let items: Vec<String> = bytes.iter().map(u8::to_string).collect();
            format!("[{}]", items.join(", "))
        }
        Value::Tag(_, inner) => inline(inner),
        // Null is left out by the callers; anything else is not produced by a configuration.
        _ => "\"\"".to_owned(),
    }
}

/// A TOML basic string.
fn string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Inner {
        a: u32,
        note: Option<String>,
    }

    #[derive(Serialize)]
    struct Outer {
        title: String,
        list: Vec<String>,
        empty: Vec<Inner>,
        inner: Inner,
        items: Vec<Inner>,
    }

    #[test]
    fn prints_sections_in_declared_order() {
        let value = Outer {
            title: "say \"hi\"\n".to_owned(),
            list: vec!["x".to_owned(), "y".to_owned()],
            empty: vec![],
            inner: Inner { a: 1, note: None },
            items: vec![
                Inner {
                    a: 2,
                    note: Some("two".to_owned()),
                },
                Inner { a: 3, note: None },
            ],
        };
        let expected = "title = \"say \\\"hi\\\"\\n\"\nlist = [\"x\", \"y\"]\nempty = []\n\n\
                        [inner]\na = 1\n\n[[items]]\na = 2\nnote = \"two\"\n\n[[items]]\na = 3\n";
        assert_eq!(to_toml(&value), expected);
    }
}
