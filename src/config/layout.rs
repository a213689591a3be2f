//! What this node runs and where: the configuration checked as a whole, with every address
//! resolved. Everything here happens before any socket is bound, so a node with a bad
//! configuration exits without having listened anywhere.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::config::Config;
use crate::config::address::{Address, Host};

/// The network services a node can run. The names are also the socket-activation descriptor
/// names (`FileDescriptorName=` of the socket unit).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ServiceKind {
    Client,
    Worker,
    Task,
    Shuffle,
    Otlp,
    Rest,
}

impl ServiceKind {
    pub const ALL: [ServiceKind; 6] = [Self::Client, Self::Worker, Self::Task, Self::Shuffle, Self::Otlp, Self::Rest];

    /// Socket-activation descriptor name.
    pub fn fd_name(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Worker => "worker",
            Self::Task => "task",
            Self::Shuffle => "shuffle",
            Self::Otlp => "otlp",
            Self::Rest => "rest",
        }
    }

    pub fn from_fd_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.fd_name() == name)
    }

    /// The configuration table of the service.
    pub fn key(self) -> &'static str {
        match self {
            Self::Client => "scheduler.client_service",
            Self::Worker => "scheduler.worker_service",
            Self::Task => "worker.task_service",
            Self::Shuffle => "worker.shuffle_service",
            Self::Otlp => "observatory.service",
            Self::Rest => "observatory.rest_api.service",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Self::Client => "scheduler client service",
            Self::Worker => "scheduler worker service",
            Self::Task => "worker task service",
            Self::Shuffle => "worker shuffle service",
            Self::Otlp => "observatory OTLP receiver",
            Self::Rest => "observatory REST API",
        }
    }

    /// Other nodes dial these, so they need a reachable advertised address.
    fn must_be_reachable(self) -> bool {
        matches!(self, Self::Task | Self::Shuffle)
    }
}

/// One service of this node, resolved.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub kind: ServiceKind,
    pub bind: SocketAddr,
    /// How other nodes reach the service, as configured (a name is re-resolved by the peer).
    pub public: Option<Address>,
}

impl Endpoint {
    /// The address to hand to others: `public_addr` when set, else the bind address (then
    /// necessarily specific: `layout` rejects unspecified binds without a public address for
    /// services others dial).
    pub fn advertised(&self) -> String {
        match &self.public {
            Some(public) => public.to_string(),
            None => dialable(self.bind).to_string(),
        }
    }
}

/// The address to dial a service of this same host that is bound to `bind`.
pub fn dialable(bind: SocketAddr) -> SocketAddr {
    match bind.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), bind.port()),
        IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::new(Ipv6Addr::LOCALHOST.into(), bind.port()),
        _ => bind,
    }
}

#[derive(Debug, Clone)]
pub struct Layout {
    pub instance_id: String,
    pub cluster_id: String,
    pub endpoints: Vec<Endpoint>,
    /// Where this node's worker registers (a worker node only).
    pub scheduler_addr: Option<String>,
    /// Where this node's monitoring sends traces and metrics (with `[monitoring]` only).
    pub observatory_addr: Option<String>,
}

impl Layout {
    pub fn endpoint(&self, kind: ServiceKind) -> Option<&Endpoint> {
        self.endpoints.iter().find(|e| e.kind == kind)
    }

    /// The effective configuration: resolved addresses and roles, for `check-config`.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# resolved by polars-node check-config");
        let _ = writeln!(out, "[resolved]");
        let _ = writeln!(out, "instance_id = {:?}", self.instance_id);
        let _ = writeln!(out, "cluster_id = {:?}", self.cluster_id);
        if let Some(s) = &self.scheduler_addr {
            let _ = writeln!(out, "registers_with = {s:?}");
        }
        if let Some(o) = &self.observatory_addr {
            let _ = writeln!(out, "sends_telemetry_to = {o:?}");
        }
        for e in &self.endpoints {
            let _ = writeln!(
                out,
                "\n[resolved.{}]\n# {}\nbind_addr = \"{}\"\nadvertised_addr = {:?}\nsocket_activation_name = {:?}",
                e.kind.key(),
                e.kind.title(),
                e.bind,
                e.advertised(),
                e.kind.fd_name()
            );
        }
        out
    }
}

