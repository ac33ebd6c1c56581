//! Fuzzes `mcpwarden_mcp::SseSplitter` with an event stream fed whole and cut in several ways.
//!
//! The invariants are `mcpwarden_mcp::fuzz_checks::sse_split` (mcp/src/fuzz_checks.rs); its
//! tests replay `corpus/sse_split/` through the same function in every `cargo test`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    mcpwarden_mcp::fuzz_checks::sse_split(data);
});
