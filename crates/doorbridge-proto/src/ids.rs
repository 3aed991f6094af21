//! The ids the gateway passes between its parts, as types of their own rather than bare
//! strings, so that a unit's name cannot go where a door's is expected, nor a door's where a
//! key's is.
//!
//! Each is text on the wire and in the database (serde-transparent: the same bytes as the
//! `String` it replaces), reads as a `&str` (`Deref`, `Borrow<str>` for map lookups), and is
//! made with `From<&str>` / `From<String>` or `new`.

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;

use serde::{Deserialize, Serialize};

/// Defines a string id newtype with its conversions and comparisons.
macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(
            Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub fn new(id: impl Into<String>) -> $name {
                $name(id.into())
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(id: &str) -> $name {
                $name(id.to_owned())
            }
        }

        impl From<String> for $name {
            fn from(id: String) -> $name {
                $name(id)
            }
        }

        impl From<&String> for $name {
            fn from(id: &String) -> $name {
                $name(id.clone())
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<String> for $name {
            fn eq(&self, other: &String) -> bool {
                &self.0 == other
            }
        }

        impl PartialEq<$name> for str {
            fn eq(&self, other: &$name) -> bool {
                self == other.0
            }
        }

        impl PartialEq<$name> for &str {
            fn eq(&self, other: &$name) -> bool {
                *self == other.0
            }
        }
    };
}

string_id! {
    /// A door's id, unique within the site (for example `main-entrance`): the configuration's
    /// name for it, and what a key's `doors` list.
    DoorId
}

string_id! {
    /// A door unit or reader, as `bus/address` (`entrance/1`): the bus's name in the
    /// configuration and the unit's address on it.
    UnitId
}

impl UnitId {
    /// The unit at `address` on the bus named `bus`.
    pub fn on(bus: &str, address: impl fmt::Display) -> UnitId {
        UnitId(format!("{bus}/{address}"))
    }
}

string_id! {
    /// A key's id in the cloud (`KeyRules::id`): stable across edits, what deltas delete and
    /// records name.
    KeyId
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_is_its_text_on_the_wire_and_compares_with_it() {
        let door = DoorId::from("main");
        // Same CBOR and JSON as the string it replaced: records, key sets and reports keep
        // their bytes.
        assert_eq!(crate::cbor::encode(&door), crate::cbor::encode(&"main"));
        assert_eq!(serde_json::to_string(&door).unwrap(), r#""main""#);
        let back: DoorId = crate::cbor::decode(&crate::cbor::encode(&"main"), 64, 4).unwrap();
        assert_eq!(back, door);
        assert_eq!(door, "main");
        assert_eq!(&*door, "main");
        assert_eq!(UnitId::on("entrance", 3), "entrance/3");
        assert_eq!(KeyId::new("k-1").to_string(), "k-1");
    }
}
