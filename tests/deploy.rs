//! Data-parallel replicas as separate servers behind a real load balancer:
//! two `parallm serve` instances behind nginx (Debian's, installed by
//! tests/support/install-nginx.sh), configured by examples/deploy/nginx.conf
//! itself with the ports replaced. One server is killed (SIGKILL) while
//! requests stream through nginx: the streams in flight on it are cut, its
//! non-streamed requests (which had sent nothing yet) are retried on the
//! other server and answered whole, none hangs, the others complete, and
//! every later request succeeds through the surviving server.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A child process stopped when dropped: SIGTERM (nginx's master then
/// stops its workers; a SIGKILL would leave them holding the port), then
/// SIGKILL if it is still there after a few seconds.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        common::stop(&mut self.0, Duration::from_secs(5));
    }
}

/// `parallm serve` on a free port; returns it with its port once healthy.
fn serve(model: &Path) -> (Proc, u16) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_parallm"))
        .args(["serve", "--port", "0", "--model-name", "parallm", "--model"])
        .arg(model)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start parallm serve");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(addr) = line.strip_prefix("parallm: listening on ") {
                let _ = tx.send(addr.to_string());
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the server printed its address");
    let port = addr
        .rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .expect("a port");
    let proc = Proc(child);
    wait_healthy(port);
    (proc, port)
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(180)))
        .build()
        .into()
}

fn wait_healthy(port: u16) {
    let t = Instant::now();
    let agent = agent();
    loop {
        let ok = agent
            .get(&format!("http://127.0.0.1:{port}/health"))
            .call()
            .map(|r| r.status() == 200)
            .unwrap_or(false);
        if ok {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "port {port} never healthy"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// nginx running examples/deploy/nginx.conf in front of `a` and `b`,
/// listening on the returned port.
fn nginx(dir: &Path, a: u16, b: u16) -> (Proc, u16) {
    let out = Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/install-nginx.sh"))
        .output()
        .expect("run install-nginx.sh");
    assert!(
        out.status.success(),
        "install-nginx.sh failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bin = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let example = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/deploy/nginx.conf"),
    )
    .expect("examples/deploy/nginx.conf");
    let port = free_port();
    for from in ["127.0.0.1:8001", "127.0.0.1:8002", "127.0.0.1:8080"] {
        assert!(example.contains(from), "the example no longer names {from}");
    }
    let conf = example
        .replace("127.0.0.1:8001", &format!("127.0.0.1:{a}"))
        .replace("127.0.0.1:8002", &format!("127.0.0.1:{b}"))
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{port}"));
    // Everything nginx writes stays in `dir`, and the foreground process is
    // the test's to kill; workers (nobody, when run as root) may write there.
    let prefix: PathBuf = dir.join("nginx");
    std::fs::create_dir_all(prefix.join("logs")).expect("nginx dir");
    let conf = format!(
        "daemon off;\npid {p}/nginx.pid;\nerror_log {p}/logs/error.log;\n{conf}",
        p = prefix.display()
    );
    let path = prefix.join("nginx.conf");
    std::fs::write(&path, conf).expect("write nginx.conf");
    let _ = Command::new("chmod")
        .args(["-R", "a+rwx"])
        .arg(dir)
        .status();
    let child = Command::new(bin)
        .arg("-p")
        .arg(&prefix)
        .arg("-c")
        .arg(&path)
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start nginx");
    let proc = Proc(child);
    wait_healthy(port);
    (proc, port)
}

/// How one request through nginx ended.
#[derive(Debug)]
struct Outcome {
    /// The server nginx chose (its X-Upstream header), if any answered.
    upstream: String,
    status: u16,
    /// A whole answer: `[DONE]` after the stream, or a JSON body with a
    /// finish reason.
    complete: bool,
    took: Duration,
}

fn request(
    port: u16,
    stream: bool,
    max_tokens: usize,
    started: Option<mpsc::Sender<()>>,
) -> Outcome {
    let t = Instant::now();
    let body = json!({
        "model": "parallm",
        "prompt": "Here is a long list of the world's rivers, one per line:",
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": true,
        "stream": stream,
    });
    let resp = agent()
        .post(&format!("http://127.0.0.1:{port}/v1/completions"))
        .header("Content-Type", "application/json")
        .send(body.to_string());
    let mut resp = match resp {
        Ok(r) => r,
        Err(_) => {
            return Outcome {
                upstream: String::new(),
                status: 0,
                complete: false,
                took: t.elapsed(),
            }
        }
    };
    let status = resp.status().as_u16();
    let upstream = resp
        .headers()
        .get("X-Upstream")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let mut text = String::new();
    let mut reader = resp.body_mut().as_reader();
    let mut buf = [0u8; 4096];
    let mut started = started;
    loop {
        match reader.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                text.push_str(&String::from_utf8_lossy(&buf[..n]));
                if let Some(tx) = started.take() {
                    let _ = tx.send(());
                }
            }
        }
    }
    let complete = status == 200
        && if stream {
            text.contains("data: [DONE]")
        } else {
            serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| {
                    v["choices"][0]["finish_reason"]
                        .as_str()
                        .map(str::to_string)
                })
                .is_some()
        };
    Outcome {
        upstream,
        status,
        complete,
        took: t.elapsed(),
    }
}

