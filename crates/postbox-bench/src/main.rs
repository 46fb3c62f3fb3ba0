//! # postbox-bench
//!
//! Raw tokio versus postbox on the in-memory broker, side by side in one run,
//! following docs/design.md §12 ("Benchmarks: how a number is earned"):
//!
//! * **raw**: a producer task sends a message struct carrying a `Bytes`
//!   payload through a bounded `tokio::sync::mpsc` channel to a consumer task
//!   that decodes it (black-boxed) and acks it (an ack counter).
//! * **postbox**: `MemoryBroker` publish through the `Publisher` trait (a new
//!   `Envelope` per message, as users write it) → `Consumer` runtime (with a
//!   dead-letter router, concurrency 1 and a higher concurrency) → a handler
//!   doing the same decode → ack.
//!
//! Same tokio runtime, same build, same payload and the same in-flight window
//! on both sides; the consumer is attached before the first publish; every
//! round uses a fresh queue; a warm-up round per variant is discarded; raw and
//! postbox rounds are interleaved, at least three each; best / median / worst
//! and the median ratio are printed, a difference smaller than the spread is
//! called indistinguishable. Then the code's own cost: instructions (callgrind)
//! and allocations (a counting allocator) per message, as the difference
//! between 2,000 and 1,000 deliveries.
//!
//! ```text
//! cargo run --release -p postbox-bench                     # everything, < 60 s
//! cargo run --release -p postbox-bench -- --help           # options
//! cargo run --release -p postbox-bench -- kafka --help     # raw rdkafka vs postbox-kafka
//! valgrind --tool=callgrind target/release/postbox-bench --count 2000
//! ```

mod alloc;
mod cost;
mod env;
mod kafka;
mod postbox;
mod raw;
mod stats;
mod workload;

use std::time::Duration;

use postbox_memory::MemoryBroker;

use crate::stats::{fmt_rate, Rates};

#[global_allocator]
static GLOBAL: alloc::Counting = alloc::Counting;

const USAGE: &str = "\
postbox-bench: raw tokio vs postbox (in-memory broker), interleaved rounds

options:
  --messages N       messages per measured round (default: calibrated per variant
                     from its warm-up round so a round lasts --seconds;
                     env POSTBOX_BENCH_MESSAGES)
  --seconds S        target length of a measured round (default 1.5)
  --rounds R         measured rounds per variant, at least 3 (default 3;
                     env POSTBOX_BENCH_ROUNDS)
  --payload BYTES    payload size, at least 24 (default 64)
  --window W         in-flight window: raw channel capacity = postbox publish
                     credit, at least 512 (default 1024)
  --concurrency C    also run postbox with C concurrent handlers (default 4; 1 = off)
  --no-callgrind     skip the valgrind instruction count
  --only-postbox     skip the raw rounds (for profiling the postbox side alone)
  --count N          run only the postbox path for N messages on a current-thread
                     runtime and print its allocations (for callgrind: the
                     per-message cost is the 2000 run minus the 1000 run)
  --part P           what --count runs: path (default) or envelope (Envelope::new only)
";

#[derive(Debug, Clone)]
struct Options {
    messages: Option<u64>,
    seconds: f64,
    rounds: usize,
    payload: usize,
    window: usize,
    concurrency: usize,
    callgrind: bool,
    only_postbox: bool,
    count: Option<u64>,
    part: cost::Part,
}

