# The official client (polars-cloud 0.12.0 with polars 2.0.0) from its PyPI wheels, pinned by
# hash, for the VM test's client node.
{ python3Packages, fetchurl, autoPatchelfHook, stdenv }:
let
  # URLs as PyPI's simple index lists them.
  wheel = { pname, version, url, sha256, deps ? [ ] }:
    python3Packages.buildPythonPackage {
      inherit pname version;
      format = "wheel";
      src = fetchurl { inherit url sha256; };
      nativeBuildInputs = [ autoPatchelfHook ];
      buildInputs = [ stdenv.cc.cc.lib ];
      dependencies = deps;
      pythonImportsCheck = [ ];
    };
  runtime32 = wheel {
    pname = "polars-runtime-32";
    version = "2.0.0";
    url = "https://files.pythonhosted.org/packages/83/88/e9fecfd49159da92f54ff2445883577a0f1bc195da53ecc9535c458d55dd/polars_runtime_32-2.0.0-cp310-abi3-manylinux_2_17_x86_64.manylinux2014_x86_64.whl";
    sha256 = "0d6ac584ea2b38913784db943879412380d92e28ab9cb88e20a77ba71ba3f911";
  };
  runtime64 = wheel {
    pname = "polars-runtime-64";
    version = "2.0.0";
    url = "https://files.pythonhosted.org/packages/97/cb/8b52a6d6181af12e29c810a28dd543d21d969d7d5dc111c0730ed57077c9/polars_runtime_64-2.0.0-cp310-abi3-manylinux_2_17_x86_64.manylinux2014_x86_64.whl";
    sha256 = "49ec77e6711ea5a525a09315ee0287033a118dc55ecbcc803ebc96ab4fc7776c";
  };
  polars = wheel {
    pname = "polars";
    version = "2.0.0";
    url = "https://files.pythonhosted.org/packages/ac/09/cc33bbd5463749c116b62c204d88bed6c02a6cb901eac7adab0d38651b07/polars-2.0.0-py3-none-any.whl";
    sha256 = "35d62f3541b7a6d4c360a2e2f07fccc0c2bcbd33b0ea51c83a25417a47a3f3ad";
    deps = [ runtime32 runtime64 ];
  };
in
wheel {
  pname = "polars-cloud";
  version = "0.12.0";
  url = "https://files.pythonhosted.org/packages/3e/e8/205d8049aab981041b1cb796739250b8f1472cfabd74954f1b008a12ebcb/polars_cloud-0.12.0-cp310-abi3-manylinux_2_28_x86_64.whl";
  sha256 = "4aaa82d12d89030869b70e138976d23e442b8cca478870779862199ab95a23f8";
  deps = [ polars python3Packages.typing-extensions ];
}
