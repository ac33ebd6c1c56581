//! Spread over repeats: every figure in the report is min / median / max of its repeats.

use serde::Serialize;

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Spread {
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Spread {
    /// None for an empty sample.
    pub fn of(values: &[f64]) -> Option<Spread> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Spread {
            min: v[0],
            median,
            max: v[n - 1],
        })
    }

    pub fn width(&self) -> f64 {
        self.max - self.min
    }

    /// A figure is too noisy to claim an effect when its spread is wider than the effect itself
    /// (`effect` is the distance of the median from "no difference").
    pub fn noisier_than(&self, effect: f64) -> bool {
        self.width() > effect.abs()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_samples() {
        let s = Spread::of(&[3.0, 1.0, 2.0]);
        assert_eq!(
            s,
            Some(Spread {
                min: 1.0,
                median: 2.0,
                max: 3.0
            })
        );
        let s = Spread::of(&[4.0, 1.0, 2.0, 3.0]).map(|s| s.median);
        assert_eq!(s, Some(2.5));
        assert_eq!(Spread::of(&[]), None);
        assert_eq!(Spread::of(&[f64::NAN]), None);
    }

    #[test]
    fn noise_is_spread_wider_than_the_effect() {
        let s = Spread {
            min: 0.98,
            median: 1.01,
            max: 1.05,
        };
        assert!(s.noisier_than(1.01 - 1.0));
        assert!(!s.noisier_than(0.2));
    }
}
