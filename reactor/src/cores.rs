//! Core masks (`0x3`, SPDK style) and core lists (`0,1,4-7`).

use crate::error::ReactorError;

/// An ordered set of CPU cores to run reactors on; reactor `i` is pinned to `cores()[i]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoreSet {
    cores: Vec<usize>,
}

impl CoreSet {
    /// Parses a hexadecimal core mask such as `0x3` or `3` (bit n = core n).
    pub fn from_mask(mask: &str) -> Result<Self, ReactorError> {
        let s = mask.trim();
        let hex = s
            .strip_prefix("0x")
            .or_else(|| s.strip_prefix("0X"))
            .unwrap_or(s);
        if hex.is_empty() || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(ReactorError::InvalidCoreSpec(
                mask.into(),
                "not a hexadecimal mask".into(),
            ));
        }
        let mut cores = Vec::new();
        // Walk the digits from the least significant end so masks of any width work.
        for (digit_index, c) in hex.chars().rev().enumerate() {
            let v = c.to_digit(16).unwrap_or(0);
            for bit in 0..4 {
                if v & (1 << bit) != 0 {
                    cores.push(digit_index * 4 + bit);
                }
            }
        }
        if cores.is_empty() {
            return Err(ReactorError::NoCores);
        }
        Ok(Self { cores })
    }

    /// Parses a core list such as `0,1,4-7` or `[0,1]`.
    pub fn from_list(list: &str) -> Result<Self, ReactorError> {
        let s = list.trim().trim_start_matches('[').trim_end_matches(']');
        let mut cores = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let bad =
                |why: &str| ReactorError::InvalidCoreSpec(list.into(), format!("{part:?}: {why}"));
            let (lo, hi) = match part.split_once('-') {
                Some((a, b)) => (
                    a.trim().parse::<usize>().map_err(|_| bad("not a number"))?,
                    b.trim().parse::<usize>().map_err(|_| bad("not a number"))?,
                ),
                None => {
                    let n = part.parse::<usize>().map_err(|_| bad("not a number"))?;
                    (n, n)
                }
            };
            if hi < lo || hi - lo > 4096 {
                return Err(bad("bad range"));
            }
            for c in lo..=hi {
                if cores.contains(&c) {
                    return Err(ReactorError::DuplicateCore(c));
                }
                cores.push(c);
            }
        }
        if cores.is_empty() {
            return Err(ReactorError::NoCores);
        }
        Ok(Self { cores })
    }

    /// Explicit cores, checked for duplicates.
    pub fn from_cores(cores: &[usize]) -> Result<Self, ReactorError> {
        let mut v = Vec::new();
        for &c in cores {
            if v.contains(&c) {
                return Err(ReactorError::DuplicateCore(c));
            }
            v.push(c);
        }
        if v.is_empty() {
            return Err(ReactorError::NoCores);
        }
        Ok(Self { cores: v })
    }

    /// Every core this process may run on.
    pub fn all_available() -> Self {
        let mut cores = available_cores();
        if cores.is_empty() {
            cores.push(0);
        }
        Self { cores }
    }

    /// Checks every core exists and is available to this process.
    pub fn validate(&self) -> Result<(), ReactorError> {
        let avail = available_cores();
        for &c in &self.cores {
            if !avail.contains(&c) {
                let available = avail
                    .iter()
                    .map(|c| c.to_string())
                    .collect::<Vec<_>>()
                    .join(",");
                return Err(ReactorError::CoreNotAvailable { core: c, available });
            }
        }
        Ok(())
    }

    /// The cores, in reactor order.
    pub fn cores(&self) -> &[usize] {
        &self.cores
    }

    /// Number of cores.
    pub fn len(&self) -> usize {
        self.cores.len()
    }

    /// Whether the set is empty (never true for a parsed set).
    pub fn is_empty(&self) -> bool {
        self.cores.is_empty()
    }

    /// The set as an SPDK-style hexadecimal mask.
    pub fn to_mask(&self) -> String {
        let max = self.cores.iter().copied().max().unwrap_or(0);
        let mut digits = vec![0u8; max / 4 + 1];
        for &c in &self.cores {
            digits[c / 4] |= 1 << (c % 4);
        }
        let s: String = digits
            .iter()
            .rev()
            .map(|d| char::from_digit(*d as u32, 16).unwrap_or('0'))
            .collect();
        format!(
            "0x{}",
            s.trim_start_matches('0').to_string()
                + if s.trim_start_matches('0').is_empty() {
                    "0"
                } else {
                    ""
                }
        )
    }
}

/// The cores this thread may run on less `reactors`, or all of them if that
/// leaves none.
pub(crate) fn helper_cores(reactors: &[usize]) -> Vec<usize> {
    let all = available_cores();
    let rest: Vec<usize> = all
        .iter()
        .copied()
        .filter(|c| !reactors.contains(c))
        .collect();
    if rest.is_empty() {
        all
    } else {
        rest
    }
}

fn available_cores() -> Vec<usize> {
    let mut v: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect();
    v.sort_unstable();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks() {
        assert_eq!(CoreSet::from_mask("0x3").unwrap().cores(), &[0, 1]);
        assert_eq!(CoreSet::from_mask("0x10").unwrap().cores(), &[4]);
        assert_eq!(CoreSet::from_mask("5").unwrap().cores(), &[0, 2]);
        assert!(matches!(
            CoreSet::from_mask("0x0"),
            Err(ReactorError::NoCores)
        ));
        assert!(matches!(
            CoreSet::from_mask("0xg"),
            Err(ReactorError::InvalidCoreSpec(..))
        ));
        assert_eq!(CoreSet::from_mask("0x3").unwrap().to_mask(), "0x3");
        assert_eq!(CoreSet::from_mask("0x110").unwrap().to_mask(), "0x110");
    }

    #[test]
    fn lists() {
        assert_eq!(CoreSet::from_list("0,1").unwrap().cores(), &[0, 1]);
        assert_eq!(
            CoreSet::from_list("[0,2-4]").unwrap().cores(),
            &[0, 2, 3, 4]
        );
        assert_eq!(
            CoreSet::from_list("1,1"),
            Err(ReactorError::DuplicateCore(1))
        );
        assert!(matches!(
            CoreSet::from_list("a"),
            Err(ReactorError::InvalidCoreSpec(..))
        ));
        assert!(matches!(CoreSet::from_list(""), Err(ReactorError::NoCores)));
    }

    #[test]
    fn missing_core_is_named() {
        let e = CoreSet::from_list("4095").unwrap().validate().unwrap_err();
        assert!(e.to_string().contains("core 4095"), "{e}");
    }
}
