//! What an independent CloudEvents reader must see of an envelope: helpers
//! for the adapters' interop tests, written from the CloudEvents
//! specification rather than from postbox's codecs.

use std::collections::BTreeMap;

use postbox_core::Envelope;

/// Whether `name` is a valid CloudEvents attribute name: lower-case ASCII
/// letters and digits, 1 to 20 characters (the specification's MUST and
/// SHOULD).
///
/// ```
/// use postbox_testkit::interop::strict_attribute_name;
/// assert!(strict_attribute_name("dlqreason"));
/// assert!(!strict_attribute_name("dlq.reason"));
/// ```
pub fn strict_attribute_name(name: &str) -> bool {
    (1..=20).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// The extension attributes `env` travels with: its optional fields under
/// their CloudEvents extension names, `attempt`, and every header.
pub fn expected_extensions(env: &Envelope) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = env.headers.clone().into_iter().collect();
    let fields = [
        ("dataversion", env.schema_version.as_deref()),
        ("correlationid", env.correlation_id.as_deref()),
        ("causationid", env.causation_id.as_deref()),
        ("partitionkey", env.key.as_deref()),
        ("traceparent", env.traceparent.as_deref()),
        ("tracestate", env.tracestate.as_deref()),
    ];
    for (name, value) in fields {
        if let Some(v) = value {
            out.insert(name.to_string(), v.to_string());
        }
    }
    out.insert("attempt".into(), env.attempt.to_string());
    out
}
