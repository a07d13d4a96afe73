//! Validated SQL identifiers for the configurable table name.
//!
//! The table name is the only piece of SQL text idemq-postgres builds at run
//! time; everything else is bound. It is accepted only when every part
//! matches `^[a-z_][a-z0-9_]{0,62}$` (optionally `schema.table`), and is
//! always written double-quoted, so it can be neither SQL nor a reserved word.

use std::fmt;

use idemq::Error;

/// The longest identifier Postgres keeps (NAMEDATALEN - 1).
const MAX_IDENT: usize = 63;

fn check_part(part: &str) -> bool {
    let bytes = part.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_IDENT
        && (bytes[0].is_ascii_lowercase() || bytes[0] == b'_')
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_')
}

/// A table name that passed validation.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct TableName {
    schema: Option<String>,
    name: String,
}

impl TableName {
    /// Validates `raw`: `table` or `schema.table`, each part
    /// `^[a-z_][a-z0-9_]{0,62}$`.
    pub(crate) fn parse(raw: &str) -> Result<TableName, Error> {
        let bad = || {
            Error::invalid(
                "table name",
                format!(
                    "{:?} is not `name` or `schema.name` with each part matching \
                     ^[a-z_][a-z0-9_]{{0,62}}$",
                    raw.chars().take(80).collect::<String>()
                ),
            )
        };
        let mut parts = raw.split('.');
        let (schema, name) = match (parts.next(), parts.next(), parts.next()) {
            (Some(name), None, None) => (None, name),
            (Some(schema), Some(name), None) => (Some(schema), name),
            _ => return Err(bad()),
        };
        if !check_part(name) || !schema.is_none_or(check_part) {
            return Err(bad());
        }
        Ok(TableName {
            schema: schema.map(str::to_owned),
            name: name.to_owned(),
        })
    }

    /// The default table, [`crate::DEFAULT_TABLE`].
    pub(crate) fn default_table() -> TableName {
        TableName {
            schema: None,
            name: crate::DEFAULT_TABLE.to_owned(),
        }
    }

    /// The schema part, when qualified.
    pub(crate) fn schema(&self) -> Option<&str> {
        self.schema.as_deref()
    }

    /// The unqualified table name.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// `"schema"."table"` or `"table"`: safe to format into SQL.
    pub(crate) fn quoted(&self) -> String {
        self.qualify(&self.name)
    }

    /// `other` in the same schema as the table, quoted.
    pub(crate) fn qualify(&self, other: &str) -> String {
        match &self.schema {
            Some(s) => format!("\"{s}\".\"{other}\""),
            None => format!("\"{other}\""),
        }
    }

    /// The name of the `expires_at` index (unqualified, quoted): indexes
    /// live in their table's schema. Kept within 63 bytes, with a hash of
    /// the table name when it had to be shortened so names never collide.
    pub(crate) fn expires_index(&self) -> String {
        const SUFFIX: &str = "_expires_at_idx";
        let plain = format!("{}{SUFFIX}", self.name);
        if plain.len() <= MAX_IDENT {
            return format!("\"{plain}\"");
        }
        let hash = fnv1a(self.name.as_bytes());
        // name[..n] + "_" + 8 hex + "_exp_idx" = n + 17 bytes; all ASCII.
        let keep = MAX_IDENT - 17;
        format!("\"{}_{hash:08x}_exp_idx\"", &self.name[..keep])
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.schema {
            Some(s) => write!(f, "{s}.{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

impl fmt::Debug for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.to_string())
    }
}

fn fnv1a(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in bytes {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_table_is_valid() {
        assert_eq!(
            TableName::parse(crate::DEFAULT_TABLE).unwrap(),
            TableName::default_table()
        );
    }

    #[test]
    fn accepts_plain_and_qualified() {
        let t = TableName::parse("idemq_dedup").unwrap();
        assert_eq!(t.quoted(), "\"idemq_dedup\"");
        assert_eq!(t.expires_index(), "\"idemq_dedup_expires_at_idx\"");
        let q = TableName::parse("app.orders_dedup").unwrap();
        assert_eq!(q.quoted(), "\"app\".\"orders_dedup\"");
        assert_eq!(
            q.qualify("idemq_migrations"),
            "\"app\".\"idemq_migrations\""
        );
        assert_eq!(q.to_string(), "app.orders_dedup");
        assert!(TableName::parse(&"a".repeat(63)).is_ok());
        assert!(TableName::parse("_x9").is_ok());
        // Reserved words are fine: they are always quoted.
        assert_eq!(TableName::parse("user").unwrap().quoted(), "\"user\"");
    }

    #[test]
    fn rejects_hostile_names() {
        for bad in [
            "",
            ".",
            "a.",
            ".a",
            "a.b.c",
            "9lives",
            "Upper",
            "a-b",
            "a b",
            "x\"; DROP TABLE users; --",
            "t\"",
            "t;",
            "t--",
            "täble",
            "a\0",
            &"a".repeat(64),
        ] {
            match TableName::parse(bad) {
                Err(Error::InvalidInput {
                    what: "table name", ..
                }) => {}
                other => panic!("{bad:?} must be rejected, got {other:?}"),
            }
        }
    }

    #[test]
    fn long_names_get_short_distinct_indexes() {
        let a = TableName::parse(&format!("{}a", "x".repeat(62))).unwrap();
        let b = TableName::parse(&format!("{}b", "x".repeat(62))).unwrap();
        let (ia, ib) = (a.expires_index(), b.expires_index());
        assert_ne!(ia, ib);
        assert!(ia.len() - 2 <= MAX_IDENT, "{ia}");
        assert!(check_part(ia.trim_matches('"')));
    }
}
