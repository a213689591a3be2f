# OCI image: the binary, CA certificates, time zones, a non-root user and a default
# configuration; state in the /var/lib/polars volume.
{ dockerTools, cacert, tzdata, polars-node, runCommand }:
let
  defaults = runCommand "polars-node-image-config" { } ''
    mkdir -p $out/etc/polars $out/var/lib/polars/tmp
    cp ${../images/node.toml} $out/etc/polars/node.toml
  '';
in
dockerTools.buildLayeredImage {
  name = "polars-node";
  tag = polars-node.version;
  contents = [ polars-node cacert tzdata defaults dockerTools.fakeNss ];
  fakeRootCommands = ''
    chown -R 65534:65534 ./var/lib/polars
  '';
  config = {
    User = "65534:65534";
    Entrypoint = [ "${polars-node}/bin/polars-node" "service" ];
    Cmd = [ "--config-path" "/etc/polars/node.toml" ];
    WorkingDir = "/var/lib/polars";
    Volumes."/var/lib/polars" = { };
    Env = [
      "SSL_CERT_FILE=${cacert}/etc/ssl/certs/ca-bundle.crt"
      "TZDIR=${tzdata}/share/zoneinfo"
      "POLARS_TEMP_DIR=/var/lib/polars/tmp"
    ];
    ExposedPorts = {
      "5049/tcp" = { };
      "5050/tcp" = { };
      "5050/udp" = { };
      "5051/tcp" = { };
      "5052/tcp" = { };
      "5053/tcp" = { };
      "3001/tcp" = { };
    };
  };
}
