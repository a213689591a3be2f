//! Service addresses as written in the configuration, and their resolution at start.
//!
//! Forms accepted for a `bind_addr` or `public_addr`:
//! strings `"ip:port"`, `":port"` (all interfaces), `"[v6]:port"`, `"hostname:port"`; tables
//! `{ port }`, `{ ip, port }`, `{ hostname, port }` and `{ interface, port, family }`.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Ipv4,
    Ipv6,
}

/// The host part of an address, before resolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// `":5051"` or `{ port = 5051 }`: every IPv4 interface.
    Any,
    Ip(IpAddr),
    /// Resolved through the system resolver once, at start.
    Name(String),
    /// The address of a network interface, read at start (getifaddrs).
    Interface {
        name: String,
        family: Family,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    pub host: Host,
    pub port: u16,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AddressError {
    #[error("`{0}` is not an address: expected \"ip:port\", \":port\", \"[v6]:port\" or \"hostname:port\"")]
    Malformed(String),
    #[error("hostname `{host}` does not resolve ({reason}); use an IP address or fix the name")]
    Unresolvable { host: String, reason: String },
    #[error("network interface `{name}` does not exist on this host (interfaces: {available})")]
    NoSuchInterface { name: String, available: String },
    #[error("network interface `{name}` has no {family} address; give it one or set family = \"{other}\"")]
    NoAddressOfFamily { name: String, family: &'static str, other: &'static str },
    #[error("cannot list network interfaces: {0}")]
    Interfaces(String),
}

impl Address {
    pub const fn any(port: u16) -> Self {
        Address { host: Host::Any, port }
    }

    pub fn ip(ip: IpAddr, port: u16) -> Self {
        Address { host: Host::Ip(ip), port }
    }

    /// Parses the string forms.
    pub fn parse(text: &str) -> Result<Self, AddressError> {
        let malformed = || AddressError::Malformed(text.to_string());
        if let Ok(sa) = text.parse::<SocketAddr>() {
            return Ok(Address::ip(sa.ip(), sa.port()));
        }
        let (host, port) = text.rsplit_once(':').ok_or_else(malformed)?;
        let port: u16 = port.parse().map_err(|_| malformed())?;
        if host.is_empty() {
            return Ok(Address::any(port));
        }
        if host.starts_with('[') || host.contains(':') || !valid_hostname(host) {
            return Err(malformed());
        }
        Ok(Address { host: Host::Name(host.to_string()), port })
    }

    /// The host part as written (names and interfaces compare by this).
    pub fn host_key(&self) -> String {
        match &self.host {
            Host::Any => String::new(),
            Host::Ip(ip) => ip.to_string(),
            Host::Name(name) => format!("name:{name}"),
            Host::Interface { name, family } => format!("interface:{name}:{family:?}"),
        }
    }

    /// Whether this is the "every interface" address (before resolving names).
    pub fn is_unspecified(&self) -> bool {
        match &self.host {
            Host::Any => true,
            Host::Ip(ip) => ip.is_unspecified(),
            _ => false,
        }
    }

    /// Resolves to one socket address: names through the resolver, interfaces through
    /// getifaddrs. IPv4 is preferred when a name has both.
    pub fn resolve(&self) -> Result<SocketAddr, AddressError> {
        let ip = match &self.host {
            Host::Any => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            Host::Ip(ip) => *ip,
            Host::Name(name) => {
                let found: Vec<SocketAddr> = (name.as_str(), self.port)
                    .to_socket_addrs()
                    .map_err(|e| AddressError::Unresolvable { host: name.clone(), reason: e.to_string() })?
                    .collect();
                let pick = found.iter().find(|a| a.is_ipv4()).or(found.first());
                match pick {
                    Some(addr) => addr.ip(),
                    None => {
                        return Err(AddressError::Unresolvable { host: name.clone(), reason: "no addresses".into() });
                    }
                }
            }
            Host::Interface { name, family } => return interface_address(name, *family, self.port),
        };
        Ok(SocketAddr::new(ip, self.port))
    }
}

fn valid_hostname(host: &str) -> bool {
    host.split('.')
        .all(|label| !label.is_empty() && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'))
}

/// The address of `name` in `family`: for IPv6, a global address is preferred over a
/// link-local one (which then carries the interface's scope id).
fn interface_address(name: &str, family: Family, port: u16) -> Result<SocketAddr, AddressError> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| AddressError::Interfaces(e.to_string()))?;
    let mut seen = std::collections::BTreeSet::new();
    let mut v4: Option<Ipv4Addr> = None;
    let mut v6: Vec<(Ipv6Addr, u32)> = Vec::new();
    for ifa in addrs {
        seen.insert(ifa.interface_name.clone());
        if ifa.interface_name != name {
            continue;
        }
        let Some(storage) = ifa.address else { continue };
        if let Some(sin) = storage.as_sockaddr_in() {
            v4.get_or_insert(sin.ip());
        } else if let Some(sin6) = storage.as_sockaddr_in6() {
            v6.push((sin6.ip(), sin6.scope_id()));
        }
    }
    if !seen.contains(name) {
        let available = seen.into_iter().collect::<Vec<_>>().join(", ");
        return Err(AddressError::NoSuchInterface { name: name.to_string(), available });
    }
    let missing = |family: &'static str, other: &'static str| AddressError::NoAddressOfFamily {
        name: name.to_string(),
        family,
        other,
    };
    match family {
        Family::Ipv4 => v4.map(|ip| SocketAddr::new(ip.into(), port)).ok_or_else(|| missing("IPv4", "ipv6")),
        Family::Ipv6 => {
            let link_local = |ip: &Ipv6Addr| (ip.segments()[0] & 0xffc0) == 0xfe80;
            let chosen = v6.iter().find(|(ip, _)| !link_local(ip)).or(v6.first());
            chosen
                .map(|(ip, scope)| {
                    let scope = if link_local(ip) { *scope } else { 0 };
                    SocketAddr::V6(std::net::SocketAddrV6::new(*ip, port, 0, scope))
                })
                .ok_or_else(|| missing("IPv6", "ipv4"))
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::Any => write!(f, ":{}", self.port),
            Host::Ip(ip) => write!(f, "{}", SocketAddr::new(*ip, self.port)),
            Host::Name(name) => write!(f, "{name}:{}", self.port),
            Host::Interface { name, family } => {
                let family = match family {
                    Family::Ipv4 => "ipv4",
                    Family::Ipv6 => "ipv6",
                };
                write!(f, "{{ interface = \"{name}\", port = {}, family = \"{family}\" }}", self.port)
            }
        }
    }
}

