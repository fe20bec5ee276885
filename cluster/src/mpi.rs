//! The MPI transport (feature `mpi`): ranks are the processes `mpirun` (or
//! `srun`) started, messages go over `MPI_COMM_WORLD`.
//!
//! One progress thread per process is the only thread that moves the
//! transport's messages through MPI: node threads hand it what they send
//! (a send never blocks a node, whatever MPI's protocol for the size), and
//! it posts them as non-blocking sends, completes them, and takes every
//! incoming message (any source, the transport's tag) with a non-blocking
//! matched receive, reading its header (kind, stream, endpoints) and filing
//! it in the rank's [`Mailbox`] once it is whole. The progress thread never
//! blocks inside MPI: a peer that stops halfway through a large message
//! (one MPI sends in several fragments) leaves a receive pending, not a
//! thread stuck, so the heartbeats go on and catch it. Waits therefore never
//! sit inside MPI, and an abort or a lost peer wakes them.
//! When idle it waits on its outgoing queue for a short while, so a send is
//! posted at once. An abort travels as a message of its own to each rank
//! that hosts the stream. MPI is initialized with `MPI_THREAD_MULTIPLE`, so
//! the job-wide calls (host names, barriers, broadcasts) may come from any
//! thread meanwhile.
//!
//! Heartbeats: the progress thread sends one every [`BEAT`] to the peers
//! its rank depends on (rank 0 to every other rank, the others to rank 0),
//! and every message counts as one. Once [`Transport::watch`] gave it a
//! timeout, a peer silent for that long fails the transport, naming the
//! rank: every wait on it fails, and what the process does next is its
//! owner's choice (rank 0 ends its requests with an error and exits
//! non-zero; the other ranks exit). MPI errors are returned, not fatal
//! (`MPI_ERRORS_RETURN` on `MPI_COMM_WORLD`), so a send to a lost peer
//! fails the transport the same way.
//!
//! The job-wide steps around the command are watched as well: the host
//! names' exchange ([`Mpi::hosts`]) and leaving the job ([`Mpi::finish`]:
//! the last barrier, the progress thread's drain, `MPI_Finalize`), so a
//! rank stopped at start-up or at the end ends the job too. Only
//! [`Mpi::barrier`], [`Mpi::broadcast`] and [`Mpi::native_all_reduce`],
//! for tools and benchmarks, block inside MPI.
//!
//! What is and is not recovered: a stream (one step's link) can be aborted
//! and the job goes on; a rank that dies or stops answering ends the job
//! (`mpirun` stops the other ranks when one dies; the heartbeat catches one
//! that hangs).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam::channel::{Receiver, RecvTimeoutError, Sender};
use mpi::collective::{CommunicatorCollectives, Root, SystemOperation};
use mpi::datatype::Equivalence;
use mpi::point_to_point::Source;
use mpi::raw::AsRawMut;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::Threading;

use framework::{Error, Result};

use crate::placement::HEARTBEAT_TIMEOUT;
use crate::transport::{Address, Mailbox, Transport};

/// The one MPI tag the transport uses.
const TAG: i32 = 0x5041;
const DATA: u8 = 0;
const ABORT: u8 = 1;
const HEARTBEAT: u8 = 2;
/// How often a rank tells the peers that watch it that it is alive.
pub const BEAT: Duration = Duration::from_millis(200);
const HEADER: usize = 1 + 8 + 4 + 4;
/// Empty polls the progress thread makes, yielding, before it waits.
const IDLE_YIELDS: u32 = 64;
/// How long an idle progress thread waits for something to send before it
/// polls MPI again.
const IDLE_WAIT: Duration = Duration::from_micros(50);

/// What the progress thread is handed.
enum Outgoing {
    /// A message (header included) for a rank.
    Message(usize, Vec<u8>),
    /// Finish the sends in flight, then stop.
    Stop,
}

fn world() -> SimpleCommunicator {
    SimpleCommunicator::world()
}

