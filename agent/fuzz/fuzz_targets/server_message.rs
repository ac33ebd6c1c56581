//! Fuzzes the server-message reader and the `tools/list` filter (`mcpwarden_mcp::inspect`): a
//! control line (which tools are hidden, which ids are listings, per-caller or not), then the
//! body a server sent.
//!
//! The invariants are `mcpwarden_mcp::fuzz_checks::server_message` (mcp/src/fuzz_checks.rs);
//! its tests replay `corpus/server_message/` through the same function in every `cargo test`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    mcpwarden_mcp::fuzz_checks::server_message(data);
});
