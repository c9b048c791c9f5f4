//! Which addresses a webhook may reach: pure functions, no I/O.
//!
//! A job's webhook is a URL chosen by whoever submits the job, and the gateway POSTs to it from
//! inside the deployment. Anything that is not a public unicast address is refused, so a client
//! cannot make the gateway call the cloud metadata service, a sidecar on loopback or a host on
//! the private network. IPv6 forms that carry an IPv4 address (v4-mapped, v4-compatible, NAT64,
//! 6to4) are judged by the IPv4 address they carry. Operators who need a private target list it
//! in THAW_WEBHOOK_ALLOW (`Allowlist`).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Why an address is not a public unicast address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Unspecified,
    Loopback,
    Private,
    LinkLocal,
    SharedCgnat,
    Multicast,
    Broadcast,
    UniqueLocal,
    Documentation,
    Benchmarking,
    Reserved,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Unspecified => "an unspecified address",
            Self::Loopback => "a loopback address",
            Self::Private => "a private address",
            Self::LinkLocal => "a link-local address (cloud metadata lives there)",
            Self::SharedCgnat => "a shared (CGNAT) address",
            Self::Multicast => "a multicast address",
            Self::Broadcast => "a broadcast address",
            Self::UniqueLocal => "an IPv6 unique-local address",
            Self::Documentation => "a documentation address",
            Self::Benchmarking => "a benchmarking address",
            Self::Reserved => "a reserved or special-purpose address",
        })
    }
}

/// `None` for a public unicast address; otherwise why the address is refused.
pub fn classify(ip: IpAddr) -> Option<Refused> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

pub fn classify_v4(ip: Ipv4Addr) -> Option<Refused> {
    let [a, b, c, _] = ip.octets();
    let refused = match (a, b, c) {
        _ if ip.is_broadcast() => Refused::Broadcast,
        _ if ip.is_unspecified() => Refused::Unspecified,
        // 0.0.0.0/8 "this network": connecting to 0.x reaches the local host on Linux.
        (0, _, _) => Refused::Unspecified,
        (127, _, _) => Refused::Loopback,
        (10, _, _) | (172, 16..=31, _) | (192, 168, _) => Refused::Private,
        (169, 254, _) => Refused::LinkLocal,
        (100, 64..=127, _) => Refused::SharedCgnat,
        (224..=239, _, _) => Refused::Multicast,
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => Refused::Documentation,
        (198, 18..=19, _) => Refused::Benchmarking,
        // IETF protocol assignments, the deprecated 6to4 relay anycast, and 240/4.
        (192, 0, 0) | (192, 88, 99) | (240..=255, _, _) => Refused::Reserved,
        _ => return None,
    };
    Some(refused)
}

pub fn classify_v6(ip: Ipv6Addr) -> Option<Refused> {
    if let Some(v4) = embedded_v4(ip) {
        return classify_v4(v4);
    }
    let s = ip.segments();
    let refused = match s {
        _ if ip.is_unspecified() => Refused::Unspecified,
        _ if ip.is_loopback() => Refused::Loopback,
        [0xff00..=0xffff, ..] => Refused::Multicast,
        [0xfe80..=0xfebf, ..] => Refused::LinkLocal,
        // Deprecated site-local: private in practice.
        [0xfec0..=0xfeff, ..] => Refused::Private,
        [0xfc00..=0xfdff, ..] => Refused::UniqueLocal,
        [0x2001, 0x0db8, ..] | [0x3fff, 0x0000..=0x0fff, ..] => Refused::Documentation,
        [0x2001, 0x0002, 0, ..] => Refused::Benchmarking,
        // Discard-only 100::/64; local-use NAT64 64:ff9b:1::/48 (translates to private space);
        // Teredo 2001::/32 (tunnels to an obfuscated IPv4 address); ORCHID 2001:10::/28 and
        // 2001:20::/28; the rest of the IETF block 2001::/23 is special-purpose too.
        [0x0100, 0, 0, 0, ..] | [0x0064, 0xff9b, 0x0001, ..] => Refused::Reserved,
        [0x2001, 0x0000..=0x01ff, ..] => Refused::Reserved,
        // Everything outside 2000::/3 (global unicast) is unassigned or special.
        [first, ..] if !(0x2000..=0x3fff).contains(&first) => Refused::Reserved,
        _ => return None,
    };
    Some(refused)
}