/// MPI for this process: the universe (finalized when dropped, after the
/// receiver stops) and the transport over it.
pub struct Mpi {
    transport: Arc<MpiTransport>,
    /// The progress thread; it returns whether it finished what it had.
    receiver: Option<JoinHandle<std::result::Result<(), String>>>,
    /// `None` once this process left the job (MPI_Finalize).
    universe: Option<mpi::environment::Universe>,
}

impl Mpi {
    /// Initializes MPI with full thread support and starts the receiver.
    pub fn init() -> Result<Self> {
        let (universe, provided) =
            mpi::initialize_with_threading(Threading::Multiple).ok_or_else(|| {
                Error::Collective("MPI was already initialized in this process".into())
            })?;
        if provided != Threading::Multiple {
            return Err(Error::Collective(format!(
                "this MPI library gives thread support {provided:?}; parallm's nodes need MPI_THREAD_MULTIPLE"
            )));
        }
        // SAFETY: MPI is initialized; MPI_COMM_WORLD and MPI_ERRORS_RETURN
        // are the library's predefined handles.
        let rc = unsafe {
            mpi::ffi::MPI_Comm_set_errhandler(
                mpi::ffi::RSMPI_COMM_WORLD,
                mpi::ffi::RSMPI_ERRORS_RETURN,
            )
        };
        if rc != 0 {
            return Err(Error::Collective(format!(
                "MPI_Comm_set_errhandler failed with code {rc}"
            )));
        }
        let w = world();
        let (outgoing, queue) = crossbeam::channel::unbounded();
        let transport = Arc::new(MpiTransport {
            rank: w.rank() as usize,
            size: w.size() as usize,
            mailbox: Mailbox::default(),
            outgoing,
            timeout_ms: AtomicU64::new(0),
        });
        let t = transport.clone();
        let receiver = std::thread::Builder::new()
            .name(format!("mpi-progress-{}", transport.rank))
            .spawn(move || t.progress(queue))
            .map_err(|e| Error::Collective(format!("cannot start the MPI progress thread: {e}")))?;
        Ok(Self {
            transport,
            receiver: Some(receiver),
            universe: Some(universe),
        })
    }

    /// The transport.
    pub fn transport(&self) -> Arc<MpiTransport> {
        self.transport.clone()
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.transport.rank
    }

    /// Number of ranks.
    pub fn size(&self) -> usize {
        self.transport.size
    }

    /// Every rank's host (MPI's processor name), in rank order.
    ///
    /// The exchange (`MPI_Iallgather`) never blocks inside MPI: once the
    /// transport is watched ([`Transport::watch`]), a rank that stopped
    /// answering before it (a rank stopped at start-up) fails it, naming
    /// the rank, instead of leaving this one waiting.
    pub fn hosts(&self) -> Result<Vec<String>> {
        const LEN: usize = 256;
        let name = mpi::environment::processor_name()
            .map_err(|e| Error::Collective(format!("MPI's processor name is not UTF-8: {e}")))?;
        // One heap block: this rank's name, then every rank's.
        let mut buf = vec![0u8; LEN * (self.size() + 1)];
        let n = name.len().min(LEN);
        buf[..n].copy_from_slice(&name.as_bytes()[..n]);
        // SAFETY: MPI is initialized (MPI_THREAD_MULTIPLE) and not
        // finalized while `self` lives. The send part (`LEN` bytes) and
        // the receive part (`LEN` per rank) are disjoint ranges of `buf`'s
        // heap block, which moves into the returned `Pending` unmoved (a
        // Vec's move keeps its heap block) and stays allocated until MPI
        // reports the request complete (`Drop` leaks it if it never is);
        // `request` is written by MPI_Iallgather before it is read.
        let request = unsafe {
            let base = buf.as_mut_ptr();
            let mut request = mpi::ffi::RSMPI_REQUEST_NULL;
            let rc = mpi::ffi::MPI_Iallgather(
                base.cast_const().cast(),
                LEN as i32,
                mpi::ffi::RSMPI_UINT8_T,
                base.add(LEN).cast(),
                LEN as i32,
                mpi::ffi::RSMPI_UINT8_T,
                mpi::ffi::RSMPI_COMM_WORLD,
                &mut request,
            );
            if rc != 0 {
                return Err(Error::Collective(format!(
                    "MPI_Iallgather failed with code {rc}"
                )));
            }
            Pending { buf, request }
        };
        let all = self.transport.wait_watched(request).map_err(|why| {
            Error::Collective(format!(
                "the ranks could not exchange their host names: {why}"
            ))
        })?;
        Ok(all[LEN..]
            .chunks(LEN)
            .map(|c| {
                let end = c.iter().position(|&b| b == 0).unwrap_or(LEN);
                String::from_utf8_lossy(&c[..end]).into_owned()
            })
            .collect())
    }

