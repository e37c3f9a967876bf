//! Integration tests, one binary to save link time.

mod codec_props;
mod crypto;
mod e2e;
#[cfg(feature = "grpc")]
mod grpc;
mod handshake;
mod metrics;
mod multi;
mod signed;
mod smoke;
mod tls;