/// The IPv4 address an IPv6 address stands for, in the forms a connection can end up at:
/// v4-mapped `::ffff:a.b.c.d`, v4-translated `::ffff:0:a.b.c.d`, the deprecated v4-compatible
/// `::a.b.c.d`, NAT64 `64:ff9b::a.b.c.d` and 6to4 `2002:aabb:ccdd::`.
pub fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let low = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    match s {
        [0, 0, 0, 0, 0, 0xffff, _, _] | [0, 0, 0, 0, 0xffff, 0, _, _] => Some(low),
        // `::` and `::1` are IPv6's own unspecified and loopback addresses.
        [0, 0, 0, 0, 0, 0, hi, lo] if hi != 0 || lo > 1 => Some(low),
        [0x0064, 0xff9b, 0, 0, 0, 0, _, _] => Some(low),
        [0x2002, hi, lo, ..] => Some(Ipv4Addr::new(
            (hi >> 8) as u8,
            hi as u8,
            (lo >> 8) as u8,
            lo as u8,
        )),
        _ => None,
    }
}

/// The same address with IPv4 carried in IPv6 unwrapped, so `127.0.0.2/32` in an allowlist
/// also matches `::ffff:127.0.0.2`.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => embedded_v4(v6).map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// One network, `10.0.0.0/8` or `fd00::/8`; a bare address is a /32 or /128.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Option<Self> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix.parse::<u8>().ok()?)),
            None => (text, None),
        };
        let address = address
            .strip_prefix('[')
            .and_then(|a| a.strip_suffix(']'))
            .unwrap_or(address);
        let network = canonical(address.parse::<IpAddr>().ok()?);
        let bits = if network.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(bits);
        (prefix <= bits).then_some(Self { network, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                same_prefix(u32::from(net).into(), u32::from(ip).into(), 32, self.prefix)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                same_prefix(u128::from(net), u128::from(ip), 128, self.prefix)
            }
            _ => false,
        }
    }
}

fn same_prefix(a: u128, b: u128, bits: u8, prefix: u8) -> bool {
    let shift = u32::from(bits - prefix);
    shift >= u32::from(bits) || (a >> shift) == (b >> shift)
}

/// THAW_WEBHOOK_ALLOW: networks and host names a webhook may reach even though they are not
/// public.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allowlist {
    networks: Vec<Cidr>,
    hosts: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("THAW_WEBHOOK_ALLOW: {0:?} is not a CIDR (10.0.0.0/8), an address or a host name")]
pub struct BadAllowEntry(pub String);

impl Allowlist {
    /// Entries as given (comma-split by the flag parser); blank ones are skipped.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, BadAllowEntry> {
        let mut allow = Self::default();
        for entry in entries.iter().map(|e| e.as_ref().trim()) {
            if entry.is_empty() {
                continue;
            }
            if let Some(cidr) = Cidr::parse(entry) {
                allow.networks.push(cidr);
            } else if is_host_name(entry) {
                allow.hosts.push(normal_host(entry));
            } else {
                return Err(BadAllowEntry(entry.to_string()));
            }
        }
        Ok(allow)
    }

    pub fn allows_host(&self, host: &str) -> bool {
        let host = normal_host(host);
        self.hosts.contains(&host)
    }

    pub fn allows_ip(&self, ip: IpAddr) -> bool {
        self.networks.iter().any(|net| net.contains(ip))
    }
}

