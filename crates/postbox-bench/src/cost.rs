//! The code's own cost per message (docs/design.md §12): instructions from
//! `valgrind --tool=callgrind` and allocations from the counting allocator,
//! each as the difference between a run of 2,000 and one of 1,000 deliveries,
//! so fixed costs (runtime, broker, consumer start and shutdown) cancel out.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::Command;

use postbox_core::{DeadLetterOps as _, Envelope};
use postbox_memory::MemoryBroker;

use crate::alloc::{self, Snapshot};
use crate::postbox::{publish, Round, EVENT_TYPE};
use crate::workload;

/// The two run sizes whose difference is the steady-state cost.
pub(crate) const SMALL: u64 = 1_000;
/// See [`SMALL`].
pub(crate) const LARGE: u64 = 2_000;

/// What a `--count` run exercises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part {
    /// The whole postbox path: new envelope, publish, consume, handle, ack.
    Path,
    /// Only `Envelope::new` (the envelope's own cost, reported separately).
    Envelope,
    /// `Envelope::new` and publish, no consumer (the queue is grown to its
    /// size beforehand, by the same amount in every run).
    Publish,
}

impl Part {
    pub(crate) fn parse(s: &str) -> Option<Part> {
        match s {
            "path" => Some(Part::Path),
            "envelope" => Some(Part::Envelope),
            "publish" => Some(Part::Publish),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Part::Path => "path",
            Part::Envelope => "envelope",
            Part::Publish => "publish",
        }
    }
}

/// Runs `part` for `n` messages on a current-thread runtime (deterministic
/// interleaving, so callgrind counts repeat) and returns what it allocated.
pub(crate) fn count(part: Part, n: u64, payload_size: usize, window: usize) -> Snapshot {
    let payload = workload::payload(payload_size);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let broker = MemoryBroker::new();
    let queue = format!("cost.{}.{n}", part.name());
    if part == Part::Publish {
        // Fixed work, the same in every run: grow the queue so that the
        // measured publishes do not reallocate it.
        rt.block_on(async {
            for _ in 0..LARGE {
                publish(&broker, &queue, &payload).await;
            }
            broker.purge(&queue).await.expect("purge");
        });
    }
    alloc::set_counting(true);
    let before = Snapshot::now();
    match part {
        Part::Path => {
            rt.block_on(
                Round {
                    broker: &broker,
                    queue,
                    messages: n,
                    payload: &payload,
                    window,
                    concurrency: 1,
                    erased: false,
                }
                .run(),
            );
        }
        Part::Envelope => {
            for _ in 0..n {
                black_box(Envelope::new(EVENT_TYPE, payload.clone()));
            }
        }
        Part::Publish => {
            // The envelopes stay queued and are dropped with the broker: one
            // drop per message, as in the path (where the ack drops it).
            rt.block_on(async {
                for _ in 0..n {
                    publish(&broker, &queue, &payload).await;
                }
            });
        }
    }
    let spent = Snapshot::now().since(before);
    alloc::set_counting(false);
    spent
}

/// Wall-clock nanoseconds per `Envelope::new` (the envelope's own cost in
/// time; callgrind cannot see the clock and random-number reads it makes).
pub(crate) fn envelope_nanos(payload_size: usize) -> f64 {
    const N: u32 = 1_000_000;
    let payload = workload::payload(payload_size);
    let started = std::time::Instant::now();
    for _ in 0..N {
        black_box(Envelope::new(EVENT_TYPE, payload.clone()));
    }
    started.elapsed().as_nanos() as f64 / f64::from(N)
}

/// The `--count` mode: prints one machine-readable line.
pub(crate) fn count_mode(part: Part, n: u64, payload_size: usize, window: usize) {
    let spent = count(part, n, payload_size, window);
    println!(
        "count part={} messages={n} allocations={} bytes={}",
        part.name(),
        spent.allocations,
        spent.bytes
    );
}

/// Allocations per message in this process: `LARGE` minus `SMALL`.
pub(crate) fn allocations_per_message(
    part: Part,
    payload_size: usize,
    window: usize,
) -> (f64, f64) {
    // Warm-up: lazily initialised statics and thread-locals.
    let _ = count(part, SMALL, payload_size, window);
    let small = count(part, SMALL, payload_size, window);
    let large = count(part, LARGE, payload_size, window);
    per_message(small, large)
}

fn per_message(small: Snapshot, large: Snapshot) -> (f64, f64) {
    let n = (LARGE - SMALL) as f64;
    (
        (large.allocations as f64 - small.allocations as f64) / n,
        (large.bytes as f64 - small.bytes as f64) / n,
    )
}

/// Callgrind's result for one `--count` run.
struct Measured {
    instructions: u64,
    allocations: u64,
}

/// Instructions and allocations per message under callgrind, or why not.
pub(crate) struct Callgrind {
    pub(crate) instructions: f64,
    pub(crate) allocations: f64,
}

/// Runs this binary under `valgrind --tool=callgrind` with `--count SMALL` and
/// `--count LARGE` and returns the per-message difference.
pub(crate) fn callgrind(
    part: Part,
    payload_size: usize,
    window: usize,
) -> Result<Callgrind, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let dir = std::env::temp_dir().join(format!("postbox-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let result = (|| {
        let small = callgrind_run(&exe, &dir, part, SMALL, payload_size, window)?;
        let large = callgrind_run(&exe, &dir, part, LARGE, payload_size, window)?;
        let n = (LARGE - SMALL) as f64;
        Ok(Callgrind {
            instructions: (large.instructions as f64 - small.instructions as f64) / n,
            allocations: (large.allocations as f64 - small.allocations as f64) / n,
        })
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn callgrind_run(
    exe: &Path,
    dir: &Path,
    part: Part,
    n: u64,
    payload_size: usize,
    window: usize,
) -> Result<Measured, String> {
    let out: PathBuf = dir.join(format!("callgrind.{}.{n}.out", part.name()));
    let output = Command::new("valgrind")
        .arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg(exe)
        .args(["--count", &n.to_string(), "--part", part.name()])
        .args(["--payload", &payload_size.to_string()])
        .args(["--window", &window.to_string()])
        .output()
        .map_err(|e| format!("valgrind could not be started: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "valgrind exited with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
                .lines()
                .last()
                .unwrap_or("")
        ));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let allocations = stdout
        .split_whitespace()
        .find_map(|w| w.strip_prefix("allocations="))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no allocation count in {stdout:?}"))?;
    let profile = std::fs::read_to_string(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let instructions = profile
        .lines()
        .find_map(|l| {
            l.strip_prefix("totals:")
                .or_else(|| l.strip_prefix("summary:"))
        })
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no totals in {}", out.display()))?;
    Ok(Measured {
        instructions,
        allocations,
    })
}

/// Whether `valgrind` can be run.
pub(crate) fn valgrind_available() -> bool {
    Command::new("valgrind")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}