    /// Waits for every rank (a blocking `MPI_Barrier`, unwatched: for
    /// tools and benchmarks; the job's own waits are watched).
    pub fn barrier(&self) {
        world().barrier();
    }

    /// `bytes` of rank `root`, on every rank (the NCCL unique id's way to
    /// the other ranks). Every rank passes a buffer of the same length.
    pub fn broadcast(&self, root: usize, bytes: &mut [u8]) {
        world().process_at_rank(root as i32).broadcast_into(bytes);
    }

    /// Ends every rank of the job at once with `code` (`MPI_Abort`): what a
    /// rank does when its command fails, so no peer waits for it.
    pub fn abort(self, code: i32) -> ! {
        world().abort(code)
    }

    /// `MPI_Allreduce` with `MPI_SUM` (the library's own order of
    /// addition; for the collective benchmark).
    pub fn native_all_reduce(&self, buf: &mut [f32]) {
        let send = buf.to_vec();
        world().all_reduce_into(&send[..], buf, SystemOperation::sum());
    }

    /// Leaves the job: waits for every rank, stops the progress thread
    /// once it finished what it had, and finalizes MPI (what dropping
    /// does).
    ///
    /// No step waits for a stopped peer forever. The barrier first
    /// (`MPI_Ibarrier`): the progress thread keeps the heartbeats
    /// meanwhile, so a peer that stops answering there ends the job. Then
    /// the progress thread gets as long as the heartbeat timeout to finish
    /// its sends and receives, and `MPI_Finalize` (where Open MPI waits
    /// for every rank again) as long again; past that, this process prints
    /// why and exits non-zero, and `mpirun` ends the others.
    pub fn finish(self) {
        self.finish_with(|| {});
    }

    /// [`Mpi::finish`], calling `after_barrier` once every rank passed the
    /// barrier: how `parallm-mpi-check stall-after-finish` stops a rank
    /// there.
    #[doc(hidden)]
    pub fn finish_with(mut self, after_barrier: impl FnOnce()) {
        self.leave(after_barrier);
    }

    fn leave(&mut self, after_barrier: impl FnOnce()) {
        let Some(universe) = self.universe.take() else {
            return;
        };
        // Every rank stops sending before any finalizes.
        if let Err(why) = self.transport.watched_barrier() {
            eprintln!("error: the MPI job cannot finish: {why}");
            world().abort(1);
        }
        after_barrier();
        let _ = self.transport.outgoing.send(Outgoing::Stop);
        if let Some(r) = self.receiver.take() {
            let finished = r
                .join()
                .unwrap_or_else(|_| Err("the MPI progress thread panicked".into()));
            if let Err(why) = finished {
                eprintln!("error: the MPI job cannot finish: {why}");
                world().abort(1);
            }
        }
        let limit = self.transport.limit();
        let (finalized, wait) = crossbeam::channel::bounded::<()>(1);
        let watchdog = std::thread::Builder::new()
            .name("mpi-finalize-watch".into())
            .spawn(move || {
                if wait.recv_timeout(limit) == Err(RecvTimeoutError::Timeout) {
                    eprintln!(
                        "error: the MPI job cannot finish: MPI_Finalize waited {:.1} s for the other ranks; one of them stopped answering",
                        limit.as_secs_f64()
                    );
                    // SAFETY: `_exit` ends the process at once, without
                    // destructors or `atexit` handlers, which could wait
                    // on the MPI library the finalizing thread is stuck in.
                    unsafe { libc::_exit(1) }
                }
            });
        // MPI_Finalize.
        drop(universe);
        let _ = finalized.send(());
        if let Ok(w) = watchdog {
            let _ = w.join();
        }
    }
}

