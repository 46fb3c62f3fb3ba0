//! The environment a run prints next to its numbers (docs/design.md §12).

/// The CPU model from `/proc/cpuinfo`.
pub(crate) fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".to_string())
}

/// Cores this process may use.
pub(crate) fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Prints the environment block.
pub(crate) fn print(worker_threads: usize) {
    print_base(worker_threads);
    println!(
        "  broker       postbox-memory MemoryBroker, in-process (started by this binary, no external process), no limits"
    );
}

/// Prints the environment block without the broker line.
pub(crate) fn print_base(worker_threads: usize) {
    let flags = env!("BENCH_RUSTFLAGS");
    println!("environment");
    println!(
        "  cpu          {} ({} cores available)",
        cpu_model(),
        cores()
    );
    println!("  kernel       {}", kernel());
    println!("  rustc        {}", env!("BENCH_RUSTC_VERSION"));
    println!(
        "  build        profile {}, opt-level {}, debug {}, target {}, RUSTFLAGS {}",
        env!("BENCH_PROFILE"),
        env!("BENCH_OPT_LEVEL"),
        env!("BENCH_DEBUG"),
        env!("BENCH_TARGET"),
        if flags.trim().is_empty() {
            "(none)"
        } else {
            flags
        }
    );
    println!(
        "  runtime      tokio multi-thread, {worker_threads} worker threads, one runtime for every round"
    );
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".to_string())
}
