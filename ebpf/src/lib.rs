//! Empty library target: it lets agent/build.rs depend on this crate so cargo rebuilds the agent
//! (and re-embeds the object) when the programs change. The programs are in `main.rs`.
#![no_std]