/// Lower case, without the root's trailing dot: `LocalHost.` and `localhost` are one name.
pub fn normal_host(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

fn is_host_name(text: &str) -> bool {
    let name = text.trim_end_matches('.');
    !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
}

/// `localhost` and any name below it (RFC 6761) always mean this machine.
pub fn is_local_name(host: &str) -> bool {
    let host = normal_host(host);
    host == "localhost" || host.ends_with(".localhost")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(text: &str) -> Option<Refused> {
        classify(text.parse().unwrap())
    }

    #[test]
    fn public_addresses_pass() {
        for ip in [
            "93.184.216.34",
            "8.8.8.8",
            "1.1.1.1",
            "172.15.255.255",
            "172.32.0.1",
            "100.63.255.255",
            "100.128.0.1",
            "192.169.0.1",
            "169.253.255.255",
            "11.0.0.1",
            "223.255.255.255",
            "2606:4700:4700::1111",
            "2a00:1450:4001:80b::200e",
            "::ffff:93.184.216.34",
            "64:ff9b::808:808",
            "2002:5db8:d822::1",
        ] {
            assert_eq!(v4(ip), None, "{ip}");
        }
    }

    #[test]
    fn every_ipv4_range_is_refused() {
        let cases = [
            ("0.0.0.0", Refused::Unspecified),
            ("0.1.2.3", Refused::Unspecified),
            ("127.0.0.1", Refused::Loopback),
            ("127.0.0.2", Refused::Loopback),
            ("127.255.255.254", Refused::Loopback),
            ("10.0.0.1", Refused::Private),
            ("10.255.255.255", Refused::Private),
            ("172.16.0.1", Refused::Private),
            ("172.31.255.255", Refused::Private),
            ("192.168.0.1", Refused::Private),
            ("192.168.255.255", Refused::Private),
            ("169.254.169.254", Refused::LinkLocal),
            ("169.254.0.1", Refused::LinkLocal),
            ("100.64.0.1", Refused::SharedCgnat),
            ("100.127.255.255", Refused::SharedCgnat),
            ("224.0.0.1", Refused::Multicast),
            ("239.255.255.250", Refused::Multicast),
            ("255.255.255.255", Refused::Broadcast),
            ("240.0.0.1", Refused::Reserved),
            ("254.1.2.3", Refused::Reserved),
            ("192.0.0.8", Refused::Reserved),
            ("192.88.99.1", Refused::Reserved),
            ("192.0.2.1", Refused::Documentation),
            ("198.51.100.7", Refused::Documentation),
            ("203.0.113.9", Refused::Documentation),
            ("198.18.0.1", Refused::Benchmarking),
            ("198.19.255.255", Refused::Benchmarking),
        ];
        for (ip, expected) in cases {
            assert_eq!(v4(ip), Some(expected), "{ip}");
        }
    }

    #[test]
    fn every_ipv6_range_is_refused() {
        let cases = [
            ("::", Refused::Unspecified),
            ("::1", Refused::Loopback),
            ("fe80::1", Refused::LinkLocal),
            ("febf:ffff::1", Refused::LinkLocal),
            ("fec0::1", Refused::Private),
            ("fc00::1", Refused::UniqueLocal),
            ("fd12:3456:789a::1", Refused::UniqueLocal),
            ("ff02::1", Refused::Multicast),
            ("ff0e::1", Refused::Multicast),
            ("2001:db8::1", Refused::Documentation),
            ("3fff::1", Refused::Documentation),
            ("2001:2::1", Refused::Benchmarking),
            ("100::1", Refused::Reserved),
            ("64:ff9b:1::a00:1", Refused::Reserved),
            ("2001::1", Refused::Reserved),
            ("2001:10::1", Refused::Reserved),
            ("4000::1", Refused::Reserved),
            ("1::1", Refused::Reserved),
        ];
        for (ip, expected) in cases {
            assert_eq!(v4(ip), Some(expected), "{ip}");
        }
    }

    #[test]
    fn ipv4_inside_ipv6_is_judged_as_ipv4() {
        let cases = [
            ("::ffff:127.0.0.1", Refused::Loopback),
            ("::ffff:7f00:2", Refused::Loopback),
            ("::ffff:169.254.169.254", Refused::LinkLocal),
            ("::ffff:10.1.2.3", Refused::Private),
            ("::ffff:0.0.0.0", Refused::Unspecified),
            ("::ffff:0:127.0.0.1", Refused::Loopback),
            ("::127.0.0.1", Refused::Loopback),
            ("::192.168.1.1", Refused::Private),
            ("::0.0.0.2", Refused::Unspecified),
            ("64:ff9b::127.0.0.1", Refused::Loopback),
            ("64:ff9b::a9fe:a9fe", Refused::LinkLocal),
            ("2002:7f00:1::", Refused::Loopback),
            ("2002:a9fe:a9fe::1", Refused::LinkLocal),
            ("2002:c0a8:101::", Refused::Private),
        ];
        for (ip, expected) in cases {
            assert_eq!(v4(ip), Some(expected), "{ip}");
        }
        assert_eq!(
            canonical("::ffff:127.0.0.2".parse().unwrap()),
            "127.0.0.2".parse::<IpAddr>().unwrap()
        );
        assert_eq!(embedded_v4("::1".parse().unwrap()), None);
        assert_eq!(embedded_v4("::".parse().unwrap()), None);
    }

    #[test]
    fn cidrs_match_their_networks() {
        let net = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(net.contains("10.1.255.3".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.0.9".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        assert!(!net.contains("fd00::1".parse().unwrap()));
        let host = Cidr::parse("127.0.0.2").unwrap();
        assert!(host.contains("127.0.0.2".parse().unwrap()));
        assert!(!host.contains("127.0.0.1".parse().unwrap()));
        let everything = Cidr::parse("0.0.0.0/0").unwrap();
        assert!(everything.contains("8.8.8.8".parse().unwrap()));
        let v6 = Cidr::parse("fd00::/8").unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(!v6.contains("fe80::1".parse().unwrap()));
        assert!(Cidr::parse("[::1]")
            .unwrap()
            .contains("::1".parse().unwrap()));
        for bad in ["10.0.0.0/33", "::/129", "10.0.0/8", "10.0.0.0/x", "host"] {
            assert_eq!(Cidr::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn allowlist_takes_networks_and_host_names() {
        let allow =
            Allowlist::parse(&["10.0.0.0/8", " hooks.internal ", "", "127.0.0.2", "Svc_A."])
                .unwrap();
        assert!(allow.allows_ip("10.9.8.7".parse().unwrap()));
        assert!(allow.allows_ip("::ffff:127.0.0.2".parse().unwrap()));
        assert!(!allow.allows_ip("127.0.0.1".parse().unwrap()));
        assert!(!allow.allows_ip("169.254.169.254".parse().unwrap()));
        assert!(allow.allows_host("HOOKS.internal."));
        assert!(allow.allows_host("svc_a"));
        assert!(!allow.allows_host("internal"));
        assert!(!allow.allows_host("evil.hooks.internal"));
        assert_eq!(Allowlist::parse::<&str>(&[]).unwrap(), Allowlist::default());
        assert_eq!(
            Allowlist::parse(&["10.0.0.0/40"]),
            Err(BadAllowEntry("10.0.0.0/40".into()))
        );
        assert!(Allowlist::parse(&["http://x/"]).is_err());
        assert!(Allowlist::parse(&["a..b"]).is_err());
    }

    #[test]
    fn localhost_names() {
        for name in ["localhost", "LOCALHOST.", "a.localhost", "x.y.localhost."] {
            assert!(is_local_name(name), "{name}");
        }
        for name in ["localhost.com", "mylocalhost", "example.com"] {
            assert!(!is_local_name(name), "{name}");
        }
    }
}
