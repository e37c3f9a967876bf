//! Integration tests, one binary to save link time.

mod codec_props;
mod crypto;
mod handshake;
mod multi;
mod signed;
mod smoke;