/// Under a cluster CA, peers check that this node's certificate names the host they dial:
/// say so now when it does not name a service's public address (or its specific bind address).
fn check_certificate_names(
    tls: &crate::security::cluster::ClusterTls,
    endpoints: &[Endpoint],
    problems: &mut Vec<String>,
) {
    for endpoint in endpoints {
        if !matches!(endpoint.kind, ServiceKind::Worker | ServiceKind::Task | ServiceKind::Shuffle | ServiceKind::Otlp)
        {
            continue;
        }
        let host = match &endpoint.public {
            Some(Address { host: Host::Ip(ip), .. }) => ip.to_string(),
            Some(Address { host: Host::Name(name), .. }) => name.clone(),
            Some(_) => continue, // an interface's address is known at start only
            None if endpoint.bind.ip().is_unspecified() => continue,
            None => endpoint.bind.ip().to_string(),
        };
        if let Err(why) = tls.names(&host) {
            problems.push(format!(
                "internal.tls.certificate_key_file does not name {host}, where other nodes reach the {} (`{}`): {why}; \
                 give the certificate a subject alternative name for it",
                endpoint.kind.title(),
                match endpoint.public {
                    Some(_) => format!("{}.public_addr", endpoint.kind.key()),
                    None => format!("{}.bind_addr", endpoint.kind.key()),
                }
            ));
        }
    }
}

/// How addresses are resolved while planning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// Interfaces and host names are looked up on this host (starting a node).
    Here,
    /// Nothing is looked up: a configuration is checked for another host (e.g. at build time in
    /// the Nix sandbox, which has neither the interfaces nor DNS). Each distinct interface or
    /// name stands for one placeholder address, so port conflicts are still found.
    Offline,
}

/// Checks the configuration as a whole and resolves every address. All problems are returned.
pub fn plan(config: &Config) -> Result<Layout, Vec<String>> {
    plan_with(config, Resolution::Here)
}

