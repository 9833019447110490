//! Leader election on a coordination.k8s.io/v1 Lease, as client-go's leaderelection does it:
//! the holder renews the lease well within its duration; another candidate takes it only once
//! the lease has not changed for a whole duration by the candidate's own clock (so clocks
//! need not agree); every write carries the resourceVersion it read, so two candidates never
//! both win. Written here because neither crate for it fits kube 5 (kube-lease-manager 0.12
//! needs kube 4, kube-leader-election kube 0.96).
use std::{sync::Mutex, time::Duration};

use anyhow::{Context, Result};
use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::Timestamp,
};
use kube::{
    api::{ObjectMeta, PostParams},
    Api, Client,
};
use tracing::{debug, info, warn};

/// How long a lease holds without renewal (client-go's default).
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often the holder renews, and a candidate tries.
pub const RETRY_PERIOD: Duration = Duration::from_secs(2);
/// How long the holder keeps trying to renew before it gives up leading (client-go's
/// default): well before the lease lapses in another candidate's eyes.
pub const RENEW_DEADLINE: Duration = Duration::from_secs(10);

/// One candidate for one Lease.
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    /// The other holder's record as last seen, and when it was first seen so.
    observed: Mutex<Option<(LeaseSpec, tokio::time::Instant)>>,
}

/// What a candidate found the lease to be.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Ours (taken or renewed now).
    Held,
    /// Someone else's, still valid.
    Other(String),
}

impl Elector {
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            observed: Mutex::new(None),
        }
    }

    /// Waits until this candidate holds the lease. An API error is logged and tried again:
    /// a standby that crashed on one would come back late for a failover.
    pub async fn acquire(&self) -> Result<()> {
        let mut said = None;
        loop {
            match tokio::time::timeout(RENEW_DEADLINE, self.try_hold()).await {
                Ok(Ok(Verdict::Held)) => {
                    info!(lease = %self.name, identity = %self.identity, "leader");
                    return Ok(());
                }
                Ok(Ok(Verdict::Other(holder))) => {
                    if said.as_ref() != Some(&holder) {
                        info!(lease = %self.name, %holder, "waiting for the lease");
                        said = Some(holder);
                    }
                }
                Ok(Err(e)) => warn!(error = %e, "campaign for the lease"),
                Err(_) => warn!("campaign for the lease: no answer within {RENEW_DEADLINE:?}"),
            }
            tokio::time::sleep(RETRY_PERIOD).await;
        }
    }

    /// Renews the lease every RETRY_PERIOD until no renewal succeeded for RENEW_DEADLINE,
    /// counted from the start of the last attempt that did (someone else may take it soon
    /// after): returns the error then. Never returns otherwise. Each attempt is bounded, so a
    /// hung request cannot outlast the deadline.
    pub async fn keep(&self) -> Result<()> {
        let mut renewed = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(RETRY_PERIOD).await;
            let started = tokio::time::Instant::now();
            let left = RENEW_DEADLINE
                .saturating_sub(renewed.elapsed())
                .max(Duration::from_millis(100));
            match tokio::time::timeout(left, self.try_hold()).await {
                Ok(Ok(Verdict::Held)) => renewed = started,
                Ok(Ok(Verdict::Other(holder))) => anyhow::bail!("lease {} taken by {holder}", self.name),
                Ok(Err(e)) => debug!(error = %e, "renew the lease"),
                Err(_) => debug!("renew the lease: no answer in time"),
            }
            if renewed.elapsed() >= RENEW_DEADLINE {
                anyhow::bail!("could not renew lease {} within {RENEW_DEADLINE:?}", self.name);
            }
        }
    }

    /// One attempt: create the lease, renew ours, or take an expired one.
    pub async fn try_hold(&self) -> Result<Verdict> {
        let now = Timestamp::now();
        let Some(mut lease) = self.api.get_opt(&self.name).await.context("read the lease")? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.spec(now, now, 0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Verdict::Held),
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    Ok(Verdict::Other("a concurrent candidate".into()))
                }
                Err(e) => Err(e).context("create the lease"),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let ours = holder == self.identity;
        if !ours && !holder.is_empty() && !self.lapsed(&spec) {
            return Ok(Verdict::Other(holder));
        }
        let (acquired, transitions) = if ours {
            (
                spec.acquire_time.map_or(now, |t| t.0),
                spec.lease_transitions.unwrap_or(0),
            )
        } else {
            (now, spec.lease_transitions.unwrap_or(0) + 1)
        };
        lease.spec = Some(self.spec(now, acquired, transitions));
        // The resourceVersion read above makes this a compare-and-swap.
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(Verdict::Held),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(Verdict::Other("a concurrent candidate".into())),
            Err(e) => Err(e).context("renew the lease"),
        }
    }

    /// Gives the lease up (on a clean stop), so the next candidate need not wait for it to
    /// lapse: as client-go, an empty holder and a one-second duration.
    pub async fn release(&self) -> Result<()> {
        let Some(mut lease) = self.api.get_opt(&self.name).await.context("read the lease")? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        self.api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
            .context("release the lease")?;
        info!(lease = %self.name, "lease released");
        Ok(())
    }

    fn spec(&self, now: Timestamp, acquired: Timestamp, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(i32::try_from(LEASE_DURATION.as_secs()).unwrap_or(i32::MAX)),
            acquire_time: Some(MicroTime(acquired)),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }
}

impl Elector {
    /// Whether another holder let the lease lapse: its record unchanged for its whole
    /// duration, as this process's clock measures it.
    fn lapsed(&self, spec: &LeaseSpec) -> bool {
        let mut observed = self.observed.lock().unwrap_or_else(|e| e.into_inner());
        let now = tokio::time::Instant::now();
        let since = match observed.as_ref() {
            Some((seen, at)) if seen == spec => *at,
            _ => {
                *observed = Some((spec.clone(), now));
                now
            }
        };
        let lasts = Duration::from_secs(u64::try_from(spec.lease_duration_seconds.unwrap_or(0)).unwrap_or(0));
        now.duration_since(since) > lasts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_lease_lapses_once_unchanged_for_its_duration_by_our_clock() {
        let client = Client::try_from(kube::Config::new("http://127.0.0.1:9".parse().unwrap())).unwrap();
        let elector = Elector::new(client, "ns", "lease", "b");
        let far_future = Timestamp::from_second(4_000_000_000).unwrap();
        let mut spec = LeaseSpec {
            holder_identity: Some("a".into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(far_future)),
            ..LeaseSpec::default()
        };
        // The holder's clock does not matter: a renewTime in the future lapses all the same.
        assert!(!elector.lapsed(&spec));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(!elector.lapsed(&spec));
        // Renewed: counted from now again.
        spec.renew_time = Some(MicroTime(Timestamp::from_second(1).unwrap()));
        assert!(!elector.lapsed(&spec));
        tokio::time::advance(Duration::from_secs(15)).await;
        assert!(!elector.lapsed(&spec));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(elector.lapsed(&spec));
    }
}
