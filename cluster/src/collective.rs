//! [`TransportCollective`]: a tensor-parallel group whose ranks live in
//! different processes, behind the framework's
//! [`Collective`] trait.
//!
//! An all-reduce is an all-gather followed by a local sum in rank order:
//! every rank sends its buffer to every other, then each zeroes its buffer
//! and adds the contributions of rank 0, 1, … in turn, exactly as
//! [`ThreadCollective`](framework::collective::ThreadCollective) sums its
//! slots. So a layout spread over processes gives bit for bit what the same
//! layout gives in one process, whatever the transport and the timing
//! (`MPI_Allreduce` promises no such order; docs/benchmarks.md has the cost
//! of each). A gather to the root sends each block to rank 0 only.
//!
//! Every rank must call the same operations in the same order, as with any
//! collective. [`Collective::abort`] aborts the group's stream on every
//! process that hosts one of its ranks.

use std::sync::Arc;
use std::time::Duration;

use framework::collective::Collective;
use framework::{Error, Result};

use crate::transport::{bytes_f32, f32_bytes, Address, Transport};

/// One rank of a tensor-parallel group over a [`Transport`].
pub struct TransportCollective {
    transport: Arc<dyn Transport>,
    stream: u64,
    /// The process rank hosting each group rank.
    members: Arc<[usize]>,
    rank: usize,
    timeout: Option<Duration>,
}

impl TransportCollective {
    /// Group rank `rank` of the group whose ranks run on the processes
    /// `members` (one entry per group rank; several may share a process),
    /// talking on `stream`, which no other group of the job uses. With a
    /// `timeout`, a peer silent for that long fails the operation.
    pub fn new(
        transport: Arc<dyn Transport>,
        stream: u64,
        members: Arc<[usize]>,
        rank: usize,
        timeout: Option<Duration>,
    ) -> Self {
        Self {
            transport,
            stream,
            members,
            rank,
            timeout,
        }
    }

    fn address(&self, from: usize, to: usize) -> Address {
        Address {
            stream: self.stream,
            from: from as u32,
            to: to as u32,
        }
    }

    fn send_to(&self, to: usize, payload: &[u8]) -> Result<()> {
        self.transport
            .send(self.members[to], self.address(self.rank, to), payload)
    }

    fn recv_from(&self, from: usize) -> Result<Vec<u8>> {
        self.transport.recv(
            self.members[from],
            self.address(from, self.rank),
            self.timeout,
        )
    }
}

impl Collective for TransportCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.members.len()
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        let n = self.members.len();
        if n == 1 {
            return Ok(());
        }
        let own = buf.to_vec();
        let bytes = f32_bytes(&own);
        for to in (0..n).filter(|&r| r != self.rank) {
            self.send_to(to, &bytes)?;
        }
        buf.fill(0.0);
        for from in 0..n {
            let theirs;
            let part: &[f32] = if from == self.rank {
                &own
            } else {
                theirs = bytes_f32(&self.recv_from(from)?)?;
                &theirs
            };
            if part.len() != buf.len() {
                return Err(Error::Collective(format!(
                    "rank {from} contributed {} values, rank {} expected {}",
                    part.len(),
                    self.rank,
                    buf.len()
                )));
            }
            for (b, p) in buf.iter_mut().zip(part) {
                *b += p;
            }
        }
        Ok(())
    }

    fn abort(&self) {
        let mut ranks = self.members.to_vec();
        ranks.sort_unstable();
        ranks.dedup();
        self.transport.abort(self.stream, &ranks);
    }

    fn gather_cols_to_root(
        &self,
        local: &[f32],
        rows: usize,
        col_offset: usize,
        total_cols: usize,
    ) -> Result<Option<Vec<f32>>> {
        let n = self.members.len();
        if self.rank != 0 {
            let mut msg = Vec::with_capacity(8 + local.len() * 4);
            msg.extend_from_slice(&(col_offset as u64).to_le_bytes());
            msg.extend_from_slice(&f32_bytes(local));
            self.send_to(0, &msg)?;
            return Ok(None);
        }
        let mut full = vec![0f32; rows * total_cols];
        place_cols(&mut full, local, rows, col_offset, total_cols)?;
        for from in 1..n {
            let msg = self.recv_from(from)?;
            let (head, body) = msg.split_at(msg.len().min(8));
            let offset = <[u8; 8]>::try_from(head)
                .map(u64::from_le_bytes)
                .map_err(|_| {
                    Error::Collective(format!(
                        "rank {from} sent a gather without its column offset"
                    ))
                })?;
            let block = bytes_f32(body)?;
            place_cols(&mut full, &block, rows, offset as usize, total_cols)
                .map_err(|e| Error::Collective(format!("rank {from}: {e}")))?;
        }
        Ok(Some(full))
    }
}

