# NixOS module: services.polars.{scheduler,worker,observatory}. One polars-node process per
# host runs the roles enabled here, from a TOML file rendered by ./render.nix and checked with
# `polars-node check-config` when the system is built.
{ config, lib, pkgs, ... }:
let
  cfg = config.services.polars;
  render = import ./render.nix;
  inherit (lib) mkEnableOption mkIf mkOption types literalExpression;

  addressValue = types.oneOf [ types.port types.str (types.attrsOf types.anything) ];

  serviceOptions = what: defaultPort: {
    bind = mkOption {
      type = addressValue;
      default = defaultPort;
      example = "eth1";
      description = ''
        Where the ${what} listens: a port (every interface), `"host:port"` (an address;
        IPv6 as `"[::1]:${toString defaultPort}"`), or the name of a network interface, whose
        address the node reads when it starts (rendered as
        `{ interface = "eth1", port = ${toString defaultPort} }`).
      '';
    };
    public = mkOption {
      type = types.nullOr addressValue;
      default = null;
      example = "203.0.113.7:${toString defaultPort}";
      description = ''
        How other nodes reach the ${what}, when that differs from `bind`: required for a worker
        bound to every interface, and the way through NAT or a load balancer.
      '';
    };
    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Open the ${what}'s port in the firewall.";
    };
  };

  # Every service of this host: socket-activation name, options, default port, role enabled.
  services = [
    { name = "client"; opts = cfg.scheduler.clientService; port = 5051; on = cfg.scheduler.enable; }
    { name = "worker"; opts = cfg.scheduler.workerService; port = 5050; on = cfg.scheduler.enable; }
    { name = "task"; opts = cfg.worker.taskService; port = 5052; on = cfg.worker.enable; }
    { name = "shuffle"; opts = cfg.worker.shuffleService; port = 5053; on = cfg.worker.enable; }
    { name = "otlp"; opts = cfg.observatory.otlpService; port = 5049; on = cfg.observatory.enable; }
    { name = "rest"; opts = cfg.observatory.restService; port = 3001; on = cfg.observatory.enable; }
  ];
  enabledServices = builtins.filter (s: s.on) services;

  isInterface = v: builtins.isString v && builtins.match ".*:.*" v == null;
  portOf = s:
    let b = s.opts.bind; in
    if builtins.isInt b then b
    else if isInterface b then s.port
    else if builtins.isAttrs b then b.port or s.port
    else lib.toInt (lib.last (lib.splitString ":" b));
  interfaces = lib.unique (map (s: s.opts.bind) (builtins.filter (s: isInterface s.opts.bind) enabledServices));
  deviceUnits = map (i: "sys-subsystem-net-devices-${i}.device") interfaces;

  # Typed options -> settings (the pure ./render.nix, which CI evaluates without nixpkgs),
  # written as TOML by pkgs.formats.toml (RFC 42).
  rendered = (pkgs.formats.toml { }).generate "polars-node-unchecked.toml" (render.settingsFor {
    inherit (cfg) instanceId clusterId memoryLimit tokenFile tls settings;
    leader = {
      inherit (cfg.leader) instanceId;
      schedulerAddress = cfg.leader.schedulerAddress;
      observatoryAddress = cfg.leader.observatoryAddress;
    };
    scheduler = {
      inherit (cfg.scheduler) enable nWorkers clientService workerService;
      resultPath = "/var/lib/polars/results";
      databasePath = "/var/lib/polars/scheduler/queries.db";
    };
    worker = {
      inherit (cfg.worker) enable heartbeatPeriod taskService shuffleService;
      shufflePath = "/var/lib/polars/shuffle";
    };
    observatory = {
      inherit (cfg.observatory) enable otlpService restService;
      databasePath = "/var/lib/polars/observatory/${cfg.clusterId}.db";
    };
    inherit (cfg) monitoring;
  });

  # The node's own check, at build time; interfaces and names are looked up at start instead.
  configFile = pkgs.runCommand "polars-node.toml" { nativeBuildInputs = [ cfg.package ]; } ''
    polars-node check-config --no-resolve ${rendered} > /dev/null
    cp ${rendered} $out
  '';
