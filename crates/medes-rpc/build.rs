//! Compiles `proto/medes/node/v1/node.proto` with protox (pure Rust: no `protoc` needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/medes/node/v1/node.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Page data travels as `bytes::Bytes`: sliced from the owner's mapping, decoded without
        // a copy out of the receive buffer.
        .bytes(".medes.node.v1.PageChunk.data")
        .bytes(".medes.node.v1.BaseFingerprintsResponse")
        .compile_fds(fds)?;
    Ok(())
}
