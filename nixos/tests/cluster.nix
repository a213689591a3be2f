# A cluster of VMs: `leader` runs the scheduler and the observatory; `worker1` binds to its
# second interface by name; `worker2` sits behind `router`, reachable only at the router's
# address through NAT; `client` runs a query with the official client, and a worker is stopped
# while it runs. (The same scenario runs without VMs in tests/python/test_nixos_scenario.py.)
{ self, pkgs }:
let
  module = self.nixosModules.default;
  common = {
    imports = [ module ];
    nixpkgs.overlays = [ self.overlays.default ];
    networking.firewall.enable = true;
    services.polars = {
      clusterId = "vmtest";
      leader = {
        instanceId = "leader";
        schedulerAddress = "192.168.1.2:5050";
      };
    };
  };
in
pkgs.testers.runNixOSTest {
  name = "polars-node-cluster";
  nodes = {
    leader = {
      imports = [ common ];
      virtualisation.vlans = [ 1 ];
      networking.interfaces.eth1.ipv4.addresses = [{ address = "192.168.1.2"; prefixLength = 24; }];
      services.polars = {
        instanceId = "leader";
        scheduler = {
          enable = true;
          nWorkers = 2;
          clientService.openFirewall = true;
          workerService.openFirewall = true;
        };
        observatory = {
          enable = true;
          otlpService.openFirewall = true;
          restService.openFirewall = true;
        };
        settings.scheduler.anonymous_result_location.shared_filesystem.path = "/var/lib/polars/results";
      };
    };
    worker1 = {
      imports = [ common ];
      virtualisation.vlans = [ 1 ];
      networking.interfaces.eth1.ipv4.addresses = [{ address = "192.168.1.3"; prefixLength = 24; }];
      services.polars = {
        instanceId = "worker-1";
        worker = {
          enable = true;
          heartbeatPeriod = "1s";
          taskService = { bind = "eth1"; openFirewall = true; };
          shuffleService = { bind = "eth1"; openFirewall = true; };
        };
      };
    };
    router = {
      virtualisation.vlans = [ 1 2 ];
      networking.interfaces.eth1.ipv4.addresses = [{ address = "192.168.1.10"; prefixLength = 24; }];
      networking.interfaces.eth2.ipv4.addresses = [{ address = "192.168.2.1"; prefixLength = 24; }];
      networking.nat = {
        enable = true;
        externalInterface = "eth1";
        internalInterfaces = [ "eth2" ];
        forwardPorts = [
          { destination = "192.168.2.2:5052"; proto = "tcp"; sourcePort = 5052; }
          { destination = "192.168.2.2:5053"; proto = "tcp"; sourcePort = 5053; }
        ];
      };
      networking.firewall.allowedTCPPorts = [ 5052 5053 ];
    };
    worker2 = {
      imports = [ common ];
      virtualisation.vlans = [ 2 ];
      networking.interfaces.eth1.ipv4.addresses = [{ address = "192.168.2.2"; prefixLength = 24; }];
      networking.defaultGateway = "192.168.2.1";
      services.polars = {
        instanceId = "worker-2";
        worker = {
          enable = true;
          heartbeatPeriod = "1s";
          taskService = { bind = 5052; public = "192.168.1.10:5052"; openFirewall = true; };
          shuffleService = { bind = 5053; public = "192.168.1.10:5053"; openFirewall = true; };
        };
      };
    };
    client = { pkgs, ... }: {
      virtualisation.vlans = [ 1 ];
      networking.interfaces.eth1.ipv4.addresses = [{ address = "192.168.1.50"; prefixLength = 24; }];
      environment.systemPackages = [
        (pkgs.python3.withPackages (_: [ (pkgs.callPackage ./client.nix { }) ]))
      ];
    };
  };

  testScript = ''
    start_all()
    leader.wait_for_unit("polars-node.service")
    worker1.wait_for_unit("polars-node.service")
    worker2.wait_for_unit("polars-node.service")
    # READY=1 on the leader means both workers registered (nWorkers = 2).
    leader.wait_until_succeeds("test $(polars-node workers --json | grep -o '\"alive\"' | wc -l) -eq 2")
    leader.succeed("polars-node workers --scheduler 127.0.0.1:5050 | grep -q '192.168.1.10:5052'")
    client.succeed("""python3 - <<'PY'
    import polars as pl, polars_cloud as pc
    ctx = pc.ClusterContext(uri="http://192.168.1.2:5051")
    q = pl.LazyFrame({"k": ["a", "b", "a"], "v": [1, 2, 3]}).group_by("k").agg(pl.col("v").sum()).sort("k")
    assert q.remote(ctx).collect().equals(q.collect())
    PY""")
    # A worker stopped while a query runs: the query is retried on the other one.
    client.succeed("""python3 - <<'PY' &
    import polars as pl, polars_cloud as pc
    ctx = pc.ClusterContext(uri="http://192.168.1.2:5051")
    lf = pl.LazyFrame({"a": range(3000)}).join(pl.LazyFrame({"b": range(3000)}), how="cross")
    q = lf.select((pl.col("a") * pl.col("b")).sum())
    assert q.remote(ctx, n_retries=1).collect().equals(q.collect())
    open("/tmp/ok", "w").write("ok")
    PY
    """)
    worker1.succeed("sleep 1; systemctl stop polars-node.service")
    client.wait_for_file("/tmp/ok")
  '';
}
