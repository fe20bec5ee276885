//! Transports: messages between ranks (processes), addressed by stream and
//! by the sending and receiving endpoints within it.
//!
//! A message goes to a rank under an [`Address`]: a `stream` (one per
//! link of a step: a tensor-parallel group, a pipeline channel) and the
//! `from` and `to` endpoints in it (group ranks, node indices). Each rank
//! has one [`Mailbox`] that files arriving messages under `(source rank,
//! address)`; a receiver takes the oldest message of one such key, so
//! messages between two endpoints keep their order, and endpoints sharing a
//! process never take each other's messages.
//!
//! A stream can be aborted ([`Transport::abort`]): every rank that hosts one
//! of its endpoints is told, every wait on it (now or later) fails, what
//! was filed under it is dropped, and the hooks registered for it there
//! ([`Mailbox::on_abort`]) are told once. A transport can fail as a whole
//! ([`Mailbox::fail`], when a peer is lost): every wait fails then.
//!
//! Implementations: [`Loopback`], ranks as threads of one process (tests,
//! and the reference the MPI transport must agree with), and, with the
//! `mpi` feature, `crate::mpi::MpiTransport`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use framework::{Error, Result};

/// Where a message goes within a rank: its stream, and the endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Address {
    /// The stream (a step's link).
    pub stream: u64,
    /// The sending endpoint within the stream.
    pub from: u32,
    /// The receiving endpoint within the stream.
    pub to: u32,
}

/// Moves byte messages between the ranks of a job.
pub trait Transport: Send + Sync {
    /// This process's rank.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn size(&self) -> usize;
    /// Sends `payload` to rank `dest` under `address`.
    fn send(&self, dest: usize, address: Address, payload: &[u8]) -> Result<()>;
    /// This rank's mailbox.
    fn mailbox(&self) -> &Mailbox;
    /// Tells `ranks` (this one included, if listed) that `stream` is
    /// aborted.
    fn abort(&self, stream: u64, ranks: &[usize]);
    /// The next message from rank `src` under `address`; fails if the
    /// stream is aborted or the transport failed, waiting at most `timeout`
    /// when one is given.
    fn recv(&self, src: usize, address: Address, timeout: Option<Duration>) -> Result<Vec<u8>> {
        self.mailbox().take(src, address, timeout)
    }
    /// Starts watching the peers this rank depends on (rank 0 every other
    /// rank, the others rank 0): the transport fails when one has been
    /// silent for `timeout`. Transports whose ranks cannot die apart (ranks
    /// as threads) ignore it.
    fn watch(&self, timeout: Duration) {
        let _ = timeout;
    }
}

/// What a rank tells when one of a stream's waits is aborted: the links of
/// a step that do not go through the transport (channels and collectives
/// within the process), so that they fail with the ones that do.
pub trait AbortHook: Send + Sync {
    /// The stream was aborted here.
    fn stream_aborted(&self);
}

#[derive(Default)]
struct Boxes {
    queued: HashMap<(usize, Address), VecDeque<Vec<u8>>>,
    aborted: HashSet<u64>,
    failed: Option<String>,
    hooks: HashMap<u64, Vec<Weak<dyn AbortHook>>>,
}

/// The messages that arrived at one rank, filed by source and address.
#[derive(Default)]
pub struct Mailbox {
    boxes: Mutex<Boxes>,
    arrived: Condvar,
}

impl Mailbox {
    fn lock(&self) -> MutexGuard<'_, Boxes> {
        // A panic while filing leaves the maps consistent (each operation
        // is one insert or removal), so a poisoned lock is still usable.
        self.boxes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Files a message from rank `src`; one for an aborted stream is dropped.
    pub fn deliver(&self, src: usize, address: Address, payload: Vec<u8>) {
        let mut b = self.lock();
        if b.aborted.contains(&address.stream) {
            return;
        }
        b.queued
            .entry((src, address))
            .or_default()
            .push_back(payload);
        drop(b);
        self.arrived.notify_all();
    }

