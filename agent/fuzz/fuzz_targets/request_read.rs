//! Fuzzes the request reader: a target, headers and a body (see
//! `mcpwarden_mcp::fuzz_checks::decode_request`) through `normalize_path`/`is_endpoint_path`,
//! `check_encoding`, `looks_like_jsonrpc`, `parse_body` and `batch_subset`.
//!
//! The invariants are `mcpwarden_mcp::fuzz_checks::request_read` (mcp/src/fuzz_checks.rs); its
//! tests replay `corpus/request_read/` through the same function in every `cargo test`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    mcpwarden_mcp::fuzz_checks::request_read(data);
});