/// Writes `local` (`rows × cols`) into columns `col_offset..` of `full`
/// (`rows × total_cols`), refusing a block that does not fit.
fn place_cols(
    full: &mut [f32],
    local: &[f32],
    rows: usize,
    col_offset: usize,
    total_cols: usize,
) -> Result<()> {
    let cols = local.len().checked_div(rows).unwrap_or(0);
    if local.len() != rows * cols || col_offset + cols > total_cols {
        return Err(Error::Collective(format!(
            "a block of {} values at column {col_offset}; {rows} rows of at most {total_cols} columns expected",
            local.len()
        )));
    }
    framework::collective::place_cols(full, local, rows, col_offset, total_cols);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::Loopback;
    use framework::collective::ThreadCollective;

    /// Runs `f` on every rank of a group of `members.len()` ranks, as threads.
    fn on_group<T: Send + 'static>(
        collectives: Vec<Arc<dyn Collective>>,
        f: impl Fn(&dyn Collective) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        let f = Arc::new(f);
        let handles: Vec<_> = collectives
            .into_iter()
            .map(|c| {
                let f = f.clone();
                std::thread::spawn(move || f(&*c))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    fn transport_group(members: &[usize]) -> Vec<Arc<dyn Collective>> {
        let world = Loopback::world(members.iter().max().map_or(1, |m| m + 1));
        let members: Arc<[usize]> = members.into();
        (0..members.len())
            .map(|r| {
                Arc::new(TransportCollective::new(
                    world[members[r]].clone(),
                    42,
                    members.clone(),
                    r,
                    Some(Duration::from_secs(10)),
                )) as Arc<dyn Collective>
            })
            .collect()
    }

    fn thread_group(n: usize) -> Vec<Arc<dyn Collective>> {
        ThreadCollective::group(n)
            .into_iter()
            .map(|c| Arc::new(c) as Arc<dyn Collective>)
            .collect()
    }

    use crate::order_sensitive_values as values;

    fn run(collectives: Vec<Arc<dyn Collective>>) -> Vec<Vec<u32>> {
        on_group(collectives, |c| {
            let mut out = Vec::new();
            for round in 0..5 {
                let mut buf = values(c.rank(), 1000 + round, round);
                c.all_reduce_sum(&mut buf).unwrap();
                out.extend(buf.iter().map(|x| x.to_bits()));
                // A gather of 3 rows of 4 columns per rank.
                let local = values(c.rank(), 12, round + 9);
                let n = c.world_size();
                if let Some(full) = c
                    .gather_cols_to_root(&local, 3, c.rank() * 4, n * 4)
                    .unwrap()
                {
                    out.extend(full.iter().map(|x| x.to_bits()));
                }
                let full = c.all_gather_cols(&local, 3, c.rank() * 4, n * 4).unwrap();
                out.extend(full.iter().map(|x| x.to_bits()));
                c.barrier().unwrap();
            }
            out
        })
    }

    #[test]
    fn sums_and_gathers_are_bit_identical_to_the_thread_collective() {
        for members in [vec![0, 1], vec![0, 1, 2], vec![0, 0, 1], vec![1, 0, 1, 2]] {
            let want = run(thread_group(members.len()));
            let got = run(transport_group(&members));
            assert_eq!(got, want, "members {members:?}");
        }
    }

    #[test]
    fn an_aborted_group_fails_every_rank() {
        let group = transport_group(&[0, 1, 2]);
        let out = on_group(group, |c| {
            if c.rank() == 2 {
                c.abort();
                return Err(Error::Aborted("rank 2 failed".into()));
            }
            let mut buf = vec![1.0; 8];
            c.all_reduce_sum(&mut buf)
        });
        assert!(
            out.iter().all(|r| matches!(r, Err(Error::Aborted(_)))),
            "{out:?}"
        );
    }

    #[test]
    fn mismatched_contributions_are_refused() {
        let out = on_group(transport_group(&[0, 1]), |c| {
            let mut buf = vec![1.0; 4 + c.rank()];
            c.all_reduce_sum(&mut buf)
        });
        assert!(out.iter().all(|r| r.is_err()), "{out:?}");
    }
}
