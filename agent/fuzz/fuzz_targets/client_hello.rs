//! Fuzzes the agent's ClientHello reading with the bytes a client sends: peeked (as
//! `peek_client_hello` reads them, for passthrough) and consumed (as `read_client_hello` has
//! rustls read them), cut in ways derived from the input.
//!
//! The code and its invariants are the agent's own `intercept/tls/hello.rs`, included here by
//! path so that this crate does not build the agent (and its eBPF programs); that file depends
//! on rustls alone. Its tests replay `corpus/client_hello/` through the same `check` in
//! `cargo test -p mcpwarden`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../src/intercept/tls/hello.rs"]
mod hello;

fuzz_target!(|data: &[u8]| {
    hello::check(data);
});
