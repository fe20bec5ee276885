//! `parallm launch`'s wait on the launcher it starts (`mpirun` or `srun`),
//! passing on the signals that stop a job.
//!
//! `launch` stands in front of the job the way `serve` stands in front of
//! one process, so SIGTERM to it drains the job as SIGTERM to `serve`
//! drains a server: it becomes SIGUSR1 to the launcher, which forwards it
//! to every rank, and rank 0's server stops taking requests, finishes the
//! ones in flight and ends the job cleanly (`parallm::serve`). A second
//! SIGTERM goes on as SIGTERM: the launcher ends the job at once. SIGUSR1
//! and SIGINT go on as they are. A signal handler here only records the
//! signal in an atomic; the waiting loop does the rest.

use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// The signals received and not yet passed on, one bit per signal number.
static PENDING: AtomicU32 = AtomicU32::new(0);

/// The signals this module passes on.
const PASSED: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGUSR1, libc::SIGINT];

extern "C" fn record(signal: libc::c_int) {
    // An atomic read-modify-write is async-signal-safe.
    PENDING.fetch_or(1 << signal, Ordering::SeqCst);
}

/// Runs `command` to its end, passing on the stopping signals this process
/// receives meanwhile (see the module's documentation); returns its status.
pub fn run(command: &mut Command) -> std::io::Result<ExitStatus> {
    for signal in PASSED {
        // SAFETY: `record` is async-signal-safe (one atomic operation on a
        // static), and the zeroed `sigaction` is a valid value of that C
        // struct (an empty mask, no flags but the one set below).
        let installed = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = record as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigaction(signal, &action, std::ptr::null_mut())
        };
        if installed != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    // The launcher starts with the default dispositions: exec resets
    // caught signals.
    let mut child = command.spawn()?;
    let pid = child.id() as libc::pid_t;
    let mut terms = 0;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        let pending = PENDING.swap(0, Ordering::SeqCst);
        for signal in PASSED {
            if pending & (1 << signal) == 0 {
                continue;
            }
            let send = match signal {
                libc::SIGTERM => {
                    terms += 1;
                    if terms == 1 {
                        eprintln!(
                            "parallm launch: SIGTERM: draining the job (SIGUSR1 to the launcher); SIGTERM again ends it at once"
                        );
                        libc::SIGUSR1
                    } else {
                        eprintln!("parallm launch: SIGTERM again: ending the job at once");
                        libc::SIGTERM
                    }
                }
                other => other,
            };
            // SAFETY: `kill` only sends a signal. `pid` is our child's, not
            // reaped yet (`try_wait` above saw it running), so it cannot
            // name another process.
            unsafe {
                libc::kill(pid, send);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
