//! The conformance tests. Each takes a [`Harness`] and returns a [`Verdict`]
//! or a message saying what went wrong; [`conformance_tests!`](crate::conformance_tests)
//! turns them into one `#[tokio::test]` each.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use postbox_core::codec::UNDECODABLE_TYPE;
use postbox_core::dlq::DeadLetterMetadata;
use postbox_core::{
    typed, BoxSource, Broker as _, Consumer, ConsumerBuilder, DeadLetterRouter, Delivery, Envelope,
    ErrorKind, FailureReason, Handler, HandlerBuilder, HandlerResult, IdempotencyLayer, Limit,
    MemoryIdempotencyStore, ProcessingOrder, RetryPolicy, RunningConsumer, Source, TypedEnvelope,
};

use crate::harness::Harness;
use crate::spy::{Behaviour, Call, HandlerSpy};

/// The outcome of a test that did not fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Ran and passed.
    Passed,
    /// Not run: the adapter lacks a capability (the reason is printed).
    Skipped(&'static str),
}

/// What a conformance test returns.
pub type TestResult = Result<Verdict, String>;

/// Generous time-out for anything a broker must do.
pub const WAIT: Duration = Duration::from_secs(30);

macro_rules! ensure {
    ($cond:expr, $($arg:tt)*) => {
        if !$cond {
            return Err(format!($($arg)*));
        }
    };
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// A quick retry policy for tests: 20 ms base, 200 ms max, 3 attempts.
pub fn fast_policy() -> RetryPolicy {
    RetryPolicy::exponential(Duration::from_millis(20))
        .with_max_delay(Duration::from_millis(200))
        .with_max_attempts(3)
}

/// A consumer builder wired to the harness: DLQ through its publisher, fast retries.
pub fn consumer<H: Handler>(
    h: &dyn Harness,
    source: BoxSource,
    handler: H,
) -> ConsumerBuilder<BoxSource, H> {
    Consumer::builder(source, handler)
        .name("conformance")
        .dead_letter(DeadLetterRouter::new(h.publisher()))
        .retry_policy(fast_policy())
        .grace_period(Duration::from_secs(10))
}

fn start<H: Handler>(builder: ConsumerBuilder<BoxSource, H>) -> Result<RunningConsumer, String> {
    Ok(builder.build().map_err(err)?.spawn())
}

/// A test message: type `test.order`, key `key`, header `seq`, JSON payload.
pub fn order(seq: usize, key: &str) -> Envelope {
    Envelope::builder("test.order")
        .source("postbox-testkit")
        .key(key)
        .header("seq", seq.to_string())
        .payload(format!(r#"{{"seq":{seq}}}"#))
        .build()
}

fn seq_of(env: &Envelope) -> usize {
    env.headers
        .get("seq")
        .and_then(|s| s.parse().ok())
        .unwrap_or(usize::MAX)
}

async fn publish_all(h: &dyn Harness, topic: &str, envs: &[Envelope]) -> Result<(), String> {
    let publisher = h.publisher();
    for env in envs {
        publisher.publish(topic, env.clone()).await.map_err(err)?;
    }
    Ok(())
}

fn ids(envs: &[Envelope]) -> BTreeSet<String> {
    envs.iter().map(|e| e.id.to_string()).collect()
}

fn call_ids(calls: &[Call]) -> BTreeSet<String> {
    calls.iter().map(|c| c.envelope.id.to_string()).collect()
}

async fn wait_dlq(h: &dyn Harness, dlq: &str, n: u64) -> Result<Vec<Envelope>, String> {
    let ops = h.dead_letters();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let count = ops.count(dlq).await.map_err(err)?;
        if count >= n {
            return ops.peek(dlq, 100).await.map_err(err);
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!(
                "timed out waiting for {n} messages in {dlq}; it has {count}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn setup(h: &dyn Harness, test: &str, groups: &[&str]) -> Result<String, String> {
    let topic = h.topic(test);
    h.provision(&topic, groups).await.map_err(err)?;
    Ok(topic)
}

async fn subscribe(h: &dyn Harness, topic: &str, group: &str) -> Result<BoxSource, String> {
    h.subscribe(topic, group).await.map_err(err)
}

fn dlq_of(source: &BoxSource) -> String {
    postbox_core::dlq::default_destination(source.destination())
}

/// Publish before anyone subscribes; a subscriber then gets every message
/// with id, type, source, key, headers and payload intact.
pub async fn publish_before_subscribe_receives_all(h: &dyn Harness) -> TestResult {
    let topic = setup(h, "before", &["g"]).await?;
    let envs: Vec<Envelope> = (0..20)
        .map(|i| {
            let mut e = order(i, "k");
            e.correlation_id = Some(format!("corr-{i}"));
            e.subject = Some("subject".into());
            e.schema_version = Some("2".into());
            e
        })
        .collect();
    publish_all(h, &topic, &envs).await?;
    let spy = HandlerSpy::new();
    let running = start(consumer(h, subscribe(h, &topic, "g").await?, spy.clone()))?;
    spy.wait_for_successes(20, WAIT).await?;
    running.shutdown().await.map_err(err)?;
    for sent in &envs {
        let call = spy
            .calls_for(sent.id.as_str())
            .into_iter()
            .next()
            .ok_or(format!("message {} missing", sent.id))?;
        let got = &call.envelope;
        ensure!(
            got.event_type == sent.event_type && got.source == sent.source,
            "type/source changed: {got:?}"
        );
        ensure!(
            got.key == sent.key && got.correlation_id == sent.correlation_id,
            "key/correlation changed: {got:?}"
        );
        ensure!(
            got.subject == sent.subject && got.schema_version == sent.schema_version,
            "subject/version changed"
        );
        ensure!(
            got.headers.get("seq") == sent.headers.get("seq"),
            "headers changed: {:?}",
            got.headers
        );
        ensure!(got.payload == sent.payload, "payload changed");
        ensure!(got.time.is_some(), "time lost");
        ensure!(
            got.attempt == 1,
            "first delivery has attempt {}",
            got.attempt
        );
    }
    Ok(Verdict::Passed)
}

/// Four publishers at once; nothing is lost.
pub async fn concurrent_publishers_lose_nothing(h: &dyn Harness) -> TestResult {
    let topic = setup(h, "concurrent-pub", &["g"]).await?;
    let envs: Vec<Envelope> = (0..100).map(|i| order(i, &format!("k{}", i % 7))).collect();
    let mut tasks = Vec::new();
    for chunk in envs.chunks(25) {
        let publisher = h.publisher();
        let (topic, chunk) = (topic.clone(), chunk.to_vec());
        tasks.push(tokio::spawn(async move {
            for e in chunk {
                publisher.publish(&topic, e).await.map_err(err)?;
            }
            Ok::<_, String>(())
        }));
    }
    for t in tasks {
        t.await.map_err(err)??;
    }
    let spy = HandlerSpy::new();
    let running = start(consumer(h, subscribe(h, &topic, "g").await?, spy.clone()).concurrency(4))?;
    spy.wait_for_successes(100, WAIT).await?;
    running.shutdown().await.map_err(err)?;
    ensure!(call_ids(&spy.successes()) == ids(&envs), "ids differ");
    Ok(Verdict::Passed)
}

/// Several topics consumed at once stay isolated.
pub async fn many_topics_stay_isolated(h: &dyn Harness) -> TestResult {
    let mut topics = Vec::new();
    for i in 0..4 {
        topics.push(setup(h, &format!("iso{i}"), &["g"]).await?);
    }
    let mut work = Vec::new();
    for topic in &topics {
        let envs: Vec<Envelope> = (0..10).map(|i| order(i, topic)).collect();
        let spy = HandlerSpy::new();
        let running = start(consumer(h, subscribe(h, topic, "g").await?, spy.clone()))?;
        work.push((topic.clone(), envs, spy, running));
    }
    let publishes = work
        .iter()
        .map(|(topic, envs, _, _)| publish_all(h, topic, envs));
    for r in futures_util::future::join_all(publishes).await {
        r?;
    }
    for (topic, envs, spy, running) in work {
        spy.wait_for_successes(10, WAIT).await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
        running.shutdown().await.map_err(err)?;
        ensure!(
            call_ids(&spy.calls()) == ids(&envs),
            "consumer of {topic} saw foreign messages or missed some"
        );
    }
    Ok(Verdict::Passed)
}

/// A released (nacked) delivery comes back, with its attempt counted.
pub async fn release_leads_to_redelivery(h: &dyn Harness) -> TestResult {
    let topic = setup(h, "release", &["g"]).await?;
    let env = order(0, "k");
    publish_all(h, &topic, std::slice::from_ref(&env)).await?;
    let mut source = subscribe(h, &topic, "g").await?;
    let first = next(&mut source).await?;
    ensure!(first.envelope().id == env.id, "wrong message");
    first.release().await.map_err(|e| e.error.to_string())?;
    let again = next(&mut source).await?;
    ensure!(
        again.envelope().id == env.id,
        "released message not redelivered"
    );
    ensure!(
        again.attempt() == 2,
        "redelivery has attempt {}",
        again.attempt()
    );
    again.ack().await.map_err(|e| e.error.to_string())?;
    Ok(Verdict::Passed)
}

// Not `next_within`: the suite's futures must be `Send` for every lifetime,
// which the generic `Source::next` future does not promise.
async fn next(source: &mut BoxSource) -> Result<postbox_core::BoxDelivery, String> {
    match tokio::time::timeout(WAIT, source.next()).await {
        Ok(Some(Ok(d))) => Ok(d),
        Ok(Some(Err(e))) => Err(format!("receive failed: {e}")),
        Ok(None) => Err("source closed".into()),
        Err(_) => Err("no delivery within the time-out".into()),
    }
}

/// The next delivery of `source` within `within`, or what went wrong instead
/// (a receive error, the source closing, the time-out), for tests that read
/// a source by hand.
pub async fn next_within<S: Source>(
    source: &mut S,
    within: Duration,
) -> Result<S::Delivery, String> {
    match tokio::time::timeout(within, source.next()).await {
        Ok(Some(Ok(d))) => Ok(d),
        Ok(Some(Err(e))) => Err(format!("receive failed: {e}")),
        Ok(None) => Err("source closed".into()),
        Err(_) => Err(format!("no delivery within {within:?}")),
    }
}

/// With one consumer and concurrency 1, the next message waits until the
/// previous one is settled, and messages come in publish order.
pub async fn ordered_next_waits_for_ack(h: &dyn Harness) -> TestResult {
    if !h.capabilities().ordered {
        return Ok(Verdict::Skipped("adapter is not ordered"));
    }
    let topic = setup(h, "ordered", &["g"]).await?;
    let envs: Vec<Envelope> = (0..20).map(|i| order(i, "k")).collect();
    publish_all(h, &topic, &envs).await?;
    let spy =
        HandlerSpy::new().script(|_, _| Behaviour::SleepThenSucceed(Duration::from_millis(3)));
    let running = start(consumer(h, subscribe(h, &topic, "g").await?, spy.clone()))?;
    spy.wait_for_successes(20, WAIT).await?;
    running.shutdown().await.map_err(err)?;
    let calls = spy.calls();
    let seqs: Vec<usize> = calls.iter().map(|c| seq_of(&c.envelope)).collect();
    ensure!(
        seqs == (0..20).collect::<Vec<_>>(),
        "out of order: {seqs:?}"
    );
    for pair in calls.windows(2) {
        let finished = pair[0].finished.ok_or("unfinished call")?;
        ensure!(
            pair[1].started >= finished,
            "message {} started before {} finished",
            seq_of(&pair[1].envelope),
            seq_of(&pair[0].envelope)
        );
    }
    ensure!(
        spy.max_concurrency() == 1,
        "concurrency {}",
        spy.max_concurrency()
    );
    Ok(Verdict::Passed)
}

/// A consumer stopped mid-stream loses nothing: the next one gets the rest.
pub async fn consumer_closed_mid_stream_loses_nothing(h: &dyn Harness) -> TestResult {
    let topic = setup(h, "midstream", &["g"]).await?;
    let envs: Vec<Envelope> = (0..50).map(|i| order(i, &format!("k{i}"))).collect();
    publish_all(h, &topic, &envs).await?;
    let spy =
        HandlerSpy::new().script(|_, _| Behaviour::SleepThenSucceed(Duration::from_millis(5)));
    let first = start(consumer(h, subscribe(h, &topic, "g").await?, spy.clone()).concurrency(4))?;
    spy.wait_for_successes(10, WAIT).await?;
    first.shutdown().await.map_err(err)?;
    let second = start(consumer(h, subscribe(h, &topic, "g").await?, spy.clone()).concurrency(4))?;
    spy.wait_for_distinct_successes(50, WAIT).await?;
    second.shutdown().await.map_err(err)?;
    ensure!(
        call_ids(&spy.successes()) == ids(&envs),
        "messages lost across the close"
    );
    Ok(Verdict::Passed)
}

/// Subscribing and closing concurrently, while publishing, leaves things working.
pub async fn concurrent_subscribe_and_close_leave_things_working(h: &dyn Harness) -> TestResult {
    let topic = setup(h, "subclose", &["g"]).await?;
    let envs: Vec<Envelope> = (0..30).map(|i| order(i, &format!("k{i}"))).collect();
    let spy = HandlerSpy::new();
    let mut churn = Vec::new();
    for i in 0..5u64 {
        let source = subscribe(h, &topic, "g").await?;
        let builder = consumer(h, source, spy.clone());
        churn.push(tokio::spawn(async move {
            let running = builder.build().map_err(err)?.spawn();
            tokio::time::sleep(Duration::from_millis(10 * i)).await;
            running.shutdown().await.map_err(err)
        }));
    }
    publish_all(h, &topic, &envs).await?;
    for c in churn {
        c.await.map_err(err)??;
    }
    let last = start(consumer(h, subscribe(h, &topic, "g").await?, spy.clone()))?;
    // Each churned member that left mid-join costs the group a rebalance
    // before the last one gets its partitions: on tansu they leave one after
    // the other, about 5 s each, so the whole test takes up to ~30 s.
    spy.wait_for_distinct_successes(30, WAIT * 3).await?;
    last.shutdown().await.map_err(err)?;
    ensure!(call_ids(&spy.successes()) == ids(&envs), "messages lost");
    Ok(Verdict::Passed)
}

/// Releasing one message many times neither loses it nor wedges the others.
pub async fn repeated_nacks_neither_lose_nor_wedge(h: &dyn Harness) -> TestResult {
    let topic = setup(h, "nacks", &["g"]).await?;
    let envs: Vec<Envelope> = (0..3).map(|i| order(i, "k")).collect();
    publish_all(h, &topic, &envs).await?;
    let mut source = subscribe(h, &topic, "g").await?;
    let mut done = BTreeSet::new();
    let mut releases = 0;
    while done.len() < 3 {
        let d = next(&mut source).await?;
        let id = d.envelope().id.to_string();
        if id == envs[0].id.as_str() && releases < 5 {
            releases += 1;
            d.release().await.map_err(|e| e.error.to_string())?;
        } else {
            d.ack().await.map_err(|e| e.error.to_string())?;
            done.insert(id);
        }
    }
    ensure!(releases == 5, "released {releases} times");
    ensure!(done == ids(&envs), "messages lost");
    Ok(Verdict::Passed)
}

/// Per-key ordering lanes keep each key's order, even with retries in place.
pub async fn per_key_order_is_kept(h: &dyn Harness) -> TestResult {
    if !h.capabilities().ordered {
        return Ok(Verdict::Skipped("adapter is not ordered"));
    }
    let topic = setup(h, "perkey", &["g"]).await?;
    let envs: Vec<Envelope> = (0..100)
        .map(|i| order(i, &format!("key{}", i % 5)))
        .collect();
    publish_all(h, &topic, &envs).await?;
    let spy = HandlerSpy::new().script(|env, seen| {
        let seq = seq_of(env);
        if seq % 7 == 3 && seen == 0 {
            Behaviour::FailTransient
        } else {
            Behaviour::SleepThenSucceed(Duration::from_millis((seq % 4) as u64))
        }
    });
    let running = start(
        consumer(h, subscribe(h, &topic, "g").await?, spy.clone())
            .concurrency(4)
            .ordering(ProcessingOrder::PerKey),
    )?;
    spy.wait_for_successes(100, WAIT).await?;
    let report = running.shutdown().await.map_err(err)?;
    let mut per_key: HashMap<String, Vec<usize>> = HashMap::new();
    for c in spy.successes() {
        per_key
            .entry(c.envelope.key.clone().unwrap_or_default())
            .or_default()
            .push(seq_of(&c.envelope));
    }
    for (key, seqs) in per_key {
        let mut sorted = seqs.clone();
        sorted.sort_unstable();
        ensure!(seqs == sorted, "key {key} out of order: {seqs:?}");
        ensure!(seqs.len() == 20, "key {key} has {} messages", seqs.len());
    }
    ensure!(
        report.retried_in_place >= 14,
        "expected retries in place, report {report:?}"
    );
    ensure!(
        report.retried == 0,
        "ordered mode must not retry through the broker: {report:?}"
    );
    Ok(Verdict::Passed)
}

/// Publishing concurrently with a running consumer that is then closed loses nothing.
pub async fn concurrent_publish_then_close_loses_nothing(h: &dyn Harness) -> TestResult {
    let topic = setup(h, "pubclose", &["g"]).await?;
    let envs: Vec<Envelope> = (0..60).map(|i| order(i, &format!("k{i}"))).collect();
    let spy =
        HandlerSpy::new().script(|_, _| Behaviour::SleepThenSucceed(Duration::from_millis(2)));
    let first = start(consumer(h, subscribe(h, &topic, "g").await?, spy.clone()).concurrency(2))?;
    let publishes = envs.chunks(15).map(|chunk| publish_all(h, &topic, chunk));
    for r in futures_util::future::join_all(publishes).await {
        r?;
    }
    first.shutdown().await.map_err(err)?;
    let second = start(consumer(h, subscribe(h, &topic, "g").await?, spy.clone()).concurrency(2))?;
    spy.wait_for_distinct_successes(60, WAIT).await?;
    second.shutdown().await.map_err(err)?;
    ensure!(call_ids(&spy.successes()) == ids(&envs), "messages lost");
    Ok(Verdict::Passed)
}

/// A consumer of one topic never sees another topic's messages.
pub async fn topic_routing_is_isolated(h: &dyn Harness) -> TestResult {
    let a = setup(h, "route-a", &["g"]).await?;
    let b = setup(h, "route-b", &["g"]).await?;
    let spy_b = HandlerSpy::new();
    let running_b = start(consumer(h, subscribe(h, &b, "g").await?, spy_b.clone()))?;
    let envs: Vec<Envelope> = (0..5).map(|i| order(i, "k")).collect();
    publish_all(h, &a, &envs).await?;
    let spy_a = HandlerSpy::new();
    let running_a = start(consumer(h, subscribe(h, &a, "g").await?, spy_a.clone()))?;
    spy_a.wait_for_successes(5, WAIT).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    running_a.shutdown().await.map_err(err)?;
    running_b.shutdown().await.map_err(err)?;
    ensure!(
        spy_b.call_count() == 0,
        "consumer of {b} received {} messages of {a}",
        spy_b.call_count()
    );
    Ok(Verdict::Passed)
}

/// Cancelling a subscription stops delivery to it; a new one gets the rest.
pub async fn cancelled_subscription_stops_and_a_new_one_gets_the_rest(
    h: &dyn Harness,
) -> TestResult {
    let topic = setup(h, "cancel", &["g"]).await?;
    let envs: Vec<Envelope> = (0..20).map(|i| order(i, "k")).collect();
    publish_all(h, &topic, &envs).await?;
    let spy1 =
        HandlerSpy::new().script(|_, _| Behaviour::SleepThenSucceed(Duration::from_millis(10)));
    let first = start(consumer(h, subscribe(h, &topic, "g").await?, spy1.clone()))?;
    spy1.wait_for_successes(5, WAIT).await?;
    first.shutdown().await.map_err(err)?;
    let seen = spy1.call_count();
    tokio::time::sleep(Duration::from_millis(200)).await;
    ensure!(
        spy1.call_count() == seen,
        "a cancelled subscription kept receiving"
    );
    let spy2 = HandlerSpy::new();
    let second = start(consumer(h, subscribe(h, &topic, "g").await?, spy2.clone()))?;
    spy2.wait_until("the rest", WAIT, |calls| {
        let mut all = call_ids(&spy1.successes());
        all.extend(
            calls
                .iter()
                .filter(|c| c.finished.is_some())
                .map(|c| c.envelope.id.to_string()),
        );
        all.len() >= 20
    })
    .await?;
    second.shutdown().await.map_err(err)?;
    let mut all = call_ids(&spy1.successes());
    all.extend(call_ids(&spy2.successes()));
    ensure!(all == ids(&envs), "messages lost");
    Ok(Verdict::Passed)
}

/// Every consumer group gets every message.
pub async fn each_consumer_group_gets_every_message(h: &dyn Harness) -> TestResult {
    if !h.capabilities().fan_out {
        return Ok(Verdict::Skipped("adapter has no fan-out"));
    }
    let groups = ["g1", "g2", "g3"];
    let topic = setup(h, "fanout", &groups).await?;
    let envs: Vec<Envelope> = (0..20).map(|i| order(i, "k")).collect();
    publish_all(h, &topic, &envs).await?;
    for g in groups {
        let spy = HandlerSpy::new();
        let running = start(consumer(h, subscribe(h, &topic, g).await?, spy.clone()))?;
        spy.wait_for_successes(20, WAIT).await?;
        running.shutdown().await.map_err(err)?;
        ensure!(
            call_ids(&spy.successes()) == ids(&envs),
            "group {g} missed messages"
        );
    }
    Ok(Verdict::Passed)
}

/// Consumers of one group split the work; together they get everything.
pub async fn competing_consumers_split_the_work(h: &dyn Harness) -> TestResult {
    if !h.capabilities().competing_consumers {
        return Ok(Verdict::Skipped("adapter has no competing consumers"));
    }
    let topic = setup(h, "compete", &["g"]).await?;
    let envs: Vec<Envelope> = (0..40).map(|i| order(i, &format!("k{i}"))).collect();
    let (s1, s2) = (
        HandlerSpy::new().script(|_, _| Behaviour::SleepThenSucceed(Duration::from_millis(10))),
        HandlerSpy::new().script(|_, _| Behaviour::SleepThenSucceed(Duration::from_millis(10))),
    );
    let c1 = start(consumer(h, subscribe(h, &topic, "g").await?, s1.clone()))?;
    let c2 = start(consumer(h, subscribe(h, &topic, "g").await?, s2.clone()))?;
    publish_all(h, &topic, &envs).await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut all = call_ids(&s1.successes());
        all.extend(call_ids(&s2.successes()));
        if all.len() >= 40 {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "only {} of 40 processed",
            all.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c1.shutdown().await.map_err(err)?;
    c2.shutdown().await.map_err(err)?;
    ensure!(
        !s1.successes().is_empty() && !s2.successes().is_empty(),
        "one consumer got nothing: {} / {}",
        s1.successes().len(),
        s2.successes().len()
    );
    Ok(Verdict::Passed)
}

/// A retry-after delay is honoured within the adapter's tolerance.
pub async fn retry_after_delay_is_honoured(h: &dyn Harness) -> TestResult {
    let topic = setup(h, "delay", &["g"]).await?;
    let delay = Duration::from_millis(500);
    let spy = HandlerSpy::new().script(move |_, seen| {
        if seen == 0 {
            Behaviour::RetryAfter(delay)
        } else {
            Behaviour::Succeed
        }
    });
    let running = start(consumer(h, subscribe(h, &topic, "g").await?, spy.clone()))?;
    publish_all(h, &topic, &[order(0, "k")]).await?;
    let calls = spy.wait_for_calls(2, WAIT).await?;
    running.shutdown().await.map_err(err)?;
    let waited = calls[1].started.duration_since(calls[0].started);
    let tolerance = h.capabilities().delay_tolerance;
    ensure!(
        waited + Duration::from_millis(20) >= delay,
        "retried after {waited:?}, before the {delay:?} delay"
    );
    ensure!(
        waited <= delay + tolerance,
        "retried after {waited:?}, more than {delay:?} + {tolerance:?}"
    );
    Ok(Verdict::Passed)
}

/// The attempt counter increments on every redelivery.
pub async fn attempt_counter_increments(h: &dyn Harness) -> TestResult {
    let topic = setup(h, "attempts", &["g"]).await?;
    let spy = HandlerSpy::new().script(|_, seen| {
        if seen < 2 {
            Behaviour::FailTransient
        } else {
            Behaviour::Succeed
        }
    });
    let running = start(consumer(h, subscribe(h, &topic, "g").await?, spy.clone()))?;
    publish_all(h, &topic, &[order(0, "k")]).await?;
    spy.wait_for_successes(1, WAIT).await?;
    running.shutdown().await.map_err(err)?;
    let attempts: Vec<u32> = spy.calls().iter().map(|c| c.envelope.attempt).collect();
    ensure!(attempts == vec![1, 2, 3], "attempts seen {attempts:?}");
    Ok(Verdict::Passed)
}

fn check_metadata(
    env: &Envelope,
    reason: FailureReason,
    attempts: u32,
    origin: &str,
) -> Result<DeadLetterMetadata, String> {
    let m = DeadLetterMetadata::read(env)
        .ok_or(format!("incomplete dlq metadata: {:?}", env.headers))?;
    ensure!(
        m.reason == reason,
        "reason {:?}, expected {reason:?}",
        m.reason
    );
    ensure!(
        m.attempts == attempts,
        "attempts {}, expected {attempts}",
        m.attempts
    );
    ensure!(
        m.origin.destination == origin,
        "origin {:?}, expected {origin:?}",
        m.origin.destination
    );
    ensure!(m.consumer == "conformance", "consumer {:?}", m.consumer);
    ensure!(
        m.first_failed_at <= m.last_failed_at,
        "first failure after last"
    );
    ensure!(
        !m.error.is_empty() && !m.error_type.is_empty(),
        "error and error type must be set"
    );
    Ok(m)
}

/// After the last attempt the message is dead-lettered with the full metadata schema.
pub async fn dead_letter_after_max_attempts_with_metadata(h: &dyn Harness) -> TestResult {
    let topic = setup(h, "exhaust", &["g"]).await?;
    let spy = HandlerSpy::new().script(|_, _| Behaviour::FailTransient);
    let source = subscribe(h, &topic, "g").await?;
    let (dlq, origin) = (dlq_of(&source), source.destination().to_string());
    let running = start(consumer(h, source, spy.clone()))?;
    let sent = order(0, "k");
    publish_all(h, &topic, std::slice::from_ref(&sent)).await?;
    let dead = wait_dlq(h, &dlq, 1).await?;
    running.shutdown().await.map_err(err)?;
    ensure!(
        spy.call_count() == 3,
        "handler called {} times, expected 3",
        spy.call_count()
    );
    let env = &dead[0];
    ensure!(
        env.id == sent.id && env.payload == sent.payload,
        "DLQ copy changed id or payload"
    );
    let m = check_metadata(env, FailureReason::RetriesExhausted, 3, &origin)?;
    ensure!(
        m.error.contains("scripted transient failure"),
        "error {:?}",
        m.error
    );
    Ok(Verdict::Passed)
}

/// A permanent error dead-letters at once, without retries.
pub async fn permanent_error_dead_letters_immediately(h: &dyn Harness) -> TestResult {
    let topic = setup(h, "permanent", &["g"]).await?;
    let spy = HandlerSpy::new().script(|_, _| Behaviour::FailPermanent);
    let source = subscribe(h, &topic, "g").await?;
    let (dlq, origin) = (dlq_of(&source), source.destination().to_string());
    let running = start(consumer(h, source, spy.clone()))?;
    publish_all(h, &topic, &[order(0, "k")]).await?;
    let dead = wait_dlq(h, &dlq, 1).await?;
    running.shutdown().await.map_err(err)?;
    ensure!(
        spy.call_count() == 1,
        "handler called {} times",
        spy.call_count()
    );
    check_metadata(&dead[0], FailureReason::HandlerError, 1, &origin)?;
    Ok(Verdict::Passed)
}

#[derive(serde::Deserialize)]
struct Order {
    #[allow(dead_code)]
    seq: u64,
}

/// A payload that does not decode is dead-lettered (reason `decode`) and the
/// handler is never called.
pub async fn decode_failure_dead_letters_without_calling_the_handler(
    h: &dyn Harness,
) -> TestResult {
    let topic = setup(h, "decode", &["g"]).await?;
    let called = Arc::new(AtomicUsize::new(0));
    let counter = called.clone();
    let handler = typed(move |_order: TypedEnvelope<Order>| {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, AtomicOrdering::SeqCst);
            Ok(())
        }
    });
    let source = subscribe(h, &topic, "g").await?;
    let (dlq, origin) = (dlq_of(&source), source.destination().to_string());
    let running = start(consumer(h, source, handler))?;
    let bad = Envelope::builder("test.order").payload("{not json").build();
    publish_all(h, &topic, &[bad]).await?;
    let dead = wait_dlq(h, &dlq, 1).await?;
    running.shutdown().await.map_err(err)?;
    ensure!(
        called.load(AtomicOrdering::SeqCst) == 0,
        "the handler ran on an undecodable payload"
    );
    check_metadata(&dead[0], FailureReason::Decode, 1, &origin)?;
    Ok(Verdict::Passed)
}

/// A message that claims to be a CloudEvent but breaks the format, written
/// raw by the harness ([`Harness::publish_undecodable`]) between good ones,
/// is dead-lettered by the runtime through the consumer's router with reason
/// `decode` before any handler runs, as an envelope of type
/// [`UNDECODABLE_TYPE`] whose payload is the body as it arrived; the good
/// messages are handled. Skipped when the adapter cannot carry such input.
pub async fn undecodable_input_is_dead_lettered_with_reason_decode(h: &dyn Harness) -> TestResult {
    let topic = setup(h, "undecodable", &["g"]).await?;
    let Some(written) = h.publish_undecodable(&topic).await.map_err(err)? else {
        return Ok(Verdict::Skipped(
            "the adapter cannot carry undecodable input: it moves envelopes, never bytes",
        ));
    };
    let good: Vec<Envelope> = (0..2).map(|i| order(i, "k")).collect();
    publish_all(h, &topic, &good).await?;
    let spy = HandlerSpy::new();
    let source = subscribe(h, &topic, "g").await?;
    let dlq = dlq_of(&source);
    let running = start(consumer(h, source, spy.clone()))?;
    let seen = |spy: &HandlerSpy| -> Vec<(String, String)> {
        spy.calls()
            .iter()
            .map(|c| (c.envelope.id.to_string(), c.envelope.event_type.to_string()))
            .collect()
    };
    spy.wait_for_successes(2, WAIT).await?;
    wait_dlq(h, &dlq, 1)
        .await
        .map_err(|e| format!("{e}; the handler saw (id, type) {:?}", seen(&spy)))?;
    let report = running.shutdown().await.map_err(err)?;
    ensure!(
        call_ids(&spy.calls()) == ids(&good) && spy.call_count() == 2,
        "the handler saw (id, type) {:?}, expected only the good {:?}",
        seen(&spy),
        ids(&good)
    );
    ensure!(
        report.dead_lettered == 1,
        "dead-lettered {} (expected 1): {report:?}",
        report.dead_lettered
    );
    let dead = h.dead_letters().peek(&dlq, 10).await.map_err(err)?;
    ensure!(dead.len() == 1, "{dlq} shows {} dead letters", dead.len());
    let env = &dead[0];
    ensure!(
        env.event_type == UNDECODABLE_TYPE,
        "dead letter of type {:?}, expected {UNDECODABLE_TYPE:?}",
        env.event_type
    );
    let m = DeadLetterMetadata::read(env)
        .ok_or(format!("incomplete dlq metadata: {:?}", env.headers))?;
    ensure!(
        m.reason == FailureReason::Decode,
        "reason {:?}, expected Decode",
        m.reason
    );
    ensure!(m.error_type == "decode", "error type {:?}", m.error_type);
    ensure!(m.consumer == "conformance", "consumer {:?}", m.consumer);
    ensure!(
        env.payload == written,
        "payload {:?}, expected the bytes written {:?}",
        String::from_utf8_lossy(&env.payload),
        String::from_utf8_lossy(&written)
    );
    Ok(Verdict::Passed)
}

/// A panicking handler is retried (reason `panic`) and the consumer survives.
pub async fn panic_is_retried_and_the_consumer_survives(h: &dyn Harness) -> TestResult {
    let topic = setup(h, "panic", &["g"]).await?;
    let spy = HandlerSpy::new().script(|env, seen| {
        if seq_of(env) == 0 && seen == 0 {
            Behaviour::Panic
        } else {
            Behaviour::Succeed
        }
    });
    let running = start(consumer(h, subscribe(h, &topic, "g").await?, spy.clone()))?;
    publish_all(h, &topic, &[order(0, "k"), order(1, "k")]).await?;
    spy.wait_for_successes(2, WAIT).await?;
    let report = running.shutdown().await.map_err(err)?;
    ensure!(spy.call_count() == 3, "calls {}", spy.call_count());
    ensure!(
        report.dead_lettered == 0,
        "dead-lettered after a panic: {report:?}"
    );
    Ok(Verdict::Passed)
}

struct Counted<H> {
    inner: H,
    done: Arc<AtomicUsize>,
}

impl<H: Handler> Handler for Counted<H> {
    async fn handle(&self, envelope: &Envelope) -> HandlerResult {
        let r = self.inner.handle(envelope).await;
        if r.is_ok() {
            self.done.fetch_add(1, AtomicOrdering::SeqCst);
        }
        r
    }
}

async fn wait_count(counter: &AtomicUsize, n: usize) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + WAIT;
    while counter.load(AtomicOrdering::SeqCst) < n {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "only {} of {n} deliveries completed",
            counter.load(AtomicOrdering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Duplicates of a processed message are skipped by the idempotency layer.
pub async fn duplicates_are_suppressed_by_the_idempotency_layer(h: &dyn Harness) -> TestResult {
    let topic = setup(h, "dedup", &["g"]).await?;
    let spy = HandlerSpy::new();
    let done = Arc::new(AtomicUsize::new(0));
    let handler = Counted {
        inner: HandlerBuilder::new()
            .layer(IdempotencyLayer::new(Arc::new(
                MemoryIdempotencyStore::new(1000),
            )))
            .handler(spy.clone()),
        done: done.clone(),
    };
    let running = start(consumer(h, subscribe(h, &topic, "g").await?, handler))?;
    let env = order(0, "k");
    publish_all(
        h,
        &topic,
        &[env.clone(), env.clone(), env.clone(), order(1, "k")],
    )
    .await?;
    wait_count(&done, 4).await?;
    running.shutdown().await.map_err(err)?;
    ensure!(
        spy.calls_for(env.id.as_str()).len() == 1,
        "duplicate processed {} times",
        spy.calls_for(env.id.as_str()).len()
    );
    ensure!(spy.call_count() == 2, "calls {}", spy.call_count());
    Ok(Verdict::Passed)
}

/// Two copies of one message in flight at once have one effect.
pub async fn duplicates_in_flight_at_once_have_one_effect(h: &dyn Harness) -> TestResult {
    let topic = setup(h, "dedup-inflight", &["g"]).await?;
    let spy =
        HandlerSpy::new().script(|_, _| Behaviour::SleepThenSucceed(Duration::from_millis(300)));
    let done = Arc::new(AtomicUsize::new(0));
    let handler = Counted {
        inner: HandlerBuilder::new()
            .layer(
                IdempotencyLayer::new(Arc::new(MemoryIdempotencyStore::new(1000)))
                    .lease(Duration::from_secs(5)),
            )
            .handler(spy.clone()),
        done: done.clone(),
    };
    let policy = RetryPolicy::exponential(Duration::from_millis(20))
        .with_max_delay(Duration::from_secs(6))
        .with_max_attempts(10);
    let running = start(
        consumer(h, subscribe(h, &topic, "g").await?, handler)
            .concurrency(2)
            .retry_policy(policy),
    )?;
    let env = order(0, "k");
    publish_all(h, &topic, &[env.clone(), env.clone()]).await?;
    wait_count(&done, 2).await?;
    running.shutdown().await.map_err(err)?;
    ensure!(
        spy.call_count() == 1,
        "the effect ran {} times",
        spy.call_count()
    );
    Ok(Verdict::Passed)
}

/// On shutdown, in-flight handlers finish and ack; nothing is redelivered.
pub async fn graceful_shutdown_finishes_in_flight_handlers(h: &dyn Harness) -> TestResult {
    let topic = setup(h, "shutdown", &["g"]).await?;
    let spy =
        HandlerSpy::new().script(|_, _| Behaviour::SleepThenSucceed(Duration::from_millis(300)));
    let running = start(consumer(h, subscribe(h, &topic, "g").await?, spy.clone()).concurrency(4))?;
    let envs: Vec<Envelope> = (0..4).map(|i| order(i, &format!("k{i}"))).collect();
    publish_all(h, &topic, &envs).await?;
    spy.wait_for_calls(4, WAIT).await?;
    let report = running.shutdown().await.map_err(err)?;
    ensure!(
        report.acked == 4 && report.released == 0 && report.abandoned == 0,
        "report {report:?}"
    );
    ensure!(
        spy.successes().len() == 4,
        "{} handlers finished",
        spy.successes().len()
    );
    let after = HandlerSpy::new();
    let again = start(consumer(h, subscribe(h, &topic, "g").await?, after.clone()))?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    again.shutdown().await.map_err(err)?;
    ensure!(
        after.call_count() == 0,
        "{} finished messages were redelivered",
        after.call_count()
    );
    Ok(Verdict::Passed)
}

/// Shutdown means settled: `shutdown()` returns only after every ack it
/// reports has been confirmed by the broker, so a process may exit (drop its
/// connections) right after it. 100 messages, 16 handlers at a time; after
/// 30 successes, while 8 or more handlers run, the consumer is shut down
/// and at once the handle its source came from is closed (a second,
/// independent handle from [`Harness::reconnect`], so its connections go
/// while the harness's stay; without one, the harness itself and nothing is
/// closed). The report counts exactly the handlers that finished (those in
/// flight included) and nothing is abandoned; a fresh consumer of the group
/// then gets exactly the other messages: none of the acked ones again, none
/// lost.
///
/// Per broker this checks that the settles reported are on the broker when
/// `shutdown()` returns: Kafka's watermark commit on close, RabbitMQ's acks
/// (batched) flushed before the channel goes, SQS's deletes confirmed and
/// the messages it received but never handed out returned (otherwise they
/// come back only when their visibility timeout ends).
pub async fn shutdown_then_disconnect_settles_everything(h: &dyn Harness) -> TestResult {
    const N: usize = 100;
    let topic = setup(h, "settled", &["g"]).await?;
    let envs: Vec<Envelope> = (0..N).map(|i| order(i, &format!("k{i}"))).collect();
    publish_all(h, &topic, &envs).await?;
    let second = h.reconnect().await.map_err(err)?;
    let source = match &second {
        Some(broker) => broker
            .subscribe(&topic, h.subscribe_options("g"))
            .await
            .map_err(err)?,
        None => subscribe(h, &topic, "g").await?,
    };
    let spy =
        HandlerSpy::new().script(|_, _| Behaviour::SleepThenSucceed(Duration::from_millis(5)));
    let first = start(consumer(h, source, spy.clone()).concurrency(16))?;
    // Handlers of equal length finish in waves of 16: wait for a wave in
    // flight, not for the gap between two.
    spy.wait_until(
        "30 successful calls and 8 or more handlers running",
        WAIT,
        |calls| {
            let running = calls.iter().filter(|c| c.finished.is_none()).count();
            calls.iter().filter(|c| c.succeeded()).count() >= 30 && running >= 8
        },
    )
    .await?;
    let finished_before = spy.successes().len();
    let report = first.shutdown().await.map_err(err)?;
    // At once, as a process exiting after `shutdown()` would.
    if let Some(broker) = second {
        broker.close().await.map_err(err)?;
        drop(broker);
    }
    let acked = spy.successes();
    ensure!(
        report.acked == acked.len() as u64,
        "the report counts {} acks but {} handlers finished: {report:?}",
        report.acked,
        acked.len()
    );
    ensure!(
        spy.call_count() == acked.len(),
        "{} handlers started but {} finished",
        spy.call_count(),
        acked.len()
    );
    ensure!(
        report.abandoned == 0
            && report.settle_failures == 0
            && report.retried == 0
            && report.dead_lettered == 0,
        "nothing should be abandoned, fail to settle, retry or dead-letter: {report:?}"
    );
    ensure!(
        report.received == report.acked + report.released,
        "received != acked + released: {report:?}"
    );
    ensure!(
        acked.len() > finished_before,
        "no handler was in flight when shutdown() was called ({finished_before} had finished)"
    );
    let acked_ids = call_ids(&acked);
    ensure!(
        acked_ids.len() == acked.len(),
        "the first consumer handled {} messages, {} distinct",
        acked.len(),
        acked_ids.len()
    );
    let rest = N - acked_ids.len();
    let after = HandlerSpy::new();
    let again = start(consumer(h, subscribe(h, &topic, "g").await?, after.clone()))?;
    let waited = after.wait_for_successes(rest, WAIT).await;
    // Anything redelivered late (an ack that never arrived) shows up now.
    tokio::time::sleep(Duration::from_secs(1)).await;
    again.shutdown().await.map_err(err)?;
    let seen = after.successes();
    let again_acked: Vec<String> = seen
        .iter()
        .map(|c| c.envelope.id.to_string())
        .filter(|id| acked_ids.contains(id))
        .collect();
    ensure!(
        again_acked.is_empty(),
        "{} of the {} messages acked before shutdown() returned were delivered again \
         (report {report:?}), e.g. {:?}",
        again_acked.len(),
        acked_ids.len(),
        again_acked.iter().take(5).collect::<Vec<_>>()
    );
    waited?;
    let seen_ids = call_ids(&seen);
    let all: BTreeSet<String> = acked_ids.union(&seen_ids).cloned().collect();
    ensure!(
        all == ids(&envs),
        "{} of {N} messages lost (first consumer acked {}, the fresh one handled {})",
        ids(&envs).difference(&all).count(),
        acked_ids.len(),
        seen_ids.len()
    );
    ensure!(
        after.call_count() == rest,
        "the fresh consumer handled {} calls for the {rest} messages left (repeats)",
        after.call_count()
    );
    Ok(Verdict::Passed)
}

/// Retry and DLQ metadata replace old values: headers do not grow.
pub async fn headers_do_not_grow_across_retries(h: &dyn Harness) -> TestResult {
    let topic = setup(h, "headers", &["g"]).await?;
    let spy = HandlerSpy::new().script(|_, _| Behaviour::FailTransient);
    let source = subscribe(h, &topic, "g").await?;
    let dlq = dlq_of(&source);
    let policy = RetryPolicy::exponential(Duration::from_millis(5))
        .with_max_delay(Duration::from_millis(50))
        .with_max_attempts(6);
    let running = start(consumer(h, source, spy.clone()).retry_policy(policy))?;
    let sent = order(0, "k");
    publish_all(h, &topic, std::slice::from_ref(&sent)).await?;
    let dead = wait_dlq(h, &dlq, 1).await?;
    running.shutdown().await.map_err(err)?;
    let counts: Vec<usize> = spy
        .calls()
        .iter()
        .map(|c| c.envelope.headers.len())
        .collect();
    ensure!(counts.len() == 6, "calls {}", counts.len());
    ensure!(
        counts[1..].windows(2).all(|w| w[0] == w[1]),
        "headers grew across retries: {counts:?}"
    );
    ensure!(
        counts[1] <= sent.headers.len() + 2,
        "retry added more than its 2 headers: {counts:?}"
    );
    ensure!(
        dead[0].headers.len() <= sent.headers.len() + 10,
        "DLQ copy has {} headers",
        dead[0].headers.len()
    );
    Ok(Verdict::Passed)
}

/// Binary (non-UTF-8) payloads round-trip byte for byte.
pub async fn binary_payloads_round_trip(h: &dyn Harness) -> TestResult {
    let topic = setup(h, "binary", &["g"]).await?;
    let mut bytes: Vec<u8> = (0..=255u8).collect();
    bytes.extend_from_slice(&[0xff, 0xfe, 0x00, 0xc3, 0x28]);
    let env = Envelope::builder("test.blob")
        .content_type("application/octet-stream")
        .payload(Bytes::from(bytes.clone()))
        .build();
    publish_all(h, &topic, std::slice::from_ref(&env)).await?;
    let spy = HandlerSpy::new();
    let running = start(consumer(h, subscribe(h, &topic, "g").await?, spy.clone()))?;
    let calls = spy.wait_for_successes(1, WAIT).await?;
    running.shutdown().await.map_err(err)?;
    ensure!(calls[0].envelope.payload == bytes, "payload changed");
    ensure!(
        calls[0].envelope.content_type == "application/octet-stream",
        "content type changed"
    );
    Ok(Verdict::Passed)
}

/// Header budgets and size limits are checked before sending, with a typed
/// error naming the limit and the envelope handed back.
pub async fn limits_are_typed_errors(h: &dyn Harness) -> TestResult {
    let caps = h.capabilities();
    if caps.header_limit.is_none() && caps.size_limit.is_none() {
        return Ok(Verdict::Skipped("adapter enforces no header or size limit"));
    }
    let topic = setup(h, "limits", &["g"]).await?;
    let publisher = h.publisher();
    if let Some(max) = caps.header_limit {
        let mut env = order(0, "k");
        for i in 0..max + 5 {
            env.headers.insert(format!("h{i}"), "v".into());
        }
        let id = env.id.clone();
        let e = publisher
            .publish(&topic, env)
            .await
            .err()
            .ok_or("too many headers were accepted")?;
        ensure!(
            matches!(
                e.error.kind(),
                ErrorKind::LimitExceeded(Limit::AttributeCount { .. })
            ),
            "error {:?}",
            e.error
        );
        ensure!(e.envelope.id == id, "the envelope was not handed back");
    }
    if let Some(max) = caps.size_limit {
        let env = Envelope::builder("test.big")
            .content_type("application/octet-stream")
            .payload(vec![7u8; max + 1])
            .build();
        let e = publisher
            .publish(&topic, env)
            .await
            .err()
            .ok_or("an oversized message was accepted")?;
        ensure!(
            matches!(
                e.error.kind(),
                ErrorKind::LimitExceeded(Limit::BodySize { .. })
            ),
            "error {:?}",
            e.error
        );
    }
    Ok(Verdict::Passed)
}

/// `publish_batch` reports each message; a bad one fails alone.
pub async fn publish_batch_reports_each_message(h: &dyn Harness) -> TestResult {
    let topic = setup(h, "batch", &["g"]).await?;
    let mut envs: Vec<Envelope> = (0..25).map(|i| order(i, &format!("k{i}"))).collect();
    let bad_index = h.capabilities().header_limit.map(|max| {
        for i in 0..max + 5 {
            envs[7].headers.insert(format!("h{i}"), "v".into());
        }
        7
    });
    let report = h.publisher().publish_batch(&topic, envs.clone()).await;
    ensure!(report.len() == 25, "report has {} results", report.len());
    let failed: Vec<usize> = report.failures().map(|(i, _)| i).collect();
    match bad_index {
        Some(i) => ensure!(
            failed == vec![i] && !report.is_success(),
            "failures {failed:?}"
        ),
        None => ensure!(
            report.is_success() && report.succeeded() == 25,
            "failures {failed:?}"
        ),
    }
    let expected: Vec<Envelope> = envs
        .iter()
        .enumerate()
        .filter(|(i, _)| Some(*i) != bad_index)
        .map(|(_, e)| e.clone())
        .collect();
    let spy = HandlerSpy::new();
    let running = start(consumer(h, subscribe(h, &topic, "g").await?, spy.clone()).concurrency(4))?;
    spy.wait_for_successes(expected.len(), WAIT).await?;
    running.shutdown().await.map_err(err)?;
    ensure!(
        call_ids(&spy.successes()) == ids(&expected),
        "batch messages lost"
    );
    Ok(Verdict::Passed)
}

/// DLQ operations: count, peek without consuming, replay (filtered, ids kept), purge.
pub async fn dead_letter_operations(h: &dyn Harness) -> TestResult {
    let topic = setup(h, "dlqops", &["g"]).await?;
    let spy = HandlerSpy::new().script(|_, seen| {
        if seen == 0 {
            Behaviour::FailPermanent
        } else {
            Behaviour::Succeed
        }
    });
    let source = subscribe(h, &topic, "g").await?;
    let dlq = dlq_of(&source);
    let running = start(consumer(h, source, spy.clone()))?;
    let envs: Vec<Envelope> = (0..3).map(|i| order(i, "k")).collect();
    publish_all(h, &topic, &envs).await?;
    wait_dlq(h, &dlq, 3).await?;
    let ops = h.dead_letters();
    let peeked = ops.peek(&dlq, 10).await.map_err(err)?;
    ensure!(ids(&peeked) == ids(&envs), "peek shows {:?}", ids(&peeked));
    ensure!(
        ops.count(&dlq).await.map_err(err)? == 3,
        "peek consumed messages"
    );
    let keep = envs[2].id.clone();
    let filter = move |e: &Envelope| e.id != keep;
    let report = ops.replay(&dlq, &filter, 10).await.map_err(err)?;
    ensure!(report.replayed == 2, "replay report {report:?}");
    spy.wait_for_successes(2, WAIT).await?;
    running.shutdown().await.map_err(err)?;
    for e in &envs[..2] {
        let calls = spy.calls_for(e.id.as_str());
        ensure!(
            calls.len() == 2,
            "replayed message {} seen {} times",
            e.id,
            calls.len()
        );
        ensure!(
            !calls[1]
                .envelope
                .headers
                .keys()
                .any(|k| postbox_core::dlq::is_metadata(k)),
            "replayed copy kept dlq headers"
        );
    }
    ensure!(
        ops.count(&dlq).await.map_err(err)? == 1,
        "replayed messages left in the DLQ"
    );
    ensure!(ops.purge(&dlq).await.map_err(err)? == 1, "purge count");
    ensure!(
        ops.count(&dlq).await.map_err(err)? == 0,
        "purge left messages"
    );
    Ok(Verdict::Passed)
}

/// Never more handlers at once than the configured concurrency.
pub async fn in_flight_is_bounded_by_concurrency(h: &dyn Harness) -> TestResult {
    let topic = setup(h, "bounded", &["g"]).await?;
    let envs: Vec<Envelope> = (0..24).map(|i| order(i, &format!("k{i}"))).collect();
    publish_all(h, &topic, &envs).await?;
    let spy =
        HandlerSpy::new().script(|_, _| Behaviour::SleepThenSucceed(Duration::from_millis(20)));
    let running = start(consumer(h, subscribe(h, &topic, "g").await?, spy.clone()).concurrency(3))?;
    spy.wait_for_successes(24, WAIT).await?;
    running.shutdown().await.map_err(err)?;
    ensure!(
        spy.max_concurrency() <= 3,
        "{} handlers ran at once",
        spy.max_concurrency()
    );
    ensure!(spy.max_concurrency() >= 2, "no concurrency at all");
    Ok(Verdict::Passed)
}
