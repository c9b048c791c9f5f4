//! POSTs a finished job to its webhook, with a few retries, to public addresses only.
//!
//! The target is checked twice: at submit (a literal address, `localhost`, a name that resolves
//! to a refused address: 422) and before each delivery attempt, where the host is resolved once,
//! every address is checked, and the connection goes to those addresses (no second lookup that
//! a rebinding DNS server could answer differently). Redirects are not followed, and no proxy
//! from the environment is used.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::address::{classify, is_local_name, Allowlist, BadAllowEntry, Refused};
use super::JobView;

const ATTEMPTS: u32 = 3;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a webhook target is refused; the text is the 422's message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WebhookRefusal {
    #[error("`webhook` has no host")]
    NoHost,
    #[error(
        "`webhook` host {host} is {why}; webhooks go to public addresses only \
         (operators can allow a private target with THAW_WEBHOOK_ALLOW)"
    )]
    Address { host: String, why: Refused },
    #[error("`webhook` host {0} is this machine; webhooks go to public addresses only")]
    LocalName(String),
    #[error(
        "`webhook` host {0} resolves to {1}, which is {2}; webhooks go to public addresses only"
    )]
    ResolvesTo(String, IpAddr, Refused),
    #[error(
        "`webhook` host {0} is not on THAW_WEBHOOK_ALLOW (THAW_WEBHOOK_ALLOWLIST_ONLY is set)"
    )]
    NotListed(String),
    #[error("`webhook` host {0} did not resolve: {1}")]
    Unresolved(String, String),
}

/// What the host part alone decides.
#[derive(Debug, PartialEq, Eq)]
enum HostCheck {
    /// A checked literal address, or a name the operator allowlisted.
    Allowed,
    /// A name: allowed if every address it resolves to is.
    Resolve(String),
}

/// THAW_WEBHOOK_ALLOW and THAW_WEBHOOK_ALLOWLIST_ONLY.
#[derive(Debug, Clone, Default)]
pub struct WebhookPolicy {
    allow: Allowlist,
    allowlist_only: bool,
}

impl WebhookPolicy {
    pub fn new<S: AsRef<str>>(allow: &[S], allowlist_only: bool) -> Result<Self, BadAllowEntry> {
        Ok(Self {
            allow: Allowlist::parse(allow)?,
            allowlist_only,
        })
    }

    fn check_host(&self, url: &reqwest::Url) -> Result<HostCheck, WebhookRefusal> {
        let host = url.host_str().ok_or(WebhookRefusal::NoHost)?;
        // The URL parser has already turned 2130706433, 0x7f.1 and 127.1 into 127.0.0.1.
        let literal = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
        if let Ok(ip) = literal.unwrap_or(host).parse::<IpAddr>() {
            return self.check_ip(host, ip).map(|()| HostCheck::Allowed);
        }
        if self.allow.allows_host(host) {
            return Ok(HostCheck::Allowed);
        }
        if self.allowlist_only {
            // Refused without a lookup: with this setting no name outside the list is resolved.
            return Err(WebhookRefusal::NotListed(host.to_string()));
        }
        if is_local_name(host) {
            return Err(WebhookRefusal::LocalName(host.to_string()));
        }
        Ok(HostCheck::Resolve(host.to_string()))
    }

    fn check_ip(&self, host: &str, ip: IpAddr) -> Result<(), WebhookRefusal> {
        if self.allow.allows_ip(ip) {
            return Ok(());
        }
        if self.allowlist_only {
            return Err(WebhookRefusal::NotListed(host.to_string()));
        }
        match classify(ip) {
            Some(why) => Err(WebhookRefusal::Address {
                host: host.to_string(),
                why,
            }),
            None => Ok(()),
        }
    }

    /// Every address a name resolved to must be allowed: one bad record refuses the name.
    fn check_resolved(&self, host: &str, addrs: &[SocketAddr]) -> Result<(), WebhookRefusal> {
        if addrs.is_empty() {
            return Err(WebhookRefusal::Unresolved(host.into(), "no address".into()));
        }
        for addr in addrs {
            let ip = addr.ip();
            if !self.allow.allows_ip(ip) {
                if let Some(why) = classify(ip) {
                    return Err(WebhookRefusal::ResolvesTo(host.into(), ip, why));
                }
            }
        }
        Ok(())
    }

