//! Front-end glue: adapts engine handles to the protocol crates. The protocol crates know
//! nothing of the engine; this is the only place the two meet.

mod nbd;
mod ublk;

pub use nbd::{widen_send_buffer, NbdCatalog, NbdExport};
pub use ublk::UblkTarget;
