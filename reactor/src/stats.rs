//! Busy/idle accounting per reactor and per poller (SPDK's `framework_get_reactors`
//! and `thread_get_stats`).

/// A snapshot of one reactor's counters.
#[derive(Debug, Clone, Default)]
pub struct ReactorStats {
    /// Reactor index (SPDK's lcore position).
    pub index: usize,
    /// The CPU core this reactor is pinned to.
    pub core: usize,
    /// Ticks spent in iterations that did work.
    pub busy_ticks: u64,
    /// Ticks spent in iterations that did nothing (including parked time).
    pub idle_ticks: u64,
    /// Loop iterations.
    pub iterations: u64,
    /// Times the reactor parked.
    pub parks: u64,
    /// Messages executed.
    pub messages: u64,
    /// Local tasks currently alive.
    pub tasks: usize,
    /// Ticks per second of the counters above.
    pub tick_rate: u64,
    /// Per-poller counters.
    pub pollers: Vec<PollerStats>,
}

/// A snapshot of one poller's counters.
#[derive(Debug, Clone, Default)]
pub struct PollerStats {
    /// Poller name.
    pub name: String,
    /// Poller id, unique on its reactor.
    pub id: u64,
    /// `None` for active pollers, the period in microseconds for timed ones.
    pub period_us: Option<u64>,
    /// "running" or "paused".
    pub state: &'static str,
    /// Times run.
    pub run_count: u64,
    /// Times it reported busy.
    pub busy_count: u64,
}
