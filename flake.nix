{
  description = "polars-node: a self-hosted Polars cluster (scheduler, workers, observatory) in one binary";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
      render = import ./nixos/render.nix;
      examples = import ./tests/nix/examples.nix;
    in
    {
      overlays.default = final: _prev: {
        polars-node = final.callPackage ./nixos/package.nix { };
      };

      nixosModules.default = ./nixos/module.nix;

      packages = forAllSystems (pkgs: rec {
        default = pkgs.callPackage ./nixos/package.nix { };
        image = pkgs.callPackage ./nixos/image.nix { polars-node = default; };
      });

      apps = forAllSystems (pkgs: {
        default = {
          type = "app";
          program = "${self.packages.${pkgs.system}.default}/bin/polars-node";
        };
      });

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          inputsFrom = [ self.packages.${pkgs.system}.default ];
          packages = [ pkgs.nixpkgs-fmt pkgs.deadnix pkgs.python3 pkgs.iproute2 pkgs.iptables ];
        };
      });

      checks = forAllSystems (pkgs:
        let
          polars-node = self.packages.${pkgs.system}.default;
          nixFiles = "flake.nix nixos tests/nix";
        in
        {
          # The crate's unit tests run in the package's check phase.
          package = polars-node;
          format = pkgs.runCommand "polars-node-nix-format" { nativeBuildInputs = [ pkgs.nixpkgs-fmt ]; } ''
            cd ${./.} && nixpkgs-fmt --check ${nixFiles} && touch $out
          '';
          deadnix = pkgs.runCommand "polars-node-deadnix" { nativeBuildInputs = [ pkgs.deadnix ]; } ''
            cd ${./.} && deadnix --fail ${nixFiles} && touch $out
          '';
          lint = polars-node.overrideAttrs (old: {
            pname = "polars-node-clippy";
            nativeBuildInputs = old.nativeBuildInputs ++ [ pkgs.clippy ];
            buildPhase = "cargo clippy --offline --all-targets -- -D warnings";
            installPhase = "touch $out";
            doCheck = false;
          });
          # The module's rendering of example options, each checked by the node itself.
          module-render = pkgs.runCommand "polars-node-module-render" { nativeBuildInputs = [ polars-node ]; } (
            nixpkgs.lib.concatStrings
              (nixpkgs.lib.mapAttrsToList
                (name: text: ''
                  cp ${pkgs.writeText "${name}.toml" text} ${name}.toml
                  polars-node check-config --no-resolve ${name}.toml > /dev/null
                '')
                examples) + "touch $out"
          );
          module-eval = (nixpkgs.lib.nixosSystem {
            inherit (pkgs) system;
            modules = [
              self.nixosModules.default
              {
                nixpkgs.overlays = [ self.overlays.default ];
                boot.isContainer = true;
                services.polars = {
                  scheduler.enable = true;
                  worker = { enable = true; taskService.bind = "eth1"; shuffleService.bind = "eth1"; };
                  socketActivation = true;
                };
              }
            ];
          }).config.system.build.toplevel;
          cluster = import ./nixos/tests/cluster.nix { inherit self pkgs; };
          render-is-pure = pkgs.writeText "render" (render.render { scheduler.enable = true; });
        });
    };
}