#[test]
fn nginx_routes_around_a_killed_server_and_no_request_hangs() {
    let model = common::model_path();
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut a, port_a) = serve(&model);
    let (_b, port_b) = serve(&model);
    let (_nginx, port) = nginx(dir.path(), port_a, port_b);

    // Eight long requests, half streamed; least_conn spreads them.
    let (tx, rx) = mpsc::channel();
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let tx = tx.clone();
            std::thread::spawn(move || request(port, i % 2 == 0, 400, Some(tx)))
        })
        .collect();
    drop(tx);
    // Once every request has its first bytes (the non-streamed ones get
    // theirs at the end), the streamed ones are mid-generation: kill A.
    for _ in 0..4 {
        rx.recv_timeout(Duration::from_secs(120))
            .expect("streams started");
    }
    std::thread::sleep(Duration::from_millis(300));
    let killed = Instant::now();
    a.0.kill().expect("kill server A");
    let _ = a.0.wait();
    let outcomes: Vec<Outcome> = handles
        .into_iter()
        .map(|h| h.join().expect("request thread"))
        .collect();
    let on = |o: &Outcome, p: u16| o.upstream.ends_with(&format!(":{p}"));
    let on_a: Vec<&Outcome> = outcomes.iter().filter(|o| on(o, port_a)).collect();
    let on_b: Vec<&Outcome> = outcomes.iter().filter(|o| on(o, port_b)).collect();
    println!("in flight at the kill: {outcomes:#?}");
    // Some went to A first (ending there, or retried on B), some to B.
    let went_to = |p: u16| {
        outcomes
            .iter()
            .any(|o| o.upstream.contains(&format!(":{p}")))
    };
    assert!(
        went_to(port_a) && !on_b.is_empty(),
        "least_conn used both: {outcomes:#?}"
    );
    // A's streams were cut before [DONE]. Its non-streamed requests had
    // sent nothing to their clients yet, so nginx gave them to B, which
    // answered them whole (their upstream lists A, then B).
    for o in &outcomes {
        if o.upstream.contains(&format!(":{port_a},")) {
            assert!(o.complete && on(o, port_b), "not retried on B: {o:?}");
        }
    }
    for o in &on_a {
        assert!(
            !o.complete,
            "a request on the killed server completed: {o:?}"
        );
        assert!(
            o.took < killed.elapsed() + Duration::from_secs(1)
                && killed.elapsed() < Duration::from_secs(170),
            "{o:?}"
        );
    }
    for o in &outcomes {
        assert!(
            o.upstream.is_empty() || on(o, port_a) || on(o, port_b),
            "{o:?}"
        );
        // Nothing accepted by nginx was left without an answer: an error
        // status, a cut stream, or a whole answer.
        assert!(o.complete || o.status != 200 || on(o, port_a), "{o:?}");
    }
    for o in &on_b {
        assert!(
            o.complete,
            "a request on the surviving server failed: {o:?}"
        );
    }

    // Every later request succeeds, through B.
    let later: Vec<Outcome> = (0..6)
        .map(|i| std::thread::spawn(move || request(port, i % 2 == 0, 16, None)))
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().expect("request thread"))
        .collect();
    for o in &later {
        assert!(o.complete && on(o, port_b), "after the kill: {o:?}");
    }
}
