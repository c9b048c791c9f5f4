//! POSTs a finished job to its webhook, with a few retries.

use std::sync::OnceLock;
use std::time::Duration;

use super::JobView;

const ATTEMPTS: u32 = 3;

/// Built on first use: most gateways never call a webhook, so start-up does not pay for TLS.
fn client() -> Option<&'static reqwest::Client> {
    static CLIENT: OnceLock<Option<reqwest::Client>> = OnceLock::new();
    CLIENT
        .get_or_init(|| {
            match reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
            {
                Ok(client) => Some(client),
                Err(err) => {
                    tracing::error!(%err, "cannot build the webhook client");
                    None
                }
            }
        })
        .as_ref()
}

pub async fn deliver(url: reqwest::Url, job: JobView) {
    let Some(client) = client() else { return };
    for attempt in 0..ATTEMPTS {
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