impl Drop for Mpi {
    fn drop(&mut self) {
        self.leave(|| {});
    }
}

/// Messages between the processes of an MPI job.
pub struct MpiTransport {
    rank: usize,
    size: usize,
    mailbox: Mailbox,
    outgoing: Sender<Outgoing>,
    /// The heartbeat timeout in milliseconds; 0 until watched.
    timeout_ms: AtomicU64,
}

fn header(kind: u8, a: Address) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER);
    h.push(kind);
    h.extend_from_slice(&a.stream.to_le_bytes());
    h.extend_from_slice(&a.from.to_le_bytes());
    h.extend_from_slice(&a.to.to_le_bytes());
    h
}

fn parse_header(msg: &[u8]) -> Option<(u8, Address)> {
    let h = msg.get(..HEADER)?;
    Some((
        h[0],
        Address {
            stream: u64::from_le_bytes(h[1..9].try_into().ok()?),
            from: u32::from_le_bytes(h[9..13].try_into().ok()?),
            to: u32::from_le_bytes(h[13..17].try_into().ok()?),
        },
    ))
}

impl MpiTransport {
    /// The peers this rank sends heartbeats to and watches.
    fn peers(&self) -> Vec<usize> {
        match self.rank {
            0 => (1..self.size).collect(),
            _ => vec![0],
        }
    }

    /// The heartbeat timeout once watched, else [`HEARTBEAT_TIMEOUT`]: how
    /// long the steps of leaving the job may wait for the other ranks.
    fn limit(&self) -> Duration {
        match self.timeout_ms.load(Ordering::Relaxed) {
            0 => HEARTBEAT_TIMEOUT,
            ms => Duration::from_millis(ms),
        }
    }

