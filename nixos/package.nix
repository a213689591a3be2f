# polars-node, built with the exact Rust source of Polars 2.0.0 and the hashbrown it builds with:
# the same archives, by the same hashes, with the same patches as polars-source/fetch.sh.
{ lib, rustPlatform, fetchurl, python3 }:
let
  polarsSource = fetchurl {
    # As PyPI's simple index lists the polars-runtime-64 2.0.0 sdist.
    url = "https://files.pythonhosted.org/packages/8f/8d/6c543a472ae7a166403f0d523cc197f704c0c85fa5ede5828de3e8a0a0a2/polars_runtime_64-2.0.0.tar.gz";
    sha256 = "9d0aa1ba0ed4521203c1c2aa44c279809427305577583d57715f06c708011122";
  };
  hashbrownSource = fetchurl {
    url = "https://static.crates.io/crates/hashbrown/hashbrown-0.17.2.crate";
    sha256 = "735eaa21a6a5ffb2e84362faaeb90c05ba8e19797ca30428478cb6ea3a4921bc";
  };
in
rustPlatform.buildRustPackage {
  pname = "polars-node";
  version = (builtins.fromTOML (builtins.readFile ../Cargo.toml)).package.version;

  src = lib.cleanSourceWith {
    src = ../.;
    filter = path: _type:
      let rel = lib.removePrefix (toString ../. + "/") (toString path); in
        !(lib.hasPrefix ".polars-source" rel || lib.hasPrefix "target" rel || lib.hasPrefix "tests/python" rel);
  };

  cargoLock.lockFile = ../Cargo.lock;

  postUnpack = ''
    mkdir -p "$sourceRoot/.polars-source/polars-2.0.0"
    tar -xzf ${polarsSource} -C "$sourceRoot/.polars-source/polars-2.0.0" --strip-components=1
    for p in "$sourceRoot"/polars-source/patches/*.patch; do
      patch -d "$sourceRoot/.polars-source/polars-2.0.0" -p1 < "$p"
    done
    mkdir -p "$sourceRoot/.polars-source/hashbrown-0.17.2"
    tar -xzf ${hashbrownSource} -C "$sourceRoot/.polars-source/hashbrown-0.17.2" --strip-components=1
    for p in "$sourceRoot"/polars-source/hashbrown/*.patch; do
      patch -d "$sourceRoot/.polars-source/hashbrown-0.17.2" -p1 < "$p"
    done
  '';

  nativeBuildInputs = [ python3 ];

  # The process tests need network namespaces, systemd-socket-activate and a Python client;
  # the sandbox runs the unit tests, the VM tests run the rest.
  cargoTestFlags = [ "--lib" ];

  meta = {
    description = "Self-hosted Polars cluster node: scheduler, worker and observatory in one binary";
    license = lib.licenses.asl20;
    mainProgram = "polars-node";
    platforms = lib.platforms.linux;
  };
}