    /// Marks `stream` aborted here, drops what was filed under it, and
    /// tells its hooks ([`Mailbox::on_abort`]).
    pub fn abort_stream(&self, stream: u64) {
        let mut b = self.lock();
        b.aborted.insert(stream);
        b.queued.retain(|(_, a), _| a.stream != stream);
        let hooks = b.hooks.remove(&stream).unwrap_or_default();
        drop(b);
        self.arrived.notify_all();
        for h in hooks.iter().filter_map(Weak::upgrade) {
            h.stream_aborted();
        }
    }

    /// Tells `hook` when `stream` is aborted here (at once if it already
    /// is), unless the hook is gone by then. The hook is called without the
    /// mailbox's lock held, so it may abort streams itself.
    pub fn on_abort(&self, stream: u64, hook: Weak<dyn AbortHook>) {
        let mut b = self.lock();
        if !b.aborted.contains(&stream) {
            b.hooks.entry(stream).or_default().push(hook);
            return;
        }
        drop(b);
        if let Some(h) = hook.upgrade() {
            h.stream_aborted();
        }
    }

    /// Forgets `stream`'s hooks that are gone (called as one is dropped).
    pub fn forget_hooks(&self, stream: u64) {
        let mut b = self.lock();
        if let Some(hooks) = b.hooks.get_mut(&stream) {
            hooks.retain(|h| h.strong_count() > 0);
            if hooks.is_empty() {
                b.hooks.remove(&stream);
            }
        }
    }

    /// Fails every wait, now and later (a peer is lost).
    pub fn fail(&self, reason: impl Into<String>) {
        let mut b = self.lock();
        b.failed.get_or_insert_with(|| reason.into());
        drop(b);
        self.arrived.notify_all();
    }

    /// Why the transport failed, if it did.
    pub fn failure(&self) -> Option<String> {
        self.lock().failed.clone()
    }