fn parse() -> Result<Options, String> {
    let env_u64 = |name: &str| -> Result<Option<u64>, String> {
        match std::env::var(name) {
            Ok(v) => v
                .parse()
                .map(Some)
                .map_err(|_| format!("{name}={v:?} is not a number")),
            Err(_) => Ok(None),
        }
    };
    let mut o = Options {
        messages: env_u64("POSTBOX_BENCH_MESSAGES")?,
        seconds: 1.5,
        rounds: env_u64("POSTBOX_BENCH_ROUNDS")?.unwrap_or(3) as usize,
        payload: 64,
        window: 1024,
        concurrency: 4,
        callgrind: true,
        only_postbox: false,
        count: None,
        part: cost::Part::Path,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        fn num<T: std::str::FromStr>(name: &str, v: String) -> Result<T, String> {
            v.parse()
                .map_err(|_| format!("{name}: {v:?} is not a valid number"))
        }
        match arg.as_str() {
            "--messages" => o.messages = Some(num("--messages", value("--messages")?)?),
            "--seconds" => o.seconds = num("--seconds", value("--seconds")?)?,
            "--rounds" => o.rounds = num("--rounds", value("--rounds")?)?,
            "--payload" => o.payload = num("--payload", value("--payload")?)?,
            "--window" => o.window = num("--window", value("--window")?)?,
            "--concurrency" => o.concurrency = num("--concurrency", value("--concurrency")?)?,
            "--no-callgrind" => o.callgrind = false,
            "--only-postbox" => o.only_postbox = true,
            "--count" => o.count = Some(num("--count", value("--count")?)?),
            "--part" => {
                let v = value("--part")?;
                o.part = cost::Part::parse(&v).ok_or_else(|| format!("--part: unknown {v:?}"))?;
            }
            "-h" | "--help" => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if o.rounds < 3 {
        return Err("--rounds must be at least 3 (docs/design.md §12)".into());
    }
    if o.payload < 24 {
        return Err("--payload must be at least 24 bytes".into());
    }
    if o.window < 2 * postbox::CREDIT_STEP as usize {
        return Err(format!(
            "--window must be at least {}",
            2 * postbox::CREDIT_STEP
        ));
    }
    if o.messages == Some(0) || o.count == Some(0) {
        return Err("message counts must be positive".into());
    }
    if !o.seconds.is_finite() || o.seconds <= 0.0 {
        return Err("--seconds must be positive".into());
    }
    Ok(o)
}

/// What a round measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    Raw,
    Postbox {
        concurrency: usize,
    },
    /// postbox through `AnyBroker` (what `postbox::connect` returns).
    Erased {
        concurrency: usize,
    },
}

impl Variant {
    fn label(self) -> String {
        match self {
            Variant::Raw => "raw tokio mpsc".to_string(),
            Variant::Postbox { concurrency } => format!("postbox c={concurrency}"),
            Variant::Erased { concurrency } => format!("AnyBroker c={concurrency}"),
        }
    }
}

struct Bench {
    options: Options,
    broker: MemoryBroker,
    payload: bytes::Bytes,
    queues: u64,
}

impl Bench {
    /// Runs one round; returns its duration.
    async fn round(&mut self, variant: Variant, messages: u64) -> Duration {
        match variant {
            Variant::Raw => raw::round(messages, &self.payload, self.options.window).await,
            Variant::Postbox { concurrency } | Variant::Erased { concurrency } => {
                self.queues += 1;
                let (elapsed, _report) = postbox::Round {
                    broker: &self.broker,
                    queue: format!("bench.c{concurrency}.{}", self.queues),
                    messages,
                    payload: &self.payload,
                    window: self.options.window,
                    concurrency,
                    erased: matches!(variant, Variant::Erased { .. }),
                }
                .run()
                .await;
                elapsed
            }
        }
    }
}

const WARM_UP_MESSAGES: u64 = 300_000;

fn main() {
    if std::env::args().nth(1).as_deref() == Some("kafka") {
        kafka::main(std::env::args().skip(2));
        return;
    }
    let options = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("postbox-bench: {e}\n\n{USAGE}");
            std::process::exit(2);
        }
    };
    if let Some(n) = options.count {
        cost::count_mode(options.part, n, options.payload, options.window);
        return;
    }

    let workers = env::cores();
    println!("postbox-bench: raw tokio pipeline vs postbox on the in-memory broker");
    println!();
    env::print(workers);
    println!(
        "  workload     payload {} bytes, decoded into the same struct (black_box) on both sides, ack after the handler",
        options.payload
    );
    println!(
        "  messages     raw: a struct of a u64 sequence number and the payload; postbox: Envelope::new per message (UUID v7 id, time), published through the Publisher trait"
    );
    println!(
        "  window       {} messages in flight (raw: bounded mpsc capacity; postbox: publish credit returned every {} handled)",
        options.window,
        postbox::CREDIT_STEP
    );
    println!();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("tokio runtime");

    let mut variants = vec![
        Variant::Raw,
        Variant::Postbox { concurrency: 1 },
        Variant::Erased { concurrency: 1 },
    ];
    if options.only_postbox {
        variants.remove(0);
    }
    if options.concurrency > 1 {
        variants.push(Variant::Postbox {
            concurrency: options.concurrency,
        });
    }
    let mut bench = Bench {
        payload: workload::payload(options.payload),
        broker: MemoryBroker::new(),
        options: options.clone(),
        queues: 0,
    };

    let results: Vec<Rates> = rt.block_on(async {
        // Warm-up, discarded; it also sizes the measured rounds.
        let mut sizes = Vec::new();
        for &v in &variants {
            let warm = options.messages.unwrap_or(WARM_UP_MESSAGES);
            let took = bench.round(v, warm).await;
            let rate = warm as f64 / took.as_secs_f64();
            let n = options.messages.unwrap_or_else(|| {
                let n = (rate * options.seconds) as u64;
                n.max(WARM_UP_MESSAGES)
            });
            println!(
                "warm-up   {:<16} {:>10} msgs {:>7.3} s {:>12} msg/s (discarded) -> {} msgs per round",
                v.label(),
                warm,
                took.as_secs_f64(),
                fmt_rate(rate),
                n
            );
            sizes.push(n);
        }
        let mut results = vec![Rates::default(); variants.len()];
        for round in 1..=options.rounds {
            for (i, &v) in variants.iter().enumerate() {
                let took = bench.round(v, sizes[i]).await;
                let rate = sizes[i] as f64 / took.as_secs_f64();
                results[i].push(rate);
                println!(
                    "round {round}   {:<16} {:>10} msgs {:>7.3} s {:>12} msg/s",
                    v.label(),
                    sizes[i],
                    took.as_secs_f64(),
                    fmt_rate(rate)
                );
            }
        }
        results
    });

    println!();
    println!(
        "results, messages/s over {} interleaved rounds each (publish -> handler -> ack):",
        options.rounds
    );
    println!(
        "  {:<16} {:>12} {:>12} {:>12} {:>12}",
        "", "best", "median", "worst", "spread"
    );
    for (v, r) in variants.iter().zip(&results) {
        println!(
            "  {:<16} {:>12} {:>12} {:>12} {:>12}",
            v.label(),
            fmt_rate(r.best()),
            fmt_rate(r.median()),
            fmt_rate(r.worst()),
            fmt_rate(r.spread())
        );
    }
    let raw = &results[0];
    let compared = if options.only_postbox {
        0
    } else {
        variants.len()
    };
    for (v, r) in variants.iter().zip(&results).take(compared).skip(1) {
        println!(
            "  {} / raw (median): {:.3}  -> {}",
            v.label(),
            r.median() / raw.median(),
            stats::verdict(r, raw)
        );
    }
    let position = |wanted: Variant| variants.iter().position(|&v| v == wanted);
    if let (Some(c), Some(e)) = (
        position(Variant::Postbox { concurrency: 1 }),
        position(Variant::Erased { concurrency: 1 }),
    ) {
        println!(
            "  AnyBroker c=1 / postbox c=1 (median): {:.3}  -> {} (the cost of the type-erased handle postbox::connect returns: a boxed future per fetch and a boxed delivery)",
            results[e].median() / results[c].median(),
            stats::verdict(&results[e], &results[c])
        );
    }
    println!(
        "  the broker is in-process: no network, nothing to wait for; both sides are CPU-bound on the same {workers} cores"
    );

    println!();
    print_costs(&options);
}

