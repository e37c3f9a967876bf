//! Compiles `proto/` with protox (pure Rust), so no system `protoc` is needed.
//! With the `grpc` feature, tonic's generator also emits the gRPC service.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/rollup/v1/messages.proto",
        "proto/transport/v1/transport.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    #[cfg(feature = "grpc")]
    if std::env::var_os("CARGO_FEATURE_GRPC").is_some() {
        tonic_prost_build::configure()
            .bytes(".")
            .build_client(true)
            .build_server(true)
            .compile_fds(descriptors)?;
        return Ok(());
    }
    prost_build::Config::new()
        .bytes(["."])
        .compile_fds(descriptors)?;
    Ok(())
}
