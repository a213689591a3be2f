//! The schema as data (field names, docs, sub-sections) for `default-config` and for
//! suggesting the nearest valid key; and the documented rendering of a configuration.

use super::*;

// ---------------------------------------------------------------------------------------------
// The schema as data: field names, their docs and sub-sections, for `default-config` and for
// suggesting the nearest valid key.

/// One table of the configuration.
#[derive(Clone, Copy)]
pub struct Section {
    pub fields: &'static [&'static str],
    pub docs: &'static [&'static str],
    /// The section a field opens, if the field is a table of keys (not a value).
    pub child: fn(&str) -> Option<Section>,
}

pub(super) trait Schema: DocumentedFields {
    fn child(_field: &str) -> Option<Section> {
        None
    }
    fn section() -> Section {
        Section { fields: Self::FIELD_NAMES, docs: Self::FIELD_DOCS, child: Self::child }
    }
}

impl Schema for Config {
    fn child(field: &str) -> Option<Section> {
        Some(match field {
            "scheduler" => SchedulerConfig::section(),
            "worker" => WorkerConfig::section(),
            "observatory" => ObservatoryConfig::section(),
            "monitoring" => MonitoringConfig::section(),
            "static_leader" => StaticLeaderConfig::section(),
            "internal" => InternalConfig::section(),
            "scaling" => ScalingConfig::section(),
            "lineage" => LineageConfig::section(),
            _ => return None,
        })
    }
}
impl Schema for SchedulerConfig {
    fn child(field: &str) -> Option<Section> {
        Some(match field {
            "client_service" => SecuredServiceConfig::<ClientPort>::section(),
            "worker_service" => ServiceConfig::<WorkerServicePort>::section(),
            "checkpoint" => CheckpointConfig::section(),
            _ => return None,
        })
    }
}
impl Schema for WorkerConfig {
    fn child(field: &str) -> Option<Section> {
        Some(match field {
            "task_service" => ServiceConfig::<TaskPort>::section(),
            "shuffle_service" => ServiceConfig::<ShufflePort>::section(),
            _ => return None,
        })
    }
}
impl Schema for ObservatoryConfig {
    fn child(field: &str) -> Option<Section> {
        Some(match field {
            "service" => ServiceConfig::<OtlpPort>::section(),
            "rest_api" => RestApiConfig::section(),
            _ => return None,
        })
    }
}
impl Schema for RestApiConfig {
    fn child(field: &str) -> Option<Section> {
        (field == "service").then(SecuredServiceConfig::<RestPort>::section)
    }
}
impl Schema for MonitoringConfig {
    fn child(field: &str) -> Option<Section> {
        (field == "host_metrics").then(HostMetricsConfig::section)
    }
}
impl Schema for InternalConfig {
    fn child(field: &str) -> Option<Section> {
        (field == "tls").then(InternalTlsConfig::section)
    }
}
impl Schema for InternalTlsConfig {}
impl Schema for ScalingConfig {
    fn child(field: &str) -> Option<Section> {
        (field == "rest").then(ScalingRestConfig::section)
    }
}
impl Schema for ScalingRestConfig {}
impl Schema for LineageConfig {
    fn child(field: &str) -> Option<Section> {
        (field == "transport").then(LineageTransportConfig::section)
    }
}
impl Schema for LineageTransportConfig {
    fn child(field: &str) -> Option<Section> {
        Some(match field {
            "http" => LineageHttpConfig::section(),
            "stdio" => LineageStdioConfig::section(),
            _ => return None,
        })
    }
}
impl Schema for LineageHttpConfig {}
impl Schema for LineageStdioConfig {}
impl Schema for StaticLeaderConfig {
    fn child(field: &str) -> Option<Section> {
        matches!(field, "scheduler_service" | "observatory_service").then(PublicAddrConfig::section)
    }
}
impl<P: DefaultPort> Schema for SecuredServiceConfig<P> {
    fn child(field: &str) -> Option<Section> {
        Some(match field {
            "connection" => ConnectionConfig::section(),
            "auth" => AuthConfig::section(),
            _ => return None,
        })
    }
}
impl Schema for ConnectionConfig {
    fn child(field: &str) -> Option<Section> {
        (field == "tls").then(TlsConfig::section)
    }
}
impl Schema for AuthConfig {
    fn child(field: &str) -> Option<Section> {
        (field == "jwks").then(JwksConfig::section)
    }
}
impl<P: DefaultPort> Schema for ServiceConfig<P> {}
impl Schema for HostMetricsConfig {}
impl Schema for CheckpointConfig {}
impl Schema for PublicAddrConfig {}
impl Schema for TlsConfig {}
impl Schema for JwksConfig {}