    /// The addresses to connect to (`None`: a literal or allowlisted host, used as it is).
    async fn resolve(&self, url: &reqwest::Url) -> Result<Option<Vec<SocketAddr>>, WebhookRefusal> {
        let HostCheck::Resolve(host) = self.check_host(url)? else {
            return Ok(None);
        };
        let port = url.port_or_known_default().unwrap_or(80);
        let lookup = tokio::net::lookup_host((host.clone(), port));
        let addrs: Vec<SocketAddr> = match tokio::time::timeout(LOOKUP_TIMEOUT, lookup).await {
            Ok(Ok(addrs)) => addrs.collect(),
            Ok(Err(err)) => return Err(WebhookRefusal::Unresolved(host, err.to_string())),
            Err(_) => return Err(WebhookRefusal::Unresolved(host, "lookup timed out".into())),
        };
        self.check_resolved(&host, &addrs)?;
        Ok(Some(addrs))
    }
}

/// The webhook policy and the deliveries still owed, shared by the routes, the runners and
/// the shutdown drain.
#[derive(Clone, Default)]
pub struct Webhooks {
    policy: Arc<WebhookPolicy>,
    /// Accepted jobs with a webhook whose delivery has not ended (running jobs included).
    owed: Arc<AtomicUsize>,
    /// Deliveries under way.
    delivering: Arc<AtomicUsize>,
}

impl Webhooks {
    pub fn new(policy: WebhookPolicy) -> Self {
        Self {
            policy: Arc::new(policy),
            ..Self::default()
        }
    }

    /// The check at submit: refuses what can be known now. A name that does not resolve yet is
    /// accepted (the check is repeated before each delivery).
    pub async fn check_at_submit(&self, url: &reqwest::Url) -> Result<(), WebhookRefusal> {
        match self.policy.resolve(url).await {
            Err(WebhookRefusal::Unresolved(..)) | Ok(_) => Ok(()),
            Err(refusal) => Err(refusal),
        }
    }

    /// Records that an accepted job will deliver a webhook when it ends (`deliver` settles it).
    pub fn promise(&self) {
        self.owed.fetch_add(1, Ordering::SeqCst);
    }

    pub fn owed(&self) -> usize {
        self.owed.load(Ordering::SeqCst)
    }

    pub fn delivering(&self) -> usize {
        self.delivering.load(Ordering::SeqCst)
    }

    pub async fn deliver(&self, url: reqwest::Url, job: JobView) {
        let _owed = Counted::settle(&self.owed);
        let _delivering = Counted::start(&self.delivering);
        for attempt in 0..ATTEMPTS {
            let client = match self.policy.resolve(&url).await {
                Ok(addrs) => client(url.host_str(), addrs.as_deref()),
                Err(refusal) => {
                    tracing::warn!(job = %job.id, %refusal, "webhook not delivered");
                    return;
                }
            };
            let Some(client) = client else { return };
            match client.post(url.clone()).json(&job).send().await {
                Ok(response) if response.status().is_success() => return,
                Ok(response) => {
                    tracing::warn!(job = %job.id, status = %response.status(), "webhook refused")
                }
                Err(err) => tracing::warn!(job = %job.id, %err, "webhook failed"),
            }
            tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
        }
    }
}

/// A client that connects only to `addrs` for `host` (when given), follows no redirect and
/// ignores proxy settings.
fn client(host: Option<&str>, addrs: Option<&[SocketAddr]>) -> Option<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy();
    if let (Some(host), Some(addrs)) = (host, addrs) {
        builder = builder.resolve_to_addrs(host, addrs);
    }
    match builder.build() {
        Ok(client) => Some(client),
        Err(err) => {
            tracing::error!(%err, "cannot build the webhook client");
            None
        }
    }
}

/// Decrements its counter when dropped, however the delivery ends.
struct Counted<'a>(&'a AtomicUsize);

impl<'a> Counted<'a> {
    fn start(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        Self(counter)
    }