    /// The progress thread: posts what node threads send, completes it,
    /// files what arrives, and keeps the heartbeats, until told to stop;
    /// then finishes what it has, for at most [`MpiTransport::limit`]
    /// (an error says what it left unfinished).
    fn progress(&self, queue: Receiver<Outgoing>) -> std::result::Result<(), String> {
        let mut in_flight: Vec<Pending> = Vec::new();
        // Messages being received, with the rank each comes from.
        let mut receiving: Vec<(usize, Pending)> = Vec::new();
        let mut waiting_on = vec![false; self.size];
        let mut stopping: Option<Instant> = None;
        let mut idle = 0u32;
        let peers = self.peers();
        let beat = header(
            HEARTBEAT,
            Address {
                stream: 0,
                from: 0,
                to: 0,
            },
        );
        let mut last_beat: Option<Instant> = None;
        // When each rank was last heard from, and when watching began.
        let mut heard = vec![Instant::now(); self.size];
        let mut watching: Option<Instant> = None;
        let post = |in_flight: &mut Vec<Pending>, dest: usize, msg: Vec<u8>| match Pending::send(
            dest, msg,
        ) {
            Ok(s) => in_flight.push(s),
            Err(e) => self.mailbox.fail(e),
        };
        loop {
            let mut busy = false;
            while let Ok(out) = queue.try_recv() {
                busy = true;
                match out {
                    Outgoing::Message(dest, msg) => post(&mut in_flight, dest, msg),
                    Outgoing::Stop => stopping = stopping.or(Some(Instant::now())),
                }
            }
            let now = Instant::now();
            if stopping.is_none() && last_beat.is_none_or(|t| now - t >= BEAT) {
                last_beat = Some(now);
                for &p in &peers {
                    post(&mut in_flight, p, beat.clone());
                }
                self.check_heartbeats(&peers, &heard, &mut watching, now);
            }
            let before = in_flight.len();
            in_flight.retain_mut(|s| match s.done() {
                Ok(done) => !done,
                Err(e) => {
                    self.mailbox.fail(e);
                    false
                }
            });
            busy |= in_flight.len() != before;
            if let Some((message, status)) =
                world().any_process().immediate_matched_probe_with_tag(TAG)
            {
                busy = true;
                let src = status.source_rank() as usize;
                heard[src] = Instant::now();
                let len = status.count(u8::equivalent_datatype());
                match Pending::receive(message, len) {
                    Ok(r) => receiving.push((src, r)),
                    Err(e) => self.mailbox.fail(e),
                }
            }
            // Each rank's messages are filed in the order MPI matched them:
            // one still arriving holds back the later ones from its rank.
            waiting_on.fill(false);
            let mut i = 0;
            while i < receiving.len() {
                let src = receiving[i].0;
                if waiting_on[src] {
                    i += 1;
                    continue;
                }
                match receiving[i].1.done() {
                    Ok(false) => {
                        waiting_on[src] = true;
                        i += 1;
                    }
                    Ok(true) => {
                        busy = true;
                        let (src, r) = receiving.remove(i);
                        heard[src] = Instant::now();
                        self.file(src, r.into_buffer());
                    }
                    Err(e) => {
                        receiving.remove(i);
                        self.mailbox.fail(e);
                    }
                }
            }
            if let Some(since) = stopping {
                if in_flight.is_empty() && receiving.is_empty() {
                    return Ok(());
                }
                if now - since > self.limit() {
                    // What is left is leaked (`Pending`'s drop), never
                    // freed under MPI.
                    let from: Vec<usize> = receiving.iter().map(|(src, _)| *src).collect();
                    return Err(format!(
                        "after {:.1} s, {} send(s) and {} receive(s) (from rank(s) {from:?}) are still unfinished; a peer stopped answering",
                        self.limit().as_secs_f64(),
                        in_flight.len(),
                        receiving.len(),
                    ));
                }
            }
            if busy {
                idle = 0;
            } else if idle < IDLE_YIELDS {
                idle += 1;
                std::thread::yield_now();
            } else {
                match queue.recv_timeout(IDLE_WAIT) {
                    Ok(Outgoing::Message(dest, msg)) => post(&mut in_flight, dest, msg),
                    Ok(Outgoing::Stop) => stopping = stopping.or(Some(Instant::now())),
                    Err(_) => {}
                }
            }
        }
    }

    /// Fails the transport if a watched peer has been silent longer than
    /// the timeout (counted from when watching began at the earliest).
    fn check_heartbeats(
        &self,
        peers: &[usize],
        heard: &[Instant],
        watching: &mut Option<Instant>,
        now: Instant,
    ) {
        let ms = self.timeout_ms.load(Ordering::Relaxed);
        if ms == 0 {
            return;
        }
        let since = *watching.get_or_insert(now);
        let timeout = Duration::from_millis(ms);
        for &p in peers {
            let silent = now - heard[p].max(since);
            if silent > timeout {
                self.mailbox.fail(format!(
                    "rank {p} has not answered for {:.1} s (cluster.heartbeat_timeout_secs = {}); it died or hangs",
                    silent.as_secs_f64(),
                    timeout.as_secs_f64()
                ));
            }
        }
    }