pub fn plan_with(config: &Config, resolution: Resolution) -> Result<Layout, Vec<String>> {
    let mut placeholders: Vec<String> = Vec::new();
    let mut resolve = |addr: &Address| -> Result<SocketAddr, crate::config::address::AddressError> {
        match (&addr.host, resolution) {
            (Host::Name(_) | Host::Interface { .. }, Resolution::Offline) => {
                let key = addr.host_key();
                let index = placeholders.iter().position(|k| *k == key).unwrap_or_else(|| {
                    placeholders.push(key);
                    placeholders.len() - 1
                });
                // 198.18.0.0/15 is reserved for benchmarks: never a real host's address.
                Ok(SocketAddr::new(Ipv4Addr::new(198, 18, (index / 256) as u8, (index % 256) as u8).into(), addr.port))
            }
            _ => addr.resolve(),
        }
    };
    let mut problems = Vec::new();
    let mut services: Vec<(ServiceKind, &Address, Option<&Address>)> = Vec::new();
    let (s, w, o) = (&config.scheduler, &config.worker, &config.observatory);
    if s.enabled {
        services.push((ServiceKind::Client, &s.client_service.bind_addr, s.client_service.public_addr.as_ref()));
        services.push((ServiceKind::Worker, &s.worker_service.bind_addr, s.worker_service.public_addr.as_ref()));
    }
    if w.enabled {
        services.push((ServiceKind::Task, &w.task_service.bind_addr, w.task_service.public_addr.as_ref()));
        if w.shuffle_location.is_local() {
            services.push((ServiceKind::Shuffle, &w.shuffle_service.bind_addr, w.shuffle_service.public_addr.as_ref()));
        }
    }
    if o.enabled {
        services.push((ServiceKind::Otlp, &o.service.bind_addr, o.service.public_addr.as_ref()));
        if o.rest_api.enabled {
            services.push((ServiceKind::Rest, &o.rest_api.service.bind_addr, o.rest_api.service.public_addr.as_ref()));
        }
    }
    let any_role = !services.is_empty();
    if !any_role {
        problems
            .push("no role is enabled: set `enabled = true` under [scheduler], [worker] or [observatory]".to_string());
    }

    let mut endpoints = Vec::new();
    for (kind, bind, public) in services {
        let key = kind.key();
        let bind_resolved = match resolve(bind) {
            Ok(addr) => Some(addr),
            Err(e) => {
                problems.push(format!("`{key}.bind_addr`: {e}"));
                None
            }
        };
        if let Some(public) = public {
            check_public(&format!("{key}.public_addr"), public, &mut resolve, &mut problems);
        } else if kind.must_be_reachable() && bind.is_unspecified() {
            problems.push(format!(
                "`{key}.bind_addr` is {bind} (every interface), so other nodes cannot tell which address reaches the {}: \
                 set `{key}.public_addr` (e.g. \"10.0.0.5:{}\") or bind to a specific address",
                kind.title(),
                bind.port
            ));
        }
        if let Some(bind) = bind_resolved {
            endpoints.push(Endpoint { kind, bind, public: public.cloned() });
        }
    }

    // Two services of this node on one port.
    for (i, a) in endpoints.iter().enumerate() {
        for b in &endpoints[i + 1..] {
            if a.bind.port() == b.bind.port() && overlap(a.bind.ip(), b.bind.ip()) {
                problems.push(format!(
                    "`{}.bind_addr` ({}) and `{}.bind_addr` ({}) use the same port {}: give each service its own port",
                    a.kind.key(),
                    a.bind,
                    b.kind.key(),
                    b.bind,
                    a.bind.port()
                ));
            }
        }
    }

    let leader = &config.static_leader;
    if let Some(addr) = &leader.scheduler_service.public_addr {
        check_public("static_leader.scheduler_service.public_addr", addr, &mut resolve, &mut problems);
    }
    if let Some(addr) = &leader.observatory_service.public_addr {
        check_public("static_leader.observatory_service.public_addr", addr, &mut resolve, &mut problems);
    }

    // Where this node's worker registers: the leader's address, or this node's own scheduler.
    let local_scheduler =
        endpoints.iter().find(|e| e.kind == ServiceKind::Worker).map(|e| dialable(e.bind).to_string());
    let scheduler_addr = leader.scheduler_service.public_addr.as_ref().map(|a| a.to_string()).or(local_scheduler);
    if any_role && !s.enabled && scheduler_addr.is_none() {
        problems.push(
            "this node runs no scheduler, so it must know where the scheduler is: set \
             `static_leader.scheduler_service.public_addr` (the scheduler's worker service, port 5050, or its client service, port 5051)"
                .to_string(),
        );
    }
    let local_observatory =
        endpoints.iter().find(|e| e.kind == ServiceKind::Otlp).map(|e| dialable(e.bind).to_string());
    let observatory_addr = leader.observatory_service.public_addr.as_ref().map(|a| a.to_string()).or(local_observatory);
    if config.monitoring.enabled && observatory_addr.is_none() {
        problems.push(
            "[monitoring] is enabled, so this node must know where the observatory is: set \
             `static_leader.observatory_service.public_addr` (the observatory's OTLP receiver, port 5049) or disable monitoring"
                .to_string(),
        );
    }

    if w.enabled && w.heartbeat_period.0.is_zero() {
        problems.push("`worker.heartbeat_period` must be longer than zero".to_string());
    }
    if let Some(endpoint) = config.lineage.as_ref().and_then(|l| l.transport.http.as_ref()).map(|h| &h.endpoint)
        && !url::Url::parse(endpoint).is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
    {
        problems.push(format!("`lineage.transport.http.endpoint` = {endpoint:?} is not an http:// or https:// URL"));
    }
    let scaling = &config.scaling;
    if scaling.enabled && s.enabled {
        if s.default_workers_per_query.is_none() {
            problems.push(
                "`scaling.enabled` needs `scheduler.default_workers_per_query`: how many workers a query that names \
                 none asks the scaler for"
                    .to_string(),
            );
        }
        match url::Url::parse(&scaling.rest.uri) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {}
            _ => problems.push(format!(
                "`scaling.rest.uri` = {:?} is not an http:// or https:// URL of the scaler",
                scaling.rest.uri
            )),
        }
        if scaling.idle_timeout.0.is_zero() || scaling.registration_timeout.0.is_zero() {
            problems.push("`scaling.idle_timeout` and `scaling.registration_timeout` must be longer than zero".into());
        }
    }
    if s.max_task_attempts == 0 {
        problems.push("`scheduler.max_task_attempts` must be at least 1".to_string());
    }
    if s.lost_after_missed_heartbeats == 0 {
        problems.push("`scheduler.lost_after_missed_heartbeats` must be at least 1".to_string());
    }
    // The token and key files are runtime secrets: read here (before anything binds), not when
    // a configuration is checked offline (a Nix build has no secrets).
    if resolution == Resolution::Here {
        match crate::security::cluster::Credentials::load(&config.internal) {
            Ok(credentials) => {
                if let Some(tls) = &credentials.tls {
                    check_certificate_names(tls, &endpoints, &mut problems);
                }
            }
            Err(e) => problems.push(e),
        }
    }
    if s.checkpoint.as_ref().and_then(|c| c.period).is_some_and(|p| p.0.is_zero()) {
        problems.push(
            "`scheduler.checkpoint.period` must be longer than zero (remove it to turn checkpoints off)".to_string(),
        );
    }
    if config.memory_limit == Some(0) {
        problems.push("`memory_limit` is 0 bytes; give a limit in bytes or remove the key".to_string());
    }
    if config.instance_id.trim().is_empty() {
        problems.push("`instance_id` is empty; name this node".to_string());
    }

    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(Layout {
        instance_id: config.instance_id.clone(),
        cluster_id: config.cluster_id.clone(),
        endpoints,
        scheduler_addr: if w.enabled { scheduler_addr } else { None },
        observatory_addr: if config.monitoring.enabled { observatory_addr } else { None },
    })
}