/// The code's own cost per message, split into the envelope, the publish and
/// the delivery path (each split is the difference of two `--part` runs).
fn print_costs(options: &Options) {
    println!(
        "per-message cost of the postbox path (steady state: {} deliveries minus {}):",
        cost::LARGE,
        cost::SMALL
    );
    let allocs = |part| cost::allocations_per_message(part, options.payload, options.window);
    let (path, path_bytes) = allocs(cost::Part::Path);
    let (envelope, envelope_bytes) = allocs(cost::Part::Envelope);
    let (publish, publish_bytes) = allocs(cost::Part::Publish);
    println!(
        "  allocations/message   {path:.2} ({path_bytes:.0} bytes)   [counting allocator, current-thread runtime, in this process]"
    );
    println!(
        "    Envelope::new            {envelope:.2} ({envelope_bytes:.0} bytes), {:.0} ns each   [the envelope's own cost: the raw message has none]",
        cost::envelope_nanos(options.payload)
    );
    println!(
        "    + publish                {:.2} ({:.0} bytes)   [the future `#[async_trait]` boxes for Publisher::publish]",
        publish - envelope,
        publish_bytes - envelope_bytes
    );
    println!(
        "    + consume, handle, ack   {:.2} ({:.0} bytes)   [the delivery path]",
        path - publish,
        path_bytes - publish_bytes
    );
    if !options.callgrind {
        println!("  instructions/message  skipped (--no-callgrind)");
        return;
    }
    if !cost::valgrind_available() {
        println!("  instructions/message  skipped: valgrind not found");
        return;
    }
    let run = |part| cost::callgrind(part, options.payload, options.window);
    match (
        run(cost::Part::Path),
        run(cost::Part::Envelope),
        run(cost::Part::Publish),
    ) {
        (Ok(path), Ok(envelope), Ok(publish)) => {
            println!(
                "  instructions/message  {:.0} (allocations/message {:.2})   [valgrind --tool=callgrind, `--count {}` minus `--count {}`]",
                path.instructions,
                path.allocations,
                cost::LARGE,
                cost::SMALL
            );
            println!(
                "    Envelope::new            {:.0}   [`--part envelope`]",
                envelope.instructions
            );
            println!(
                "    + publish                {:.0}   [`--part publish` minus `--part envelope`]",
                publish.instructions - envelope.instructions
            );
            println!(
                "    + consume, handle, ack   {:.0}   [`--part path` minus `--part publish`]",
                path.instructions - publish.instructions
            );
        }
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
            println!("  instructions/message  failed: {e}")
        }
    }
}
