# Example option values of the NixOS module, rendered with nixos/render.nix alone. The
# addresses are those of the multi-host scenario (tests/python/test_nixos_scenario.py), which
# runs nodes with exactly these files.
let
  render = (import ../../nixos/render.nix).render;
  leader = {
    instanceId = "scheduler";
    schedulerAddress = "10.231.1.2:5050";
    observatoryAddress = "10.231.1.2:5049";
  };
in
{
  # services.polars.scheduler + services.polars.observatory on one host, default ports.
  scheduler = render {
    instanceId = "scheduler";
    scheduler = {
      enable = true;
      nWorkers = 2;
      resultPath = "/var/lib/polars/results";
    };
    observatory.enable = true;
    leader.instanceId = "scheduler";
  };

  # A worker bound by interface name (its eth1 address, read at start).
  worker-interface = render {
    instanceId = "worker-1";
    worker = {
      enable = true;
      taskService.bind = "eth1";
      shuffleService.bind = "eth1";
      heartbeatPeriod = "500ms";
    };
    inherit leader;
  };

  # A worker behind NAT: bound on every interface, reached at the router's address.
  worker-nat = render {
    instanceId = "worker-2";
    worker = {
      enable = true;
      taskService = {
        bind = 5052;
        public = "10.231.1.10:5052";
      };
      shuffleService = {
        bind = 5053;
        public = "10.231.1.10:5053";
      };
      heartbeatPeriod = "500ms";
    };
    inherit leader;
  };

  # Everything on one host, with a freeform setting passed through.
  all-in-one = render {
    clusterId = "lab";
    scheduler.enable = true;
    worker = {
      enable = true;
      taskService.bind = "127.0.0.1:5052";
      shuffleService.bind = "127.0.0.1:5053";
    };
    observatory.enable = true;
    settings.scheduler.lost_after_missed_heartbeats = 5;
  };
}
