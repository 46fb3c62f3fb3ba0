//! The test environment every adapter's tests share: where the brokers are,
//! whether an unreachable one fails the run or is skipped by name, and fresh
//! names. One copy here instead of one per crate's `tests/common`.

use std::fmt::Display;
use std::future::Future;
use std::io::Write as _;

/// The variable `name`, or `default` when it is unset or empty.
pub fn var_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_string())
}

/// Whether an unreachable broker must fail the run (`CI` or
/// `POSTBOX_REQUIRE_BROKERS=1`), instead of skipping the test by name.
pub fn brokers_required() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
        || std::env::var("POSTBOX_REQUIRE_BROKERS").is_ok_and(|v| v == "1")
}

/// Reports that `broker` is unreachable for `test`: a panic when brokers are
/// required, else a skip line on stderr (shown even under capture).
pub fn unreachable(test: &str, broker: &str, why: impl Display) {
    if brokers_required() {
        panic!("{test}: {broker} is unreachable: {why} (start it with `scripts/brokers.sh up`)");
    }
    let _ = writeln!(
        std::io::stderr(),
        "{test}: SKIPPED ({broker} unreachable: {why}; run `scripts/brokers.sh up`, or `scripts/test.sh`)"
    );
}

/// Awaits `connect`; on error reports `broker` unreachable for `test` (see
/// [`unreachable()`]) and returns `None`.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let got = postbox_testkit::env::connect_or_skip("demo", "a broker", async {
///     Ok::<_, postbox_core::Error>(42)
/// }).await;
/// assert_eq!(got, Some(42));
/// # }
/// ```
pub async fn connect_or_skip<T, E: Display>(
    test: &str,
    broker: &str,
    connect: impl Future<Output = Result<T, E>>,
) -> Option<T> {
    match connect.await {
        Ok(t) => Some(t),
        Err(e) => {
            unreachable(test, broker, e);
            None
        }
    }
}

/// A name no other run uses: `<prefix>-<uuid v7>`.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::now_v7().simple())
}
