//! The SSRF guard: where a webhook may be delivered.
//!
//! An endpoint's host is resolved once per connection and the connection
//! goes only to the resolved addresses the policy permits (the resolver
//! below is the client's only resolver: no second lookup, so a DNS answer
//! that changes between check and connect cannot redirect it). Literal IP
//! hosts are checked the same way. Refused unless an operator allows their
//! range (`--webhook-allow CIDR`): loopback, private, link-local (cloud
//! metadata lives at 169.254.169.254), CGNAT, unspecified, multicast,
//! documentation and reserved ranges, their IPv6 equivalents, and IPv4
//! addresses mapped into IPv6.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Which addresses webhooks may reach beyond the public internet.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddressPolicy {
    /// Ranges an operator allowed (e.g. NexaCloud's private network).
    pub allow: Vec<IpNet>,
}

/// The refused range an IPv4 address lies in.
fn refused_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    Some(match (a, b, c) {
        (0, _, _) => "unspecified",
        (127, _, _) => "loopback",
        (10, _, _) | (172, 16..=31, _) | (192, 168, _) => "private",
        (169, 254, _) => "link_local",
        (100, 64..=127, _) => "cgnat",
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => "documentation",
        (192, 0, 0) | (198, 18..=19, _) | (192, 88, 99) => "reserved",
        (224..=239, _, _) => "multicast",
        (240..=255, _, _) => "reserved",
        _ => return None,
    })
}

/// The IPv4 address an IPv6 one carries (mapped `::ffff:a.b.c.d`, NAT64
/// `64:ff9b::a.b.c.d`), if any.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let tail = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    let mapped = s[..5] == [0; 5] && s[5] == 0xffff;
    let nat64 = s[..6] == [0x64, 0xff9b, 0, 0, 0, 0];
    (mapped || nat64).then_some(tail)
}

/// The refused range an IPv6 address lies in.
fn refused_v6(ip: Ipv6Addr) -> Option<&'static str> {
    if let Some(v4) = embedded_v4(ip) {
        return refused_v4(v4);
    }
    let s = ip.segments();
    Some(match s[0] {
        _ if ip.is_unspecified() => "unspecified",
        _ if ip.is_loopback() => "loopback",
        0 if s[1..6] == [0; 5] => "reserved", // IPv4-compatible (deprecated)
        0x0100 if s[1..4] == [0; 3] => "reserved", // discard-only
        0x2001 if s[1] == 0x0db8 => "documentation",
        0x2001 if s[1] < 0x0200 => "reserved", // IETF protocol assignments (Teredo…)
        0x2002 => "reserved",                  // 6to4
        0x3fff if s[1] < 0x1000 => "documentation",
        x if x & 0xfe00 == 0xfc00 => "private", // unique local
        x if x & 0xffc0 == 0xfe80 => "link_local",
        x if x & 0xffc0 == 0xfec0 => "private", // site-local (deprecated)
        x if x & 0xff00 == 0xff00 => "multicast",
        _ => return None,
    })
}

impl AddressPolicy {
    /// From `--webhook-allow` values (CIDRs or single addresses).
    pub fn parse(ranges: &[String]) -> Result<Self, String> {
        let allow = ranges
            .iter()
            .flat_map(|r| r.split(','))
            .map(str::trim)
            .filter(|r| !r.is_empty())
            .map(|range| {
                range
                    .parse::<IpNet>()
                    .or_else(|_| range.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("not a CIDR range: {range}"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { allow })
    }

    /// Why `ip` is refused (the range's name), or none when it may be reached.
    pub fn refusal(&self, ip: IpAddr) -> Option<&'static str> {
        let (range, v4) = match ip {
            IpAddr::V4(v4) => (refused_v4(v4), Some(v4)),
            IpAddr::V6(v6) => (refused_v6(v6), embedded_v4(v6)),
        };
        let range = range?;
        let allowed = self
            .allow
            .iter()
            .any(|net| net.contains(&ip) || v4.is_some_and(|v4| net.contains(&IpAddr::V4(v4))));
        (!allowed).then_some(range)
    }

    /// The addresses among `addrs` that may be reached.
    pub fn permitted(&self, addrs: impl IntoIterator<Item = SocketAddr>) -> Vec<SocketAddr> {
        addrs
            .into_iter()
            .filter(|a| self.refusal(a.ip()).is_none())
            .collect()
    }
}

/// Why a URL cannot be delivered to (the 422's code, the attempt's error).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unreachable {
    /// The URL cannot be parsed or has no host.
    #[error("url_is_invalid")]
    Invalid,
    /// The host does not resolve.
    #[error("host_not_resolvable")]
    Unresolvable,
    /// An address it resolves to is in a refused range.
    #[error("address_not_allowed ({0})")]
    Refused(&'static str),
}

impl Unreachable {
    /// The code shown on `webhook_url`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Invalid => "url_is_invalid",
            Self::Unresolvable => "host_not_resolvable",
            Self::Refused(_) => "address_not_allowed",
        }
    }
}