/// A public address must name something others can connect to, and must resolve.
fn check_public(
    key: &str,
    addr: &Address,
    resolve: &mut impl FnMut(&Address) -> Result<SocketAddr, crate::config::address::AddressError>,
    problems: &mut Vec<String>,
) {
    if addr.is_unspecified() {
        problems.push(format!(
            "`{key}` is {addr}, which no other node can connect to: give the address others reach the service at (e.g. \"10.0.0.5:{}\")",
            addr.port
        ));
        return;
    }
    if let Err(e) = resolve(addr) {
        problems.push(format!("`{key}`: {e}"));
    }
}

/// Whether two bind IPs can collide on one port.
fn overlap(a: IpAddr, b: IpAddr) -> bool {
    a == b || (a.is_unspecified() && a.is_ipv4() == b.is_ipv4()) || (b.is_unspecified() && a.is_ipv4() == b.is_ipv4())
        // Linux binds [::] dual-stack by default, covering IPv4 too.
        || (a.is_unspecified() && a.is_ipv6()) || (b.is_unspecified() && b.is_ipv6())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load_str;

    fn plan_of(text: &str) -> Result<Layout, Vec<String>> {
        let config = load_str(text, "node.toml", Vec::new()).expect("parses").config;
        plan(&config)
    }

    const LEADER: &str = "[static_leader]\nscheduler_service.public_addr = \"127.0.0.1:5050\"\n";

    #[test]
    fn the_seed_worker_resolves() {
        let layout = plan_of(
            "[worker]\nenabled = true\ntask_service.bind_addr.port = 4005\ntask_service.public_addr = \"192.168.1.1:4005\"\n\
             shuffle_service.bind_addr.port = 4006\nshuffle_service.public_addr = \"192.168.1.1:4006\"\n\
             [static_leader]\nleader_instance_id = \"scheduler\"\nscheduler_service.public_addr = \"192.168.1.2:5051\"\n",
        )
        .unwrap();
        let task = layout.endpoint(ServiceKind::Task).unwrap();
        assert_eq!(task.bind, "0.0.0.0:4005".parse().unwrap());
        assert_eq!(task.advertised(), "192.168.1.1:4005");
        assert_eq!(layout.endpoint(ServiceKind::Shuffle).unwrap().advertised(), "192.168.1.1:4006");
        assert_eq!(layout.scheduler_addr.as_deref(), Some("192.168.1.2:5051"));
    }

    #[test]
    fn no_role_is_an_error() {
        assert_eq!(
            plan_of("").unwrap_err(),
            vec!["no role is enabled: set `enabled = true` under [scheduler], [worker] or [observatory]"]
        );
    }

    #[test]
    fn worker_service_on_every_interface_needs_a_public_addr() {
        let errors = plan_of(&format!("[worker]\nenabled = true\n{LEADER}")).unwrap_err();
        assert_eq!(
            errors,
            vec![
                "`worker.task_service.bind_addr` is :5052 (every interface), so other nodes cannot tell which address reaches the worker task service: set `worker.task_service.public_addr` (e.g. \"10.0.0.5:5052\") or bind to a specific address",
                "`worker.shuffle_service.bind_addr` is :5053 (every interface), so other nodes cannot tell which address reaches the worker shuffle service: set `worker.shuffle_service.public_addr` (e.g. \"10.0.0.5:5053\") or bind to a specific address",
            ]
        );
        // A specific bind address is its own public address.
        let layout = plan_of(&format!(
            "[worker]\nenabled = true\ntask_service.bind_addr = \"127.0.0.2:5052\"\nshuffle_service.bind_addr = \"127.0.0.2:5053\"\n{LEADER}"
        ))
        .unwrap();
        assert_eq!(layout.endpoint(ServiceKind::Task).unwrap().advertised(), "127.0.0.2:5052");
    }

    #[test]
    fn shuffle_service_only_with_local_storage() {
        let layout = plan_of(&format!(
            "[worker]\nenabled = true\ntask_service.bind_addr = \"127.0.0.2:5052\"\nshuffle_location.shared_filesystem.path = \"/mnt/s\"\n{LEADER}"
        ))
        .unwrap();
        assert!(layout.endpoint(ServiceKind::Shuffle).is_none());
    }

    #[test]
    fn non_leader_needs_the_scheduler_address() {
        let errors = plan_of("[worker]\nenabled = true\ntask_service.bind_addr = \"127.0.0.2:5052\"\nshuffle_service.bind_addr = \"127.0.0.2:5053\"\n").unwrap_err();
        assert_eq!(
            errors,
            vec![
                "this node runs no scheduler, so it must know where the scheduler is: set `static_leader.scheduler_service.public_addr` (the scheduler's worker service, port 5050, or its client service, port 5051)"
            ]
        );
        let errors = plan_of("[observatory]\nenabled = true\n").unwrap_err();
        assert_eq!(errors.len(), 1);
        assert!(errors[0].starts_with("this node runs no scheduler"));
    }

    #[test]
    fn a_worker_beside_its_scheduler_registers_locally() {
        let layout = plan_of("[scheduler]\nenabled = true\n[worker]\nenabled = true\ntask_service.bind_addr = \"127.0.0.1:5052\"\nshuffle_service.bind_addr = \"127.0.0.1:5053\"\n").unwrap();
        assert_eq!(layout.scheduler_addr.as_deref(), Some("127.0.0.1:5050"));
    }

    #[test]
    fn monitoring_needs_the_observatory_address() {
        let errors = plan_of("[scheduler]\nenabled = true\n[monitoring]\nenabled = true\n").unwrap_err();
        assert_eq!(
            errors,
            vec![
                "[monitoring] is enabled, so this node must know where the observatory is: set `static_leader.observatory_service.public_addr` (the observatory's OTLP receiver, port 5049) or disable monitoring"
            ]
        );
        let layout = plan_of("[scheduler]\nenabled = true\n[monitoring]\nenabled = true\n[static_leader]\nobservatory_service.public_addr = \"10.1.1.1:5049\"\n").unwrap();
        assert_eq!(layout.observatory_addr.as_deref(), Some("10.1.1.1:5049"));
    }

    #[test]
    fn two_services_on_one_port() {
        let errors =
            plan_of("[scheduler]\nenabled = true\nworker_service.bind_addr = \"127.0.0.1:5051\"\n").unwrap_err();
        assert_eq!(
            errors,
            vec![
                "`scheduler.client_service.bind_addr` (0.0.0.0:5051) and `scheduler.worker_service.bind_addr` (127.0.0.1:5051) use the same port 5051: give each service its own port"
            ]
        );
        // The same port on two distinct addresses is fine.
        plan_of("[scheduler]\nenabled = true\nclient_service.bind_addr = \"127.0.0.2:7000\"\nworker_service.bind_addr = \"127.0.0.3:7000\"\n").unwrap();
    }

    #[test]
    fn an_unspecified_public_addr_is_an_error() {
        let errors =
            plan_of("[scheduler]\nenabled = true\nclient_service.public_addr = \"0.0.0.0:5051\"\n").unwrap_err();
        assert_eq!(
            errors,
            vec![
                "`scheduler.client_service.public_addr` is 0.0.0.0:5051, which no other node can connect to: give the address others reach the service at (e.g. \"10.0.0.5:5051\")"
            ]
        );
        let errors =
            plan_of("[scheduler]\nenabled = true\n[static_leader]\nobservatory_service.public_addr = \":5049\"\n")
                .unwrap_err();
        assert!(
            errors[0].starts_with(
                "`static_leader.observatory_service.public_addr` is :5049, which no other node can connect to"
            ),
            "{errors:?}"
        );
    }

    #[test]
    fn unresolvable_addresses_are_listed_together() {
        let errors = plan_of(
            "[worker]\nenabled = true\ntask_service.bind_addr = { interface = \"nosuch0\", port = 4005 }\n\
             shuffle_service.bind_addr = \"127.0.0.1:4006\"\n\
             [static_leader]\nscheduler_service.public_addr = \"no-such-host.invalid:5050\"\n",
        )
        .unwrap_err();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(
            errors[0].starts_with(
                "`worker.task_service.bind_addr`: network interface `nosuch0` does not exist on this host"
            ),
            "{errors:?}"
        );
        assert!(
            errors[1].starts_with(
                "`static_leader.scheduler_service.public_addr`: hostname `no-such-host.invalid` does not resolve"
            ),
            "{errors:?}"
        );
    }

    #[test]
    fn an_interface_bind_resolves_to_its_address() {
        let layout = plan_of(&format!(
            "[worker]\nenabled = true\ntask_service.bind_addr = {{ interface = \"lo\", port = 4005 }}\nshuffle_service.bind_addr = {{ interface = \"lo\", port = 4006 }}\n{LEADER}"
        ))
        .unwrap();
        assert_eq!(layout.endpoint(ServiceKind::Task).unwrap().bind, "127.0.0.1:4005".parse().unwrap());
        assert_eq!(layout.endpoint(ServiceKind::Task).unwrap().advertised(), "127.0.0.1:4005");
    }

    #[test]
    fn offline_planning_resolves_nothing_but_still_finds_conflicts() {
        let config = load_str(
            "[worker]\nenabled = true\ntask_service.bind_addr = { interface = \"eth7\", port = 4005 }\n\
             shuffle_service.bind_addr = { interface = \"eth7\", port = 4006 }\n\
             [static_leader]\nscheduler_service.public_addr = \"scheduler.invalid:5050\"\n",
            "node.toml",
            Vec::new(),
        )
        .unwrap()
        .config;
        assert!(plan(&config).is_err(), "eth7 does not exist here");
        let layout = plan_with(&config, Resolution::Offline).unwrap();
        assert_eq!(
            layout.endpoint(ServiceKind::Task).unwrap().bind.ip(),
            layout.endpoint(ServiceKind::Shuffle).unwrap().bind.ip()
        );
        let mut clash = config.clone();
        clash.worker.shuffle_service.bind_addr.port = 4005;
        let errors = plan_with(&clash, Resolution::Offline).unwrap_err();
        assert!(errors[0].contains("use the same port 4005"), "{errors:?}");
    }

    #[test]
    fn numeric_rules() {
        let errors = plan_of(
            "memory_limit = 0\n[scheduler]\nenabled = true\nlost_after_missed_heartbeats = 0\ncheckpoint.period = 0\n",
        )
        .unwrap_err();
        assert_eq!(
            errors,
            vec![
                "`scheduler.lost_after_missed_heartbeats` must be at least 1",
                "`scheduler.checkpoint.period` must be longer than zero (remove it to turn checkpoints off)",
                "`memory_limit` is 0 bytes; give a limit in bytes or remove the key",
            ]
        );
    }
}
