//! Progress as a contiguous prefix: ranges finish in any order; the prefix
//! is where the first range not yet finished starts.

/// Finished ranges beyond a contiguous prefix.
#[derive(Debug, Clone, Default)]
pub struct Prefix {
    end: u64,
    /// Finished ranges after `end`, sorted by start, disjoint.
    ahead: Vec<(u64, u64)>,
}

impl Prefix {
    /// An empty prefix with room for `n` ranges ahead of it before it allocates.
    pub fn with_capacity(n: usize) -> Self {
        Self {
            end: 0,
            ahead: Vec::with_capacity(n),
        }
    }

    /// Where the prefix ends.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// `[start, end)` finished. Returns by how much the prefix grew.
    pub fn done(&mut self, start: u64, end: u64) -> u64 {
        if end <= start {
            return 0;
        }
        let before = self.end;
        if start <= self.end {
            self.end = self.end.max(end);
        } else {
            let i = self.ahead.partition_point(|r| r.0 < start);
            self.ahead.insert(i, (start, end));
        }
        while let Some(&(s, e)) = self.ahead.first() {
            if s > self.end {
                break;
            }
            self.end = self.end.max(e);
            self.ahead.remove(0);
        }
        self.end - before
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_order_ranges_count_once_contiguous() {
        let mut p = Prefix::with_capacity(4);
        assert_eq!(p.done(10, 20), 0);
        assert_eq!(p.done(30, 40), 0);
        assert_eq!(p.end(), 0);
        assert_eq!(p.done(0, 10), 20);
        assert_eq!(p.done(20, 30), 20);
        assert_eq!(p.end(), 40);
        assert_eq!(p.done(5, 5), 0);
        assert_eq!(p.done(40, 41), 1);
    }
}
