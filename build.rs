//! Compiles the project's own `.proto` files. `protox` is a protobuf compiler written in Rust,
//! so building needs no `protoc` on the machine (nor in the Nix sandbox).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/polars_node/v1/membership.proto"];
    let descriptors = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
