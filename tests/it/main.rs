//! Integration tests, one binary to save link time.

mod admission;
mod broadcast_batches;
mod codec_props;
/// The example programs' shared code, for tests of their parts.
#[path = "../../examples/common/mod.rs"]
mod common;
mod config_file;
mod config_props;
mod contract;
mod crypto;
mod decode_bombs;
mod dos;
mod e2e;
mod fuzz_regressions;
mod go_api;
#[cfg(feature = "grpc")]
mod grpc;
#[cfg(feature = "grpc")]
mod grpc_calls;
mod handshake;
mod key_files;
mod log_text;
mod lost_messages;
mod metrics;
mod multi;
mod netns;
mod ops;
mod programs;
#[cfg(feature = "quic")]
mod quic;
mod raw_peer;
mod refused_frames;
mod restart;
mod sighup;
mod signed;
mod smoke;
mod third_party;
mod tls;
mod tls_versions;
mod trust_live;
#[cfg(feature = "ws")]
mod ws;