    /// Files a message that arrived from `src`.
    fn file(&self, src: usize, mut msg: Vec<u8>) {
        match parse_header(&msg) {
            Some((DATA, address)) => {
                msg.drain(..HEADER);
                self.mailbox.deliver(src, address, msg);
            }
            Some((ABORT, address)) => self.mailbox.abort_stream(address.stream),
            Some((HEARTBEAT, _)) => {}
            Some((other, _)) => self
                .mailbox
                .fail(format!("rank {src} sent a message of unknown kind {other}")),
            None => self.mailbox.fail(format!(
                "rank {src} sent a message of {} bytes without a header",
                msg.len()
            )),
        }
    }

    /// Waits for every rank (`MPI_Ibarrier`) without blocking inside MPI:
    /// an error names why the transport failed meanwhile (a peer lost or
    /// silent past the heartbeat timeout, once watched).
    fn watched_barrier(&self) -> std::result::Result<(), String> {
        // SAFETY: MPI is initialized (MPI_THREAD_MULTIPLE) and not yet
        // finalized while the `Mpi` that owns this transport lives;
        // MPI_REQUEST_NULL is a predefined handle, and `request` is written
        // by MPI_Ibarrier before it is read; the barrier uses no buffer.
        let (rc, request) = unsafe {
            let mut request = mpi::ffi::RSMPI_REQUEST_NULL;
            let rc = mpi::ffi::MPI_Ibarrier(mpi::ffi::RSMPI_COMM_WORLD, &mut request);
            (rc, request)
        };
        if rc != 0 {
            return Err(format!("MPI_Ibarrier failed with code {rc}"));
        }
        self.wait_watched(Pending {
            buf: Vec::new(),
            request,
        })
        .map(drop)
    }

    /// Waits for a collective's request without blocking inside MPI, and
    /// gives back its buffer; an error names why the transport failed
    /// meanwhile (then the request stays pending and its buffer is leaked).
    fn wait_watched(&self, mut request: Pending) -> std::result::Result<Vec<u8>, String> {
        loop {
            if request.done()? {
                return Ok(request.into_buffer());
            }
            if let Some(why) = self.mailbox.wait_failure(Duration::from_millis(1)) {
                return Err(why);
            }
        }
    }

    fn enqueue(&self, dest: usize, msg: Vec<u8>) -> Result<()> {
        self.outgoing
            .send(Outgoing::Message(dest, msg))
            .map_err(|_| Error::Collective("the MPI progress thread has stopped".into()))
    }
}

/// A non-blocking send or receive in flight: its buffer stays here,
/// unmoved, until MPI says the request is complete.
struct Pending {
    buf: Vec<u8>,
    request: mpi::ffi::MPI_Request,
}

impl Pending {
    /// Posts `buf` to rank `dest` (`MPI_Isend`).
    fn send(dest: usize, buf: Vec<u8>) -> std::result::Result<Self, String> {
        let count = i32::try_from(buf.len()).map_err(|_| {
            format!(
                "a message of {} bytes is too large for one MPI send",
                buf.len()
            )
        })?;
        // SAFETY: MPI was initialized (MPI_THREAD_MULTIPLE) before the
        // progress thread started and is finalized only after it stops;
        // `buf`'s heap block stays allocated and unmodified, owned by the
        // returned `Pending`, until `MPI_Test` reports the request complete
        // (and `Drop` leaks it if it never is); `request` is written by
        // MPI_Isend before it is read.
        unsafe {
            let mut request = mpi::ffi::RSMPI_REQUEST_NULL;
            let rc = mpi::ffi::MPI_Isend(
                buf.as_ptr().cast(),
                count,
                mpi::ffi::RSMPI_UINT8_T,
                dest as i32,
                TAG,
                mpi::ffi::RSMPI_COMM_WORLD,
                &mut request,
            );
            if rc != 0 {
                return Err(format!("MPI_Isend to rank {dest} failed with code {rc}"));
            }
            Ok(Self { buf, request })
        }
    }