    /// Waits up to `timeout` for the transport to fail; why it failed, or
    /// `None` if it has not.
    pub fn wait_failure(&self, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut b = self.lock();
        loop {
            if let Some(reason) = &b.failed {
                return Some(reason.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            b = self
                .arrived
                .wait_timeout(b, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Takes the oldest message from `src` under `address`, waiting for it.
    pub fn take(&self, src: usize, address: Address, timeout: Option<Duration>) -> Result<Vec<u8>> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut b = self.lock();
        loop {
            if let Some(reason) = &b.failed {
                return Err(Error::Collective(format!("the transport failed: {reason}")));
            }
            if b.aborted.contains(&address.stream) {
                return Err(Error::Aborted("a peer failed".into()));
            }
            let key = (src, address);
            if let Some(q) = b.queued.get_mut(&key) {
                if let Some(m) = q.pop_front() {
                    if q.is_empty() {
                        b.queued.remove(&key);
                    }
                    return Ok(m);
                }
            }
            b = match deadline {
                None => self.arrived.wait(b).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(Error::Collective(format!(
                            "rank {src} sent nothing on stream {:#x} ({} → {}) within {:?}",
                            address.stream,
                            address.from,
                            address.to,
                            timeout.unwrap_or_default()
                        )));
                    }
                    self.arrived
                        .wait_timeout(b, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        }
    }

    /// Messages filed and not yet taken (for tests: nothing may be left
    /// behind once a step is over).
    pub fn pending(&self) -> usize {
        self.lock().queued.values().map(VecDeque::len).sum()
    }

    /// Abort hooks held for streams not aborted yet (for tests: none may
    /// be left behind once a step is over).
    pub fn hooks(&self) -> usize {
        self.lock().hooks.values().map(Vec::len).sum()
    }
}

/// Ranks as threads of one process: a send files the message straight into
/// the destination's mailbox.
pub struct Loopback {
    rank: usize,
    boxes: Arc<Vec<Mailbox>>,
}

impl Loopback {
    /// A job of `n` ranks: one transport per rank.
    pub fn world(n: usize) -> Vec<Arc<Loopback>> {
        let boxes: Arc<Vec<Mailbox>> = Arc::new((0..n).map(|_| Mailbox::default()).collect());
        (0..n)
            .map(|rank| {
                Arc::new(Loopback {
                    rank,
                    boxes: boxes.clone(),
                })
            })
            .collect()
    }
}

impl Transport for Loopback {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.boxes.len()
    }
    fn send(&self, dest: usize, address: Address, payload: &[u8]) -> Result<()> {
        let mailbox = self.boxes.get(dest).ok_or_else(|| {
            Error::Collective(format!("no rank {dest} in a job of {}", self.boxes.len()))
        })?;
        mailbox.deliver(self.rank, address, payload.to_vec());
        Ok(())
    }
    fn mailbox(&self) -> &Mailbox {
        &self.boxes[self.rank]
    }
    fn abort(&self, stream: u64, ranks: &[usize]) {
        for &r in ranks {
            if let Some(m) = self.boxes.get(r) {
                m.abort_stream(stream);
            }
        }
    }
}

/// `values` as little-endian bytes.
pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * 4);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Little-endian bytes as `f32`s; fails on a length that is not a multiple
/// of 4.
pub fn bytes_f32(bytes: &[u8]) -> Result<Vec<f32>> {
    if !bytes.len().is_multiple_of(4) {
        return Err(Error::Collective(format!(
            "a message of {} bytes is not a whole number of f32s",
            bytes.len()
        )));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Lists of token ids as little-endian `u32`s: the number of lists, then
/// each list's length and its ids.
pub fn token_lists_bytes(lists: &[Vec<u32>]) -> Vec<u8> {
    let words = 1 + lists.len() + lists.iter().map(Vec::len).sum::<usize>();
    let mut out = Vec::with_capacity(words * 4);
    out.extend_from_slice(&(lists.len() as u32).to_le_bytes());
    for list in lists {
        out.extend_from_slice(&(list.len() as u32).to_le_bytes());
        for id in list {
            out.extend_from_slice(&id.to_le_bytes());
        }
    }
    out
}

/// The lists [`token_lists_bytes`] wrote; fails on a message that is not
/// one whole such encoding.
pub fn bytes_token_lists(bytes: &[u8]) -> Result<Vec<Vec<u32>>> {
    let bad = |why: &str| {
        Error::Collective(format!(
            "a message of {} bytes is not lists of token ids: {why}",
            bytes.len()
        ))
    };
    if !bytes.len().is_multiple_of(4) {
        return Err(bad("not a whole number of u32s"));
    }
    let mut words = bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize);
    let n = words.next().ok_or_else(|| bad("empty"))?;
    // Each list takes at least its length's word.
    if n > bytes.len() / 4 {
        return Err(bad("more lists than words"));
    }
    let mut lists = Vec::with_capacity(n);
    for _ in 0..n {
        let len = words
            .next()
            .ok_or_else(|| bad("a list's length is missing"))?;
        if len > words.len() {
            return Err(bad("a list runs past the end"));
        }
        lists.push(words.by_ref().take(len).map(|w| w as u32).collect());
    }
    if words.next().is_some() {
        return Err(bad("words left after the last list"));
    }
    Ok(lists)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Count(std::sync::atomic::AtomicUsize);

    impl AbortHook for Count {
        fn stream_aborted(&self) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn abort_hooks_are_told_once_and_forgotten_when_gone() {
        let m = Mailbox::default();
        let hook = Arc::new(Count(Default::default()));
        let weak = || Arc::downgrade(&hook) as Weak<dyn AbortHook>;
        m.on_abort(7, weak());
        m.on_abort(8, weak());
        assert_eq!(m.hooks(), 2);
        m.abort_stream(7);
        m.abort_stream(7);
        assert_eq!(hook.0.load(std::sync::atomic::Ordering::SeqCst), 1);
        // A stream aborted before the hook comes tells it at once.
        m.on_abort(7, weak());
        assert_eq!(hook.0.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert_eq!(m.hooks(), 1);
        drop(hook);
        m.forget_hooks(8);
        assert_eq!(m.hooks(), 0);
    }

    #[test]
    fn token_lists_round_trip_and_bad_messages_are_refused() {
        for lists in [
            vec![],
            vec![vec![]],
            vec![vec![1, 2, 3], vec![], vec![u32::MAX]],
        ] {
            assert_eq!(
                bytes_token_lists(&token_lists_bytes(&lists)).unwrap(),
                lists
            );
        }
        let good = token_lists_bytes(&[vec![7, 8], vec![9]]);
        for bad in [
            &good[..good.len() - 1],
            &good[..good.len() - 4],
            &[][..],
            &[5, 0, 0, 0][..],
        ] {
            assert!(bytes_token_lists(bad).is_err(), "{bad:?}");
        }
        let mut extra = good.clone();
        extra.extend_from_slice(&[0; 4]);
        assert!(bytes_token_lists(&extra).is_err());
    }

    fn at(stream: u64, from: u32, to: u32) -> Address {
        Address { stream, from, to }
    }

    #[test]
    fn messages_keep_their_order_per_source_and_address() {
        let world = Loopback::world(2);
        world[0].send(1, at(7, 0, 1), b"a").unwrap();
        world[0].send(1, at(7, 0, 2), b"x").unwrap();
        world[0].send(1, at(7, 0, 1), b"b").unwrap();
        let got = |a| world[1].recv(0, a, Some(Duration::from_secs(1))).unwrap();
        assert_eq!(got(at(7, 0, 2)), b"x");
        assert_eq!(got(at(7, 0, 1)), b"a");
        assert_eq!(got(at(7, 0, 1)), b"b");
        assert_eq!(world[1].mailbox().pending(), 0);
    }

    #[test]
    fn an_aborted_stream_fails_waits_and_drops_its_messages() {
        let world = Loopback::world(2);
        world[0].send(1, at(3, 0, 1), b"old").unwrap();
        let w = world[1].clone();
        let waiter = std::thread::spawn(move || w.recv(0, at(3, 1, 1), None));
        std::thread::sleep(Duration::from_millis(20));
        world[0].abort(3, &[0, 1]);
        assert!(matches!(waiter.join().unwrap(), Err(Error::Aborted(_))));
        assert_eq!(world[1].mailbox().pending(), 0);
        // Later messages and waits on it fail too; other streams go on.
        world[0].send(1, at(3, 0, 1), b"late").unwrap();
        assert!(world[1].recv(0, at(3, 0, 1), None).is_err());
        world[0].send(1, at(4, 0, 1), b"ok").unwrap();
        assert_eq!(world[1].recv(0, at(4, 0, 1), None).unwrap(), b"ok");
    }

    #[test]
    fn waits_time_out_and_a_failed_transport_fails_them() {
        let world = Loopback::world(2);
        let e = world[1]
            .recv(0, at(1, 0, 1), Some(Duration::from_millis(10)))
            .unwrap_err();
        assert!(e.to_string().contains("sent nothing"), "{e}");
        assert_eq!(
            world[1].mailbox().wait_failure(Duration::from_millis(10)),
            None
        );
        let w = world[1].clone();
        let watcher = std::thread::spawn(move || w.mailbox().wait_failure(Duration::from_secs(30)));
        std::thread::sleep(Duration::from_millis(20));
        world[1].mailbox().fail("rank 0 is gone");
        assert_eq!(watcher.join().unwrap().as_deref(), Some("rank 0 is gone"));
        let e = world[1].recv(0, at(1, 0, 1), None).unwrap_err();
        assert!(e.to_string().contains("rank 0 is gone"), "{e}");
    }

    #[test]
    fn floats_round_trip_through_bytes() {
        let v = [0.0f32, -0.0, 1.5, f32::MIN_POSITIVE, f32::NAN];
        let back = bytes_f32(&f32_bytes(&v)).unwrap();
        assert_eq!(
            back.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            v.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        assert!(bytes_f32(&[1, 2, 3]).is_err());
    }
}