impl Serialize for Address {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match &self.host {
            Host::Interface { name, family } => {
                let mut map = s.serialize_map(Some(3))?;
                map.serialize_entry("interface", name)?;
                map.serialize_entry("port", &self.port)?;
                map.serialize_entry("family", family)?;
                map.end()
            }
            _ => s.collect_str(self),
        }
    }
}

/// The table form; exactly one of `ip`, `hostname`, `interface` (or none: every interface).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddressTable {
    port: u16,
    ip: Option<IpAddr>,
    hostname: Option<String>,
    interface: Option<String>,
    family: Option<Family>,
}

impl<'de> Deserialize<'de> for Address {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct AddressVisitor;
        impl<'de> Visitor<'de> for AddressVisitor {
            type Value = Address;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an address: \"ip:port\", \":port\", \"hostname:port\" or a table { ip | hostname | interface, port }")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Address, E> {
                Address::parse(v).map_err(E::custom)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Address, A::Error> {
                let t = AddressTable::deserialize(de::value::MapAccessDeserializer::new(map))?;
                let given = [t.ip.is_some(), t.hostname.is_some(), t.interface.is_some()];
                if given.iter().filter(|g| **g).count() > 1 {
                    return Err(de::Error::custom("give only one of `ip`, `hostname` and `interface`"));
                }
                if t.family.is_some() && t.interface.is_none() {
                    return Err(de::Error::custom("`family` applies only with `interface`"));
                }
                let host = match (t.ip, t.hostname, t.interface) {
                    (Some(ip), _, _) => Host::Ip(ip),
                    (_, Some(name), _) if valid_hostname(&name) => Host::Name(name),
                    (_, Some(name), _) => return Err(de::Error::custom(format!("`{name}` is not a valid hostname"))),
                    (_, _, Some(name)) => Host::Interface { name, family: t.family.unwrap_or(Family::Ipv4) },
                    _ => Host::Any,
                };
                Ok(Address { host, port: t.port })
            }
        }
        d.deserialize_any(AddressVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_toml(value: &str) -> Result<Address, String> {
        #[derive(Deserialize)]
        struct Holder {
            a: Address,
        }
        toml_edit::de::from_str::<Holder>(&format!("a = {value}")).map(|h| h.a).map_err(|e| e.message().to_string())
    }

    #[test]
    fn string_forms() {
        assert_eq!(from_toml("\"10.0.0.5:4005\"").unwrap(), Address::ip("10.0.0.5".parse().unwrap(), 4005));
        assert_eq!(from_toml("\":5051\"").unwrap(), Address::any(5051));
        assert_eq!(from_toml("\"[::]:5051\"").unwrap(), Address::ip("::".parse().unwrap(), 5051));
        assert_eq!(from_toml("\"[fc00:1::2]:3901\"").unwrap(), Address::ip("fc00:1::2".parse().unwrap(), 3901));
        assert_eq!(
            from_toml("\"scheduler.example:5050\"").unwrap(),
            Address { host: Host::Name("scheduler.example".into()), port: 5050 }
        );
    }

    #[test]
    fn table_forms() {
        assert_eq!(from_toml("{ port = 4005 }").unwrap(), Address::any(4005));
        assert_eq!(
            from_toml("{ ip = \"10.0.0.5\", port = 4005 }").unwrap(),
            Address::ip("10.0.0.5".parse().unwrap(), 4005)
        );
        assert_eq!(
            from_toml("{ hostname = \"localhost\", port = 1 }").unwrap(),
            Address { host: Host::Name("localhost".into()), port: 1 }
        );
        assert_eq!(
            from_toml("{ interface = \"eth1\", port = 4005 }").unwrap(),
            Address { host: Host::Interface { name: "eth1".into(), family: Family::Ipv4 }, port: 4005 }
        );
        assert_eq!(
            from_toml("{ interface = \"eth1\", port = 4005, family = \"ipv6\" }").unwrap(),
            Address { host: Host::Interface { name: "eth1".into(), family: Family::Ipv6 }, port: 4005 }
        );
    }

    #[test]
    fn malformed_forms_name_the_problem() {
        assert_eq!(
            from_toml("\"10.0.0.5\"").unwrap_err(),
            "`10.0.0.5` is not an address: expected \"ip:port\", \":port\", \"[v6]:port\" or \"hostname:port\""
        );
        assert!(from_toml("\"host:99999\"").unwrap_err().contains("is not an address"));
        assert!(from_toml("\"[::1:5051\"").unwrap_err().contains("is not an address"));
        assert_eq!(
            from_toml("{ ip = \"10.0.0.5\", interface = \"eth0\", port = 1 }").unwrap_err(),
            "give only one of `ip`, `hostname` and `interface`"
        );
        assert_eq!(
            from_toml("{ ip = \"10.0.0.5\", port = 1, family = \"ipv6\" }").unwrap_err(),
            "`family` applies only with `interface`"
        );
        assert!(from_toml("{ ip = \"10.0.0.5\", prot = 1 }").unwrap_err().contains("unknown field `prot`"));
        assert!(from_toml("5051").unwrap_err().contains("invalid type: integer `5051`, expected an address"));
    }

    #[test]
    fn resolves_ip_any_hostname_and_loopback_interface() {
        assert_eq!(Address::any(7).resolve().unwrap(), "0.0.0.0:7".parse().unwrap());
        assert_eq!(Address::parse("127.0.0.2:7").unwrap().resolve().unwrap(), "127.0.0.2:7".parse().unwrap());
        assert_eq!(Address::parse("localhost:7").unwrap().resolve().unwrap().port(), 7);
        assert!(Address::parse("localhost:7").unwrap().resolve().unwrap().ip().is_loopback());
        let lo = Address { host: Host::Interface { name: "lo".into(), family: Family::Ipv4 }, port: 9 };
        assert_eq!(lo.resolve().unwrap(), "127.0.0.1:9".parse().unwrap());
    }

    #[test]
    fn resolution_errors_are_clear() {
        let missing = Address { host: Host::Interface { name: "eth9-missing".into(), family: Family::Ipv4 }, port: 1 };
        let err = missing.resolve().unwrap_err().to_string();
        assert!(err.starts_with("network interface `eth9-missing` does not exist on this host (interfaces: "), "{err}");
        assert!(err.contains("lo"), "{err}");

        let bad = Address::parse("no-such-host.invalid:1").unwrap().resolve().unwrap_err().to_string();
        assert!(bad.starts_with("hostname `no-such-host.invalid` does not resolve ("), "{bad}");
    }

    #[test]
    fn interface_without_family_address() {
        // `lo` has ::1 unless IPv6 is disabled; whichever family it lacks must be reported clearly.
        let v6 = Address { host: Host::Interface { name: "lo".into(), family: Family::Ipv6 }, port: 1 };
        match v6.resolve() {
            Ok(addr) => assert_eq!(addr, "[::1]:1".parse().unwrap()),
            Err(e) => assert_eq!(
                e.to_string(),
                "network interface `lo` has no IPv6 address; give it one or set family = \"ipv4\""
            ),
        }
    }

    #[test]
    fn display_round_trips() {
        for text in ["10.0.0.5:4005", ":5051", "[::]:5051", "scheduler.example:5050"] {
            let a = Address::parse(text).unwrap();
            assert_eq!(a.to_string(), text);
            assert_eq!(Address::parse(&a.to_string()).unwrap(), a);
        }
    }
}