    /// Starts receiving a probed message of `len` bytes (`MPI_Imrecv`),
    /// which returns at once however much of it has arrived.
    fn receive(
        mut message: mpi::point_to_point::Message,
        len: i32,
    ) -> std::result::Result<Self, String> {
        let size =
            usize::try_from(len).map_err(|_| format!("MPI reported a message of {len} bytes"))?;
        let mut buf = vec![0u8; size];
        // SAFETY: `message` is a live matched message from
        // MPI_Improbe of `len` bytes of MPI_UINT8_T (its status's count);
        // MPI_Imrecv sets the handle to MPI_MESSAGE_NULL, so rsmpi's drop
        // check holds. `buf` holds `len` bytes and its heap block stays
        // allocated and untouched, owned by the returned `Pending`, until
        // `MPI_Test` reports the request complete (`Drop` leaks it if it
        // never is); `request` is written by MPI_Imrecv before it is read.
        unsafe {
            let mut request = mpi::ffi::RSMPI_REQUEST_NULL;
            let rc = mpi::ffi::MPI_Imrecv(
                buf.as_mut_ptr().cast(),
                len,
                mpi::ffi::RSMPI_UINT8_T,
                message.as_raw_mut(),
                &mut request,
            );
            if rc != 0 {
                // The message stays matched but unreceived; forget it
                // rather than let rsmpi's drop check panic. The transport
                // fails, so nothing waits for what it carried.
                std::mem::forget(message);
                return Err(format!("MPI_Imrecv failed with code {rc}"));
            }
            Ok(Self { buf, request })
        }
    }

    /// Whether the request is complete (its buffer may then be used or
    /// freed); an error completes it too.
    fn done(&mut self) -> std::result::Result<bool, String> {
        let mut flag = 0;
        // SAFETY: `request` is the live request MPI_Isend or MPI_Imrecv
        // returned (or MPI_REQUEST_NULL once completed, for which MPI_Test
        // reports completion); the status is ignored. A request that
        // failed is forgotten (MPI_REQUEST_NULL, a predefined handle).
        let rc = unsafe {
            let rc =
                mpi::ffi::MPI_Test(&mut self.request, &mut flag, mpi::ffi::RSMPI_STATUS_IGNORE);
            if rc != 0 {
                self.request = mpi::ffi::RSMPI_REQUEST_NULL;
            }
            rc
        };
        if rc != 0 {
            return Err(format!("a message failed with MPI error code {rc}"));
        }
        Ok(flag != 0)
    }

    /// The buffer of a completed request.
    fn into_buffer(mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        // MPI may still read or write the buffer of a request that is not
        // complete (a peer that stopped answering), so it is leaked, never
        // freed under MPI, and nothing waits for the peer.
        if !matches!(self.done(), Ok(true) | Err(_)) {
            std::mem::forget(std::mem::take(&mut self.buf));
        }
    }
}

impl Transport for MpiTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn send(&self, dest: usize, address: Address, payload: &[u8]) -> Result<()> {
        if dest >= self.size {
            return Err(Error::Collective(format!(
                "no rank {dest} in a job of {}",
                self.size
            )));
        }
        if dest == self.rank {
            self.mailbox.deliver(self.rank, address, payload.to_vec());
            return Ok(());
        }
        let mut msg = header(DATA, address);
        msg.extend_from_slice(payload);
        self.enqueue(dest, msg)
    }

    fn mailbox(&self) -> &Mailbox {
        &self.mailbox
    }

    fn watch(&self, timeout: Duration) {
        let ms = u64::try_from(timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        self.timeout_ms.store(ms, Ordering::Relaxed);
    }

    fn abort(&self, stream: u64, ranks: &[usize]) {
        let msg = header(
            ABORT,
            Address {
                stream,
                from: 0,
                to: 0,
            },
        );
        for &r in ranks {
            if r == self.rank {
                self.mailbox.abort_stream(stream);
            } else if r < self.size {
                let _ = self.enqueue(r, msg.clone());
            }
        }
    }
}
