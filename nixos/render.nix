# The pure part of the NixOS module: from the module's option values to polars-node's
# configuration, and from that to TOML text. Only `builtins`, so it evaluates without nixpkgs
# (CI renders example configurations with nix-instantiate and checks each with
# `polars-node check-config`).
let
  inherit (builtins)
    attrNames
    concatStringsSep
    filter
    foldl'
    hasAttr
    isAttrs
    isBool
    isFloat
    isInt
    isList
    isString
    match
    toJSON
    typeOf
    ;

  # `a // b`, recursively: `b` wins, tables merge.
  recursiveMerge =
    a: b:
    foldl'
      (
        acc: name:
        acc
        // {
          ${name} =
            if hasAttr name acc && isAttrs acc.${name} && isAttrs b.${name} then
              recursiveMerge acc.${name} b.${name}
            else
              b.${name};
        }
      )
      a
      (attrNames b);

  # Drops unset options (null) and the tables they leave empty, recursively.
  compact =
    set:
    foldl'
      (
        acc: name:
        let
          v = set.${name};
          kept = if isAttrs v then compact v else v;
        in
        if v == null || (isAttrs v && kept == { } && v != { }) then acc else acc // { ${name} = kept; }
      )
      { }
      (attrNames set);

  # An address option: a port (every interface), "host:port" (an address), an interface name
  # (no colon: its address is read at start), or a table passed through.
  address =
    defaultPort: value:
    if value == null then
      null
    else if isInt value then
      { port = value; }
    else if isString value && match ".*:.*" value != null then
      value
    else if isString value then
      {
        interface = value;
        port = defaultPort;
      }
    else if isAttrs value then
      { port = defaultPort; } // value
    else
      throw "polars-node: an address is a port, \"host:port\" or an interface name, not a ${typeOf value}";

  # A service's bind and public address.
  service = defaultPort: svc: {
    bind_addr = address defaultPort (svc.bind or defaultPort);
    public_addr = address defaultPort (svc.public or null);
  };

  # The module's options (as plain values) -> polars-node settings.
  settingsFor =
    cfg:
    let
      scheduler = cfg.scheduler or { };
      worker = cfg.worker or { };
      observatory = cfg.observatory or { };
      leader = cfg.leader or { };
      monitoring = cfg.monitoring or { };
      enabled = role: role.enable or false;
      # On by default wherever the observatory is known: on this host or at leader.observatoryAddress.
      monitored =
        if (monitoring.enable or null) != null then
          monitoring.enable
        else
          enabled observatory || (leader.observatoryAddress or null) != null;
    in
    compact (
      recursiveMerge
        {
          instance_id = cfg.instanceId or null;
          cluster_id = cfg.clusterId or "polars-onprem";
          memory_limit = cfg.memoryLimit or null;
          # The module hands the token file to the unit with LoadCredential= (never the store).
          internal =
            let
              credentials = "/run/credentials/polars-node.service";
            in
            if (cfg.tokenFile or null) != null || (cfg.tls or null) != null then
              {
                token_file = if (cfg.tokenFile or null) != null then "${credentials}/cluster-token" else null;
                tls =
                  if (cfg.tls or null) != null then
                    {
                      ca_file = "${credentials}/cluster-ca";
                      certificate_key_file = "${credentials}/node-certificate";
                      private_key_file = "${credentials}/node-key";
                    }
                  else
                    null;
              }
            else
              null;
          scheduler =
            if enabled scheduler then
              {
                enabled = true;
                client_service = service 5051 (scheduler.clientService or { });
                worker_service = service 5050 (scheduler.workerService or { });
                n_workers = scheduler.nWorkers or null;
                anonymous_result_location.local.path = scheduler.resultPath or "/var/lib/polars/results";
                database_path = scheduler.databasePath or "/var/lib/polars/scheduler/queries.db";
              }
            else
              null;
          worker =
            if enabled worker then
              {
                enabled = true;
                task_service = service 5052 (worker.taskService or { });
                shuffle_service = service 5053 (worker.shuffleService or { });
                heartbeat_period = worker.heartbeatPeriod or null;
                shuffle_location.local.path = worker.shufflePath or "/var/lib/polars/shuffle";
              }
            else
              null;
          observatory =
            if enabled observatory then
              {
                enabled = true;
                service = service 5049 (observatory.otlpService or { });
                rest_api.service = service 3001 (observatory.restService or { });
                database_path = observatory.databasePath or "/var/lib/polars/observatory/data.db";
              }
            else
              null;
          monitoring =
            if monitored then
              {
                enabled = true;
                host_metrics.enabled = monitoring.hostMetrics or true;
              }
            else
              null;
          static_leader = {
            leader_instance_id = leader.instanceId or null;
            scheduler_service.public_addr = leader.schedulerAddress or null;
            observatory_service.public_addr = leader.observatoryAddress or null;
          };
        }
        (cfg.settings or { })
    );

  # --- TOML -------------------------------------------------------------------------------

  # JSON string escapes are valid in TOML basic strings.
  tomlValue =
    v:
    if isString v then
      toJSON v
    else if isBool v then
      (if v then "true" else "false")
    else if isInt v || isFloat v then
      toJSON v
    else if isList v then
      "[" + concatStringsSep ", " (map tomlValue v) + "]"
    else if isAttrs v then
      "{ " + concatStringsSep ", " (map (k: "${tomlKey k} = ${tomlValue v.${k}}") (attrNames v)) + " }"
    else
      throw "polars-node: cannot write a ${typeOf v} to TOML";

  tomlKey = k: if match "[A-Za-z0-9_-]+" k != null then k else toJSON k;

  # Leaves as `key = value`, tables as [sections]; address tables stay inline.
  isInlineTable = v: isAttrs v && (hasAttr "port" v || attrNames v == [ ]);

  section =
    path: set:
    let
      names = attrNames set;
      leaves = filter (k: !(isAttrs set.${k}) || isInlineTable set.${k}) names;
      tables = filter (k: isAttrs set.${k} && !(isInlineTable set.${k})) names;
      header = if path == [ ] || leaves == [ ] then "" else "\n[${concatStringsSep "." (map tomlKey path)}]\n";
      body = concatStringsSep "" (map (k: "${tomlKey k} = ${tomlValue set.${k}}\n") leaves);
    in
    header + body + concatStringsSep "" (map (k: section (path ++ [ k ]) set.${k}) tables);

  toTOML = set: "# Generated by the polars-node NixOS module.\n" + section [ ] set;
in
{
  inherit
    address
    settingsFor
    toTOML
    recursiveMerge
    ;
  # Options -> TOML text, in one step.
  render = cfg: toTOML (settingsFor cfg);
}