/// Check an endpoint's URL when it is created or changed: every address
/// its host resolves to must be permitted.
pub async fn check_url(policy: &AddressPolicy, url: &str) -> Result<(), Unreachable> {
    let parsed = reqwest::Url::parse(url).map_err(|_| Unreachable::Invalid)?;
    let port = parsed.port_or_known_default().ok_or(Unreachable::Invalid)?;
    let addrs: Vec<SocketAddr> = match parsed.host().ok_or(Unreachable::Invalid)? {
        url::Host::Ipv4(ip) => vec![SocketAddr::new(ip.into(), port)],
        url::Host::Ipv6(ip) => vec![SocketAddr::new(ip.into(), port)],
        url::Host::Domain(host) => tokio::net::lookup_host((host, port))
            .await
            .map_err(|_| Unreachable::Unresolvable)?
            .collect(),
    };
    if addrs.is_empty() {
        return Err(Unreachable::Unresolvable);
    }
    match addrs.iter().find_map(|a| policy.refusal(a.ip())) {
        Some(range) => Err(Unreachable::Refused(range)),
        None => Ok(()),
    }
}

/// Check a URL whose host is a literal address at delivery (the resolver
/// is not asked for those).
pub fn check_literal(policy: &AddressPolicy, url: &reqwest::Url) -> Result<(), Unreachable> {
    let ip: IpAddr = match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.into(),
        Some(url::Host::Ipv6(ip)) => ip.into(),
        Some(url::Host::Domain(_)) => return Ok(()),
        None => return Err(Unreachable::Invalid),
    };
    match policy.refusal(ip) {
        Some(range) => Err(Unreachable::Refused(range)),
        None => Ok(()),
    }
}

/// The delivery client's resolver: resolves once and hands the connector
/// only the permitted addresses.
#[derive(Debug, Clone)]
pub struct GuardedResolver {
    policy: Arc<AddressPolicy>,
}

impl GuardedResolver {
    /// A resolver enforcing `policy`.
    pub fn new(policy: AddressPolicy) -> Self {
        Self {
            policy: Arc::new(policy),
        }
    }
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        Box::pin(async move {
            let resolved: Vec<SocketAddr> =
                tokio::net::lookup_host((name.as_str(), 0)).await?.collect();
            let refused = resolved.iter().find_map(|a| policy.refusal(a.ip()));
            let permitted = policy.permitted(resolved);
            if permitted.is_empty() {
                let range = refused.unwrap_or("none");
                return Err(Box::new(Unreachable::Refused(range)) as Box<_>);
            }
            Ok(Box::new(permitted.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(policy: &AddressPolicy, ip: &str) -> Option<&'static str> {
        policy.refusal(ip.parse().unwrap())
    }

    #[test]
    fn every_non_public_range_is_refused_by_default() {
        let policy = AddressPolicy::default();
        let cases = [
            ("127.0.0.1", "loopback"),
            ("10.1.2.3", "private"),
            ("172.16.0.1", "private"),
            ("172.31.255.255", "private"),
            ("192.168.1.1", "private"),
            ("169.254.169.254", "link_local"),
            ("100.64.0.1", "cgnat"),
            ("100.127.255.254", "cgnat"),
            ("0.0.0.0", "unspecified"),
            ("224.0.0.1", "multicast"),
            ("192.0.2.10", "documentation"),
            ("198.51.100.7", "documentation"),
            ("203.0.113.9", "documentation"),
            ("198.18.0.1", "reserved"),
            ("240.0.0.1", "reserved"),
            ("255.255.255.255", "reserved"),
            ("::1", "loopback"),
            ("::", "unspecified"),
            ("fc00::1", "private"),
            ("fd12:3456::1", "private"),
            ("fe80::1", "link_local"),
            ("ff02::1", "multicast"),
            ("2001:db8::1", "documentation"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:169.254.169.254", "link_local"),
            ("::ffff:10.0.0.1", "private"),
            ("64:ff9b::a9fe:a9fe", "link_local"),
            ("2002:7f00:1::", "reserved"),
        ];
        for (ip, range) in cases {
            assert_eq!(refusal(&policy, ip), Some(range), "{ip}");
        }
        for public in [
            "93.184.215.14",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert_eq!(refusal(&policy, public), None, "{public}");
        }
    }

    #[test]
    fn an_allowed_range_opens_exactly_that_range() {
        let policy = AddressPolicy::parse(&["10.20.0.0/16".into(), "127.0.0.1".into()]).unwrap();
        assert_eq!(refusal(&policy, "10.20.3.4"), None);
        assert_eq!(
            refusal(&policy, "::ffff:10.20.3.4"),
            None,
            "mapped form too"
        );
        assert_eq!(refusal(&policy, "10.21.0.1"), Some("private"));
        assert_eq!(refusal(&policy, "127.0.0.1"), None);
        assert_eq!(refusal(&policy, "127.0.0.2"), Some("loopback"));
        assert_eq!(refusal(&policy, "169.254.169.254"), Some("link_local"));
        assert!(AddressPolicy::parse(&["10.0.0.0/33".into()]).is_err());
    }

    #[tokio::test]
    async fn urls_are_checked_at_creation_literal_or_resolved() {
        let policy = AddressPolicy::default();
        assert_eq!(
            check_url(&policy, "http://169.254.169.254/latest/meta-data").await,
            Err(Unreachable::Refused("link_local"))
        );
        assert_eq!(
            check_url(&policy, "http://[::ffff:127.0.0.1]:8080/").await,
            Err(Unreachable::Refused("loopback"))
        );
        assert_eq!(
            check_url(&policy, "http://localhost:9/hook").await,
            Err(Unreachable::Refused("loopback"))
        );
        assert_eq!(
            check_url(&policy, "not a url").await,
            Err(Unreachable::Invalid)
        );
        let loopback = AddressPolicy::parse(&["127.0.0.0/8".into(), "::1/128".into()]).unwrap();
        assert_eq!(
            check_url(&loopback, "http://localhost:9/hook").await,
            Ok(())
        );
    }
}
