//! Retry-after on RabbitMQ without plugins: delay tiers.
//!
//! A fixed set of tier queues `postbox.delay.<ms>ms` (default 20 ms … 1 h, a
//! 1-2-5 series), each with ONE per-queue `x-message-ttl` — so messages in a
//! tier expire in arrival order, with no head-of-line blocking — and
//! `x-dead-letter-exchange = ""` with no routing-key override. A retry copy is
//! published (mandatory, confirmed) to the headers exchange `postbox.delay`
//! with header `postbox-delay-tier = <ms>ms` and **routing key = its origin
//! queue**; when the tier's TTL expires the broker dead-letters it to the
//! default exchange under that routing key, i.e. back onto the origin queue.
//! One set of tiers serves every queue.
//!
//! A delay is served by a chain of tiers ([`DelayTiers::hop`]; why RabbitMQ
//! hops while Kafka does not: `docs/design.md` §4): the copy goes to the
//! longest tier not longer than the delay and carries its due time
//! ([`DUE_HEADER`], `postbox-due`: Unix ms, rounded up). When it comes
//! back early, the consumer re-delays the remainder (again the longest tier
//! that fits) without calling the handler, until less than 5 ms remain; a
//! delay shorter than the shortest tier (20 ms) waits one shortest tier. So a
//! retry arrives no earlier than 5 ms before its due time and typically a few
//! ms after (one broker hop per tier used; at most ~3 hops per decade).
//! A delay below 5 ms is published straight back to the origin queue.
//!
//! The original delivery is acked only after the broker confirmed the copy;
//! if that publish fails the delivery is handed back unsettled.
//! Attempt and due metadata are written fresh on every copy (headers are
//! replaced, never appended; the broker's `x-death` is not carried over).
//! A copy is written in the configured content mode; in structured mode
//! the delay-tier and due headers go beside the envelope's transport
//! headers (names that are not attribute names), in binary mode beside the
//! attribute headers too. The envelope cannot hold either name: `postbox-…`
//! is refused when publishing and not read back as an envelope header, nor
//! is the `x-death` the tier adds when the copy expires.
//!
//! [`Broker::publish_delayed`](postbox_core::Broker::publish_delayed) uses the
//! same path: the message is published into a tier with its due time, and
//! the consumers of its queue re-delay it until it is due.

use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use lapin::types::{AMQPValue, LongString};
use postbox_core::delay::{self, DelayTiers, DUE_HEADER};
use postbox_core::{Envelope, Error};

use crate::codec::{Route, TIER_HEADER};
use crate::publisher::{confirmed, Link, RabbitBroker};
use crate::topology;

/// Below this remaining delay a message is delivered now.
pub(crate) const NOW_SLACK: Duration = Duration::from_millis(5);

/// The tier the next hop of a `remaining` delay waits in
/// ([`DelayTiers::hop`]); `None` means deliver now: the rest is within
/// [`NOW_SLACK`], or there are no tiers.
fn next_hop(tiers: Option<&DelayTiers>, remaining: Duration) -> Option<Duration> {
    if remaining <= NOW_SLACK {
        return None;
    }
    tiers.map(|t| t.hop(remaining))
}

impl RabbitBroker {
    /// Declares the delay exchange and tier queues (idempotent).
    pub async fn declare_delay_tiers(&self) -> Result<(), Error> {
        let channel = self.side_channel().await?;
        let cfg = &self.inner.config;
        let r = topology::declare_delay_tiers(&channel, &cfg.delay_exchange, cfg.tier_durations())
            .await;
        let _ = channel.close(200, "declared".into()).await;
        r
    }

    /// Declares the delay tiers once per publishing connection (when the
    /// configuration asks for it).
    pub(crate) async fn ensure_delay_tiers(&self, link: &Link) -> Result<(), Error> {
        if self.inner.config.declare_delay_tiers && !link.tiers_ready.load(Ordering::Acquire) {
            self.declare_delay_tiers().await?;
            link.tiers_ready.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Declares a [`Topology`](crate::Topology) (idempotent).
    pub async fn declare(&self, topology: &crate::Topology) -> Result<(), Error> {
        let channel = self.side_channel().await?;
        let r = topology.declare(&channel).await;
        if channel.status().connected() {
            let _ = channel.close(200, "declared".into()).await;
        }
        r
    }

    /// Publishes `env` so that it arrives on `origin_queue` at `due`, and waits
    /// for the broker's confirm.
    pub(crate) async fn publish_due(
        &self,
        origin_queue: &str,
        env: &Envelope,
        due: SystemTime,
    ) -> Result<(), Error> {
        let cfg = &self.inner.config;
        // Written in the configured content mode, like any publish; the
        // transport headers below go next to the CloudEvents ones.
        let encoded = self.encode(env)?;
        let remaining = due
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        let link = self.link().await?;
        let tier = next_hop(cfg.tiers.as_ref(), remaining);
        let mut headers = encoded.properties.headers().clone().unwrap_or_default();
        let route = match tier {
            None => Route {
                exchange: String::new(),
                routing_key: origin_queue.to_string(),
            },
            Some(tier) => {
                self.ensure_delay_tiers(&link).await?;
                headers.insert(
                    TIER_HEADER.into(),
                    AMQPValue::LongString(LongString::from(topology::tier_key(tier))),
                );
                headers.insert(
                    DUE_HEADER.into(),
                    AMQPValue::LongLongInt(
                        i64::try_from(delay::due_to_millis(due)).unwrap_or(i64::MAX),
                    ),
                );
                Route {
                    exchange: cfg.delay_exchange.clone(),
                    routing_key: origin_queue.to_string(),
                }
            }
        };
        let props = encoded.properties.with_headers(headers);
        let confirm = self.send(&link, &route, &encoded.body, props).await?;
        confirmed(&route, confirm).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hops_follow_the_tiers_and_small_rests_go_now() {
        let tiers = DelayTiers::default();
        let ms = Duration::from_millis;
        assert_eq!(next_hop(Some(&tiers), ms(3)), None);
        assert_eq!(next_hop(Some(&tiers), NOW_SLACK), None);
        assert_eq!(next_hop(Some(&tiers), ms(12)), Some(ms(20)));
        assert_eq!(next_hop(Some(&tiers), ms(990)), Some(ms(500)));
        assert_eq!(
            next_hop(Some(&tiers), Duration::from_secs(7_200)),
            Some(ms(3_600_000))
        );
        assert_eq!(next_hop(None, Duration::from_secs(1)), None, "no tiers");
    }
}
