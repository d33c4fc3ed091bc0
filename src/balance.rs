//! Balancing algorithms: given the servers that could take a client right now, choose one.
//! Pure functions over a snapshot, so they are tested without sockets or locks.

use crate::config::Balance;

/// A server that is usable and has room for one more session.
#[derive(Debug, Clone, Copy)]
pub struct Candidate {
    /// Index of the server in its listen.
    pub idx: usize,
    /// Sessions it holds now.
    pub cur: usize,
    /// Effective weight, 1..=256 (weight 0 servers are never candidates).
    pub weight: u32,
}

/// Memory the algorithms keep between picks.
#[derive(Debug, Default)]
pub struct BalanceState {
    /// leastconn: where the scan starts, so equally loaded servers take turns.
    rotor: usize,
    /// roundrobin: smooth weighted round-robin credit per server index.
    credit: Vec<i64>,
}

impl BalanceState {
    pub fn new(servers: usize) -> Self {
        BalanceState {
            rotor: 0,
            credit: vec![0; servers],
        }
    }
}

/// Picks among `cands` (sorted by index). Returns a server index.
pub fn pick(algo: Balance, cands: &[Candidate], st: &mut BalanceState) -> Option<usize> {
    if cands.is_empty() {
        return None;
    }
    match algo {
        Balance::Leastconn => leastconn(cands, st),
        Balance::Roundrobin => roundrobin(cands, st),
        // Fill servers in configuration order: the first with room wins.
        Balance::First => Some(cands[0].idx),
    }
}

/// Fewest sessions per unit of weight; ties go to the next server after the last pick.
fn leastconn(cands: &[Candidate], st: &mut BalanceState) -> Option<usize> {
    let n = cands.len();
    let start = st.rotor % n;
    st.rotor = st.rotor.wrapping_add(1);
    // Compare (cur+1)/weight by cross-multiplying: (a+1)*wb < (b+1)*wa, exact, no
    // floats, no rounding. min_by keeps the first of equals: the rotor's choice.
    let lighter = |a: &&Candidate, b: &&Candidate| {
        let left = (a.cur as u128 + 1) * u128::from(b.weight);
        let right = (b.cur as u128 + 1) * u128::from(a.weight);
        left.cmp(&right)
    };
    (0..n)
        .map(|k| &cands[(start + k) % n])
        .min_by(lighter)
        .map(|c| c.idx)
}

/// Smooth weighted round-robin (as in nginx): over any window each server gets its
/// share of picks, interleaved rather than in bursts.
fn roundrobin(cands: &[Candidate], st: &mut BalanceState) -> Option<usize> {
    let total: i64 = cands.iter().map(|c| i64::from(c.weight)).sum();
    let mut best: Option<usize> = None;
    for c in cands {
        if st.credit.len() <= c.idx {
            st.credit.resize(c.idx + 1, 0);
        }
        st.credit[c.idx] += i64::from(c.weight);
        if best.is_none_or(|b| st.credit[c.idx] > st.credit[b]) {
            best = Some(c.idx);
        }
    }
    let b = best?;
    st.credit[b] -= total;
    Some(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `n` picks where each pick adds a session, returns sessions per server.
    fn simulate(algo: Balance, weights: &[u32], n: usize) -> Vec<usize> {
        let mut cur = vec![0; weights.len()];
        let mut st = BalanceState::new(weights.len());
        for _ in 0..n {
            let cands: Vec<_> = weights
                .iter()
                .enumerate()
                .map(|(idx, &weight)| Candidate {
                    idx,
                    cur: cur[idx],
                    weight,
                })
                .collect();
            let i = pick(algo, &cands, &mut st).expect("a candidate");
            cur[i] += 1;
        }
        cur
    }

    #[test]
    fn leastconn_spreads_evenly_and_by_weight() {
        assert_eq!(
            simulate(Balance::Leastconn, &[100, 100, 100], 30),
            vec![10, 10, 10]
        );
        assert_eq!(
            simulate(Balance::Leastconn, &[100, 100, 200], 40),
            vec![10, 10, 20]
        );
    }

    #[test]
    fn leastconn_rotates_ties() {
        // Sessions that end at once leave equal loads: picks must not all go to server 0.
        let mut st = BalanceState::new(3);
        let cands: Vec<_> = (0..3)
            .map(|idx| Candidate {
                idx,
                cur: 0,
                weight: 1,
            })
            .collect();
        let picks: Vec<_> = (0..3)
            .map(|_| pick(Balance::Leastconn, &cands, &mut st))
            .collect();
        assert_eq!(picks, vec![Some(0), Some(1), Some(2)]);
    }

    #[test]
    fn roundrobin_honours_weights_interleaved() {
        let mut st = BalanceState::new(2);
        let cands = [
            Candidate {
                idx: 0,
                cur: 0,
                weight: 2,
            },
            Candidate {
                idx: 1,
                cur: 0,
                weight: 1,
            },
        ];
        let picks: Vec<_> = (0..6)
            .filter_map(|_| pick(Balance::Roundrobin, &cands, &mut st))
            .collect();
        assert_eq!(picks, vec![0, 1, 0, 0, 1, 0]);
    }

    #[test]
    fn first_fills_in_order() {
        let cands = [
            Candidate {
                idx: 1,
                cur: 5,
                weight: 1,
            },
            Candidate {
                idx: 2,
                cur: 0,
                weight: 1,
            },
        ];
        assert_eq!(
            pick(Balance::First, &cands, &mut BalanceState::new(3)),
            Some(1)
        );
        assert_eq!(pick(Balance::First, &[], &mut BalanceState::new(3)), None);
    }
}
