//! Control plane: the HTTP/JSON API ([`api`]), its client ([`client`]) and the CLI ([`cli`]).

pub mod api;
pub mod cli;
pub mod client;
pub mod https;
