//! Integration tests, one binary to save link time.

mod codec_props;
mod crypto;
mod e2e;
mod handshake;
mod metrics;
mod multi;
mod signed;
mod smoke;
