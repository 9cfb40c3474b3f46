//! The in-flight window: halves while clients were active during the last
//! sample period, grows by one per idle period, between 1 and the maximum
//! (AIMD). Pure: the caller passes the client counter and the clock.

/// The copier's window.
#[derive(Debug, Clone)]
pub struct Window {
    last_ops: Option<u64>,
    last_tick: u64,
    period: u64,
    window: usize,
    max: usize,
}

impl Window {
    /// A full window of `max` (at least 1), sampling every `period` ticks,
    /// starting at `now` with the client counter at `ops` (None: no clients,
    /// the window stays full).
    pub fn new(max: usize, period: u64, ops: Option<u64>, now: u64) -> Self {
        let max = max.max(1);
        Self {
            last_ops: ops,
            last_tick: now,
            period,
            window: max,
            max,
        }
    }

    /// The largest window.
    pub fn max(&self) -> usize {
        self.max
    }

    /// The window at `now` with the client counter at `ops`.
    pub fn sample(&mut self, ops: Option<u64>, now: u64) -> usize {
        let (Some(last), Some(ops)) = (self.last_ops, ops) else {
            return self.window;
        };
        if now.saturating_sub(self.last_tick) >= self.period {
            if ops != last {
                self.window = (self.window / 2).max(1);
            } else {
                self.window = (self.window + 1).min(self.max);
            }
            self.last_ops = Some(ops);
            self.last_tick = now;
        }
        self.window
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halves_while_busy_and_grows_by_one_when_idle() {
        let mut w = Window::new(8, 10, Some(0), 0);
        assert_eq!(w.sample(Some(0), 5), 8, "no sample before the period");
        assert_eq!(w.sample(Some(3), 10), 4);
        assert_eq!(w.sample(Some(9), 20), 2);
        assert_eq!(w.sample(Some(12), 30), 1);
        assert_eq!(w.sample(Some(13), 40), 1, "never below one");
        assert_eq!(w.sample(Some(13), 50), 2);
        for t in 6..20 {
            w.sample(Some(13), t * 10);
        }
        assert_eq!(w.sample(Some(13), 200), 8, "never above the maximum");
    }

    #[test]
    fn without_clients_the_window_stays_full() {
        let w = Window::new(0, 10, None, 0);
        assert_eq!(w.max(), 1);
        let mut w = Window::new(6, 10, None, 0);
        assert_eq!(w.sample(None, 100), 6);
    }
}