/// The top of the schema.
pub fn schema() -> Section {
    Config::section()
}

/// Every dotted key path of the schema (sections and leaves).
pub fn all_key_paths() -> Vec<String> {
    fn walk(section: Section, prefix: &str, out: &mut Vec<String>) {
        for field in section.fields {
            let path = if prefix.is_empty() { field.to_string() } else { format!("{prefix}.{field}") };
            out.push(path.clone());
            if let Some(child) = (section.child)(field) {
                walk(child, &path, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(schema(), "", &mut out);
    out
}

// ---------------------------------------------------------------------------------------------
// `default-config`: every key with its default and its documentation.

/// A complete, commented TOML document of the defaults. Keys without a default are shown
/// commented out.
/// A role `default-config --role` turns on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    Scheduler,
    Worker,
    Observatory,
    /// Scheduler, worker and observatory in one node.
    All,
}

/// Every key with its default, documented; with `roles`, a node that runs as printed: those
/// roles on, their services on loopback (one machine), monitoring on where the observatory is.
pub fn default_config_toml(roles: &[Role]) -> String {
    // The real default is the host name, which differs per machine.
    let mut config = Config { instance_id: "polars-node".into(), ..Config::default() };
    let on = |role| roles.iter().any(|r| *r == role || *r == Role::All);
    let loopback = |a: &Address| Address::ip(std::net::Ipv4Addr::LOCALHOST.into(), a.port);
    if on(Role::Scheduler) {
        let s = &mut config.scheduler;
        s.enabled = true;
        s.client_service.bind_addr = loopback(&s.client_service.bind_addr);
        s.worker_service.bind_addr = loopback(&s.worker_service.bind_addr);
    }
    if on(Role::Worker) {
        let w = &mut config.worker;
        w.enabled = true;
        w.task_service.bind_addr = loopback(&w.task_service.bind_addr);
        w.shuffle_service.bind_addr = loopback(&w.shuffle_service.bind_addr);
    }
    // Every node without the scheduler must know where it is (here: on this machine).
    if !roles.is_empty() && !on(Role::Scheduler) {
        config.static_leader.scheduler_service.public_addr =
            Some(loopback(&SchedulerConfig::default().worker_service.bind_addr));
    }
    if on(Role::Observatory) {
        let o = &mut config.observatory;
        o.enabled = true;
        o.service.bind_addr = loopback(&o.service.bind_addr);
        o.rest_api.service.bind_addr = loopback(&o.rest_api.service.bind_addr);
        config.monitoring.enabled = true;
    }
    let doc = toml_edit::ser::to_document(&config).expect("defaults serialize");
    let mut out = String::from(match roles.is_empty() {
        true => {
            "# polars-node configuration: every key with its default.\n\
             # No role is on: `polars-node default-config --role all` prints a node that runs as is.\n\
             # Any key can be overridden by an environment variable PC_CUBLET__section__key.\n"
        }
        false => {
            "# polars-node configuration: every key with its default, and the chosen roles on,\n\
             # their services on loopback. For a cluster of several machines, bind to the\n\
             # machine's address (or 0.0.0.0 with a public_addr) and point static_leader at the\n\
             # scheduler and the observatory.\n\
             # Any key can be overridden by an environment variable PC_CUBLET__section__key.\n"
        }
    });
    render_section(&mut out, "", schema(), Some(doc.as_table()));
    out
}

/// Renders one section; `table` is `None` for an optional section without a default, which is
/// then shown commented out, keys and sub-sections alike.
fn render_section(out: &mut String, header: &str, section: Section, table: Option<&dyn toml_edit::TableLike>) {
    let mut subsections = Vec::new();
    out.push('\n');
    for (field, doc) in section.fields.iter().zip(section.docs) {
        if let Some(child) = (section.child)(field) {
            subsections.push((*field, *doc, child));
            continue;
        }
        for line in doc.lines() {
            out.push_str(&format!("# {}\n", line.trim()));
        }
        match table.and_then(|t| t.get(field)).and_then(|item| item.clone().into_value().ok()) {
            Some(mut value) => {
                value.decor_mut().clear();
                out.push_str(&format!("{field} = {value}\n"));
            }
            None => out.push_str(&format!("# {field} =\n")),
        }
    }
    for (field, doc, child) in subsections {
        let name = if header.is_empty() { field.to_string() } else { format!("{header}.{field}") };
        out.push('\n');
        for line in doc.lines() {
            out.push_str(&format!("# {}\n", line.trim()));
        }
        let inner = table.and_then(|t| t.get(field)).and_then(|i| i.as_table_like());
        out.push_str(&format!("{}[{name}]", if inner.is_some() { "" } else { "# " }));
        render_section(out, &name, child, inner);
    }
}
