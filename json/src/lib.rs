//! Strict JSON for mcpwarden, shared by the MCP parser and the policy loader.
//!
//! - [`Reader`]: the one strict reader of a `serde_json::Value`, over any serde
//!   deserializer (JSON text, YAML). Keys that a server might read differently
//!   (duplicates, keys equal but for letter case) are recorded or refused, as
//!   [`Options`] say; non-finite floats and integers beyond 64 bits are errors;
//!   nesting may be capped. [`parse`] is the MCP parser's use of it.
//! - [`first_inexact_number`]: a number literal that another parser could read as
//!   another value than `serde_json` holds.
//! - [`canonical_json`], [`canonical_sha256`], [`sha256_hex`]: canonical JSON
//!   text and the hashes by which the audit log names arguments and files.

mod canonical;
mod numbers;
mod strict;

pub use canonical::{canonical_json, canonical_sha256, sha256_hex, write_string, write_value};
pub use numbers::first_inexact_number;
pub use strict::{fold_key, parse, KeyClash, OnClash, Options, Reader, StrictDocument, ValueSeed};
