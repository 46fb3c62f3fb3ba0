//! Best / median / worst of a set of rounds, and whether two sets differ.

/// Throughputs (messages per second) of the rounds of one variant.
#[derive(Debug, Clone, Default)]
pub(crate) struct Rates(Vec<f64>);

impl Rates {
    pub(crate) fn push(&mut self, rate: f64) {
        self.0.push(rate);
    }

    fn sorted(&self) -> Vec<f64> {
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        v
    }

    pub(crate) fn best(&self) -> f64 {
        self.sorted().last().copied().unwrap_or(0.0)
    }

    pub(crate) fn worst(&self) -> f64 {
        self.sorted().first().copied().unwrap_or(0.0)
    }

    pub(crate) fn median(&self) -> f64 {
        let v = self.sorted();
        match v.len() {
            0 => 0.0,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }

    /// Best minus worst.
    pub(crate) fn spread(&self) -> f64 {
        self.best() - self.worst()
    }
}

/// How `a` compares with `b`: "indistinguishable" when the difference of the
/// medians is smaller than the larger best-to-worst spread of the two.
pub(crate) fn verdict(a: &Rates, b: &Rates) -> String {
    let diff = a.median() - b.median();
    let spread = a.spread().max(b.spread());
    if diff.abs() < spread {
        format!(
            "indistinguishable (median difference {} < spread {})",
            fmt_rate(diff.abs()),
            fmt_rate(spread)
        )
    } else {
        format!(
            "{} by {} msg/s (spread {})",
            if diff < 0.0 { "slower" } else { "faster" },
            fmt_rate(diff.abs()),
            fmt_rate(spread)
        )
    }
}

/// `1234567.8` → `1,234,568`.
pub(crate) fn fmt_rate(rate: f64) -> String {
    let n = rate.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_best_worst() {
        let mut r = Rates::default();
        for x in [3.0, 1.0, 2.0] {
            r.push(x);
        }
        assert_eq!((r.best(), r.median(), r.worst()), (3.0, 2.0, 1.0));
        assert_eq!(fmt_rate(1234567.8), "1,234,568");
    }

    #[test]
    fn small_differences_are_indistinguishable() {
        let mut a = Rates::default();
        let mut b = Rates::default();
        for x in [100.0, 110.0, 120.0] {
            a.push(x);
            b.push(x + 5.0);
        }
        assert!(verdict(&a, &b).starts_with("indistinguishable"));
        let mut c = Rates::default();
        for x in [200.0, 201.0, 202.0] {
            c.push(x);
        }
        assert!(verdict(&a, &c).starts_with("slower"));
    }
}
