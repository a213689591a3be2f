//! Compiles the project's own `.proto` files. `protox` is a protobuf compiler written in Rust,
//! so building needs no `protoc` on the machine (nor in the Nix sandbox); it also carries the
//! well-known types (`google/protobuf/*.proto`) the client protocol imports.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/polars_node/v1/membership.proto",
        "proto/polars_node/v1/task.proto",
        "proto/polars_cloud/common.proto",
        "proto/polars_cloud/compute_plane/client/v1/client.proto",
    ];
    let descriptors = protox::compile(protos, ["proto"])?;
    // The scheduler keeps submissions in its query table (src/scheduler/store.rs): the enums
    // they carry are stored by name.
    let mut config = tonic_prost_build::configure();
    for name in ["EngineChoice", "ShuffleFormat", "ShuffleCompression"] {
        config =
            config.enum_attribute(format!(".polars_node.v1.{name}"), "#[derive(serde::Serialize, serde::Deserialize)]");
    }
    config.compile_fds(descriptors)?;
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
