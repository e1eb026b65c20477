//! NBD (Network Block Device) protocol: wire types ([`wire`], no I/O), and a server for the
//! fixed-newstyle handshake and the transmission phase ([`serve_connection`]), generic over
//! any `AsyncRead + AsyncWrite` stream and over an [`ExportCatalog`]. It knows nothing about
//! storage: exports are whatever implements [`Export`].

mod conn;
mod export;
pub mod tls;
pub mod wire;

#[cfg(test)]
mod tests;

pub use conn::{errno, kernel_transmission_flags, serve_connection, serve_transmission, NbdError, ServerConfig};
pub use export::{Export, ExportCatalog, ExportError, ExportInfo, Extent, ReadKind, RequestKind, ZeroFlags};
pub use tls::{Peer, Tls};
