//! Step 2 of the flow: accept redirected connections, recover where they were going and who made
//! them, and serve them over HTTP/1.1 or HTTP/2 — every MCP message goes through `mcp`
//! (understand) and `policy` (decide) and is audited before anything is forwarded to the original
//! destination.
//!
//! One file per stage of a connection's life, each importing only the stages below it:
//!
//! | file | what |
//! |---|---|
//! | [`accept`] | the accept loop (takes the redirect record) and the workers (name the caller, serve) |
//! | [`serve`] | one connection: plaintext, TLS terminated, or passed through; hyper per connection |
//! | [`terminate`] | the ClientHello, the SNI check, the client handshake, `tls: passthrough` |
//! | [`request`] | one HTTP request: checks, body, decoding, MCP or not |
//! | [`call`] | one MCP body: parse → decide → audit → answer the refused → forward the rest |
//! | [`choose`] | which policy applies to the caller (bindings, waiting for pod metadata) |
//! | [`context`] | what a request's steps share: server id, target, sessions, record head |
//! | [`forward`] | the upstream request shaped in one place (URI, version, hop-by-hop), sent |
//! | [`respond`] | the way back: JSON answers, SSE event by event, batches, listings filtered |
//! | [`reply`] | the responses mcpwarden writes itself |
//! | [`conn`], [`server`] | one connection's state; what all connections share |
//! | [`session`], [`tls`], [`upstream`], [`encoding`] | sessions, leaves and protocols, pools, body codings |
//!
//! Connections to `https://` servers are TLS-terminated: the ClientHello's SNI must be a name
//! configured for the destination, the client gets a leaf minted for it, and the request goes on
//! over a verified TLS connection of our own. A request whose Host names another server than the
//! SNI gets 421. `tls: passthrough` servers are forwarded untouched and audited per connection.

mod accept;
mod call;
mod choose;
mod conn;
mod context;
pub mod drain;
mod encoding;
mod forward;
mod hold;
mod limits;
mod reply;
mod request;
mod respond;
mod serve;
mod server;
mod session;
mod terminate;
mod tls;
mod upstream;

pub use server::{Interceptor, OrigDst, Server, ServerTls, Terminator};
pub use session::{ParamTable, Sessions};
pub use tls::{Leaves, Offer};
pub use upstream::{upstream_roots, TlsClient};