in
{
  options.services.polars = {
    package = mkOption {
      type = types.package;
      default = pkgs.polars-node or (throw "services.polars.package: add the polars-node overlay or set the package");
      defaultText = literalExpression "pkgs.polars-node";
      description = "The polars-node package.";
    };
    clusterId = mkOption {
      type = types.str;
      default = "polars-onprem";
      description = "Cluster name, the same on every node.";
    };
    instanceId = mkOption {
      type = types.str;
      default = config.networking.hostName;
      defaultText = literalExpression "config.networking.hostName";
      description = "This node's name.";
    };
    memoryLimit = mkOption {
      type = types.nullOr types.ints.positive;
      default = null;
      example = 17179869184;
      description = "Memory limit of query execution in bytes (the unit gets Delegate=yes for it).";
    };
    tokenFile = mkOption {
      type = types.nullOr (types.strMatching "/.*");
      default = null;
      example = "/etc/polars/cluster-token";
      description = ''
        A file holding the cluster token (one line, at least 16 characters, the same on every
        node; `openssl rand -hex 32`): the internal ports then admit only calls that carry it.
        A path as a string, outside the Nix store: the unit reads it with LoadCredential=.
      '';
    };
    tls = mkOption {
      type = types.nullOr (types.submodule {
        options = {
          caFile = mkOption {
            type = types.strMatching "/.*";
            example = "/etc/polars/cluster-ca.pem";
            description = "The cluster CA's certificate (PEM): the only issuer trusted for other nodes.";
          };
          certificateFile = mkOption {
            type = types.strMatching "/.*";
            example = "/etc/polars/node.pem";
            description = "This node's certificate (PEM), signed by the CA, naming the host the others reach it at.";
          };
          keyFile = mkOption {
            type = types.strMatching "/.*";
            example = "/etc/polars/node.key";
            description = "This node's private key (PEM), outside the Nix store.";
          };
        };
      });
      default = null;
      description = ''
        Mutual TLS between the nodes under a cluster CA: the internal ports take only
        connections with a certificate the CA signed. Paths as strings; the unit reads the
        files with LoadCredential=.
      '';
    };
    leader = {
      instanceId = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "scheduler";
        description = "The scheduler's instanceId.";
      };
      schedulerAddress = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "10.0.0.2:5050";
        description = "Where workers register: the scheduler's worker service (or its client service).";
      };
      observatoryAddress = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "10.0.0.2:5049";
        description = "The observatory's OTLP receiver, for nodes with monitoring.";
      };
    };
    settings = mkOption {
      type = (pkgs.formats.toml { }).type;
      default = { };
      example = literalExpression ''{ scheduler.lost_after_missed_heartbeats = 5; }'';
      description = ''
        Further polars-node settings (`polars-node default-config` lists them all), merged over
        what the typed options produce.
      '';
    };
    socketActivation = mkOption {
      type = types.bool;
      default = false;
      description = "Listen through systemd socket units (one per service, named by FileDescriptorName=).";
    };
    watchdogSec = mkOption {
      type = types.str;
      default = "30s";
      description = "systemd watchdog interval; the node pings at half of it.";
    };

    scheduler = {
      enable = mkEnableOption "the polars-node scheduler (client service 5051, worker service 5050)";
      clientService = serviceOptions "scheduler client service" 5051;
      workerService = serviceOptions "scheduler worker service" 5050;
      nWorkers = mkOption {
        type = types.nullOr types.ints.positive;
        default = null;
        description = "Report ready only once this many workers registered.";
      };
    };
    worker = {
      enable = mkEnableOption "a polars-node worker (task service 5052, shuffle service 5053)";
      taskService = serviceOptions "worker task service" 5052;
      shuffleService = serviceOptions "worker shuffle service" 5053;
      heartbeatPeriod = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "5s";
        description = "How often the worker tells the scheduler it is alive.";
      };
    };
    observatory = {
      enable = mkEnableOption "the polars-node observatory (OTLP 5049, REST API and dashboard 3001)";
      otlpService = serviceOptions "observatory OTLP receiver" 5049;
      restService = serviceOptions "observatory REST API and dashboard" 3001;
    };
    monitoring = {
      enable = mkOption {
        type = types.nullOr types.bool;
        default = null;
        description = ''
          Send this node's traces and host metrics to the observatory. Unset: on when this host
          runs the observatory or `leader.observatoryAddress` is set.
        '';
      };
      hostMetrics = mkOption {
        type = types.bool;
        default = true;
        description = "Send CPU and memory metrics (with monitoring on).";
      };
    };
  };

  config = mkIf (cfg.scheduler.enable || cfg.worker.enable || cfg.observatory.enable) {
    assertions = [
      {
        assertion = cfg.scheduler.enable || cfg.leader.schedulerAddress != null;
        message = "services.polars: a node without the scheduler needs services.polars.leader.schedulerAddress";
      }
      {
        assertion = cfg.tokenFile == null || !(lib.hasPrefix builtins.storeDir cfg.tokenFile);
        message = "services.polars.tokenFile: a secret must not be in the Nix store (world-readable); name a file outside it";
      }
      {
        assertion = cfg.tls == null || !(lib.hasPrefix builtins.storeDir cfg.tls.keyFile);
        message = "services.polars.tls.keyFile: a private key must not be in the Nix store (world-readable); name a file outside it";
      }
    ];

    networking.firewall.allowedTCPPorts = map portOf (builtins.filter (s: s.opts.openFirewall) enabledServices);
    # Workers send their heartbeats as datagrams to the worker service's port.
    networking.firewall.allowedUDPPorts =
      map portOf (builtins.filter (s: s.opts.openFirewall && s.name == "worker") enabledServices);

    environment.etc."polars/node.toml".source = configFile;
    # `polars-node workers`, `check-config` for operators.
    environment.systemPackages = [ cfg.package ];

    systemd.services.polars-node = {
      description = "polars-node (${lib.concatMapStringsSep ", " (s: s.name) enabledServices})";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      # Interface-named addresses are read at start: wait for those devices.
      after = [ "network-online.target" ] ++ deviceUnits;
      bindsTo = deviceUnits;
      requires = lib.optionals cfg.socketActivation (map (s: "polars-node-${s.name}.socket") enabledServices);
      restartTriggers = [ configFile ];
      environment.PLC_LOG_LEVEL = "info";
      serviceConfig = {
        Type = "notify";
        NotifyAccess = "main";
        ExecStart = "${cfg.package}/bin/polars-node service --config-path ${configFile}";
        WatchdogSec = cfg.watchdogSec;
        Restart = "on-failure";
        RestartSec = "2s";
        TimeoutStopSec = "60s";
        DynamicUser = true;
        StateDirectory = "polars";
        WorkingDirectory = "/var/lib/polars";
        Environment = [ "POLARS_TEMP_DIR=/var/lib/polars/tmp" ];
        Delegate = cfg.memoryLimit != null;
        LoadCredential = lib.optional (cfg.tokenFile != null) "cluster-token:${cfg.tokenFile}"
          ++ lib.optionals (cfg.tls != null) [
          "cluster-ca:${cfg.tls.caFile}"
          "node-certificate:${cfg.tls.certificateFile}"
          "node-key:${cfg.tls.keyFile}"
        ];
        # Hardening.
        CapabilityBoundingSet = "";
        AmbientCapabilities = "";
        NoNewPrivileges = true;
        ProtectSystem = "strict";
        ProtectHome = true;
        PrivateTmp = true;
        PrivateDevices = true;
        PrivateUsers = true;
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectKernelLogs = true;
        ProtectControlGroups = cfg.memoryLimit == null;
        ProtectClock = true;
        ProtectHostname = true;
        ProtectProc = "invisible";
        RestrictNamespaces = true;
        RestrictRealtime = true;
        RestrictSUIDSGID = true;
        LockPersonality = true;
        MemoryDenyWriteExecute = true;
        # AF_NETLINK: reading interface addresses.
        RestrictAddressFamilies = [ "AF_INET" "AF_INET6" "AF_UNIX" "AF_NETLINK" ];
        SystemCallArchitectures = "native";
        SystemCallFilter = [ "@system-service" "~@privileged" "~@resources" ];
        UMask = "0077";
      };
    };

    systemd.sockets = mkIf cfg.socketActivation (lib.listToAttrs (map
      (s: lib.nameValuePair "polars-node-${s.name}" {
        wantedBy = [ "sockets.target" ];
        after = deviceUnits;
        socketConfig = rec {
          ListenStream =
            if builtins.isString s.opts.bind && !(isInterface s.opts.bind) then s.opts.bind else toString (portOf s);
          # The scheduler's heartbeat datagrams, on the worker service's address.
          ListenDatagram = lib.mkIf (s.name == "worker") ListenStream;
          BindToDevice = lib.mkIf (isInterface s.opts.bind) s.opts.bind;
          FileDescriptorName = s.name;
          Service = "polars-node.service";
        };
      })
      enabledServices));
  };
}