    /// For a count someone else incremented (`Webhooks::promise`).
    fn settle(counter: &'a AtomicUsize) -> Self {
        Self(counter)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        // Saturating: a delivery without a promise (none today) must not wrap the count.
        let _ = self
            .0
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(text: &str) -> reqwest::Url {
        reqwest::Url::parse(text).unwrap()
    }

    fn strict() -> WebhookPolicy {
        WebhookPolicy::default()
    }

    fn refused(policy: &WebhookPolicy, target: &str) -> bool {
        policy.check_host(&url(target)).is_err()
    }

    #[test]
    fn loopback_in_every_spelling_is_refused_without_a_lookup() {
        let policy = strict();
        for target in [
            "http://127.0.0.1:9/h",
            "http://127.0.0.2/",
            "http://[::1]:8080/",
            "http://[::ffff:127.0.0.1]/",
            "http://[::ffff:7f00:1]/",
            "http://0.0.0.0/",
            "http://0/",
            "http://2130706433/",
            "http://0x7f000001/",
            "http://0x7f.1/",
            "http://127.1/",
            "http://017700000001/",
            "http://localhost:8000/",
            "http://LocalHost./",
            "http://api.localhost/",
            "https://169.254.169.254/latest/meta-data/",
            "http://[fe80::1]/",
            "http://10.0.0.5/",
            "http://[fd00::1]/",
            "http://100.64.1.1/",
            "http://224.0.0.1/",
            "http://[::]/",
            "http://255.255.255.255/",
        ] {
            assert!(refused(&policy, target), "{target}");
        }
    }

    #[test]
    fn public_literals_and_names_pass_the_host_check() {
        let policy = strict();
        assert_eq!(
            policy.check_host(&url("https://93.184.216.34/x")),
            Ok(HostCheck::Allowed)
        );
        assert_eq!(
            policy.check_host(&url("https://hooks.example.com/x")),
            Ok(HostCheck::Resolve("hooks.example.com".into()))
        );
    }

    #[test]
    fn refusals_name_the_field_and_the_reason() {
        let message = strict()
            .check_host(&url("http://169.254.169.254/"))
            .unwrap_err()
            .to_string();
        assert!(message.starts_with("`webhook` host 169.254.169.254 is a link-local"));
        assert!(message.contains("THAW_WEBHOOK_ALLOW"));
        let message = strict()
            .check_host(&url("http://localhost/"))
            .unwrap_err()
            .to_string();
        assert!(message.contains("localhost is this machine"), "{message}");
    }

    #[test]
    fn the_allowlist_opens_listed_networks_and_names_only() {
        let policy = WebhookPolicy::new(&["127.0.0.2/32", "hooks.internal"], false).unwrap();
        assert_eq!(
            policy.check_host(&url("http://127.0.0.2:5/")),
            Ok(HostCheck::Allowed)
        );
        assert_eq!(
            policy.check_host(&url("http://[::ffff:127.0.0.2]/")),
            Ok(HostCheck::Allowed)
        );
        assert!(refused(&policy, "http://127.0.0.1/"));
        assert_eq!(
            policy.check_host(&url("http://Hooks.Internal./")),
            Ok(HostCheck::Allowed)
        );
        assert!(WebhookPolicy::new(&["not a cidr"], false).is_err());
    }

    #[test]
    fn allowlist_only_refuses_every_other_target_before_any_lookup() {
        let policy = WebhookPolicy::new(&["127.0.0.1"], true).unwrap();
        assert_eq!(
            policy.check_host(&url("http://127.0.0.1:8/")),
            Ok(HostCheck::Allowed)
        );
        for target in [
            "http://93.184.216.34/",
            "http://example.com/",
            "http://127.0.0.2/",
            "http://localhost/",
        ] {
            assert!(
                matches!(
                    policy.check_host(&url(target)),
                    Err(WebhookRefusal::NotListed(_))
                ),
                "{target}"
            );
        }
        let nothing = WebhookPolicy::new::<&str>(&[], true).unwrap();
        assert!(refused(&nothing, "https://93.184.216.34/"));
    }

    #[test]
    fn a_name_is_refused_when_any_of_its_addresses_is() {
        let policy = WebhookPolicy::new(&["10.1.0.0/16"], false).unwrap();
        let addr = |text: &str| SocketAddr::new(text.parse().unwrap(), 443);
        assert!(policy
            .check_resolved("h", &[addr("93.184.216.34"), addr("2606:4700::1")])
            .is_ok());
        assert!(policy.check_resolved("h", &[addr("10.1.2.3")]).is_ok());
        assert_eq!(
            policy.check_resolved("h", &[addr("93.184.216.34"), addr("127.0.0.1")]),
            Err(WebhookRefusal::ResolvesTo(
                "h".into(),
                "127.0.0.1".parse().unwrap(),
                Refused::Loopback
            ))
        );
        assert!(policy
            .check_resolved("h", &[addr("::ffff:169.254.169.254")])
            .is_err());
        assert!(policy.check_resolved("h", &[]).is_err());
    }

    #[test]
    fn deliveries_settle_what_was_promised() {
        let webhooks = Webhooks::default();
        webhooks.promise();
        assert_eq!(webhooks.owed(), 1);
        {
            let _owed = Counted::settle(&webhooks.owed);
            let _delivering = Counted::start(&webhooks.delivering);
            assert_eq!(webhooks.delivering(), 1);
        }
        assert_eq!((webhooks.owed(), webhooks.delivering()), (0, 0));
        drop(Counted::settle(&webhooks.owed));
        assert_eq!(webhooks.owed(), 0, "never below zero");
    }
}
