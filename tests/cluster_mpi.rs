//! `parallm generate` as an MPI job (feature `mpi`; `.ci/run` installs
//! OpenMPI and runs this file with the feature): on loopback, with OpenMPI's
//! TCP transport forced (`--mca btl tcp,self`) so the network path is
//! exercised, and f32 weights, each layout's greedy text over the golden
//! prompts equals the same layout's in one process: tp=2 across 2 ranks,
//! pp=2 across 2 ranks, tp=3 in-process × pp=2 across 2 ranks, dp=2 across
//! 2 ranks; and the same with the default (Q4_1) weights, and with a draft
//! model's drafts crossing ranks. `parallm serve`
//! on 3 ranks (pp=3, a stage per rank) answers 64 concurrent requests
//! exactly as a one-process server does, and on 2 ranks (tp=2, pp=2,
//! dp=2, f32 weights) with prefix caching on, 48 requests sharing three
//! prefixes get a one-process server's text with caching off while the
//! usage reports their cached tokens; ranks given different settings are
//! refused, naming the rank and what differs; `bench throughput` runs across
//! ranks, and `bench latency` (one shard) is refused there. A worker rank killed with kill -9
//! or stopped (SIGSTOP, caught by the heartbeat) mid-generation ends every
//! in-flight request with an error, streamed or not, turns `/health` to
//! 503, and ends the job non-zero within the timeout. SIGUSR1 to `mpirun`,
//! or SIGTERM to `parallm launch`, drains the job: `/health` and new
//! requests get 503, the requests in flight finish whole, and the job exits
//! 0, also when the drain's timeout cuts requests off.

#[cfg(feature = "mpi")]
mod common;

#[cfg(feature = "mpi")]
mod with_mpi {
    use crate::common;
    use std::process::{Command, Output, Stdio};
    use std::time::{Duration, Instant};

    /// Runs `cmd` to the end or fails after `limit`.
    fn run(mut cmd: Command, limit: Duration) -> Output {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let t = Instant::now();
        while child.try_wait().expect("wait").is_none() {
            if t.elapsed() > limit {
                let _ = child.kill();
                panic!("no answer within {limit:?}: {cmd:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        child.wait_with_output().expect("output")
    }

    /// `parallm`, as a job of `ranks` ranks under mpirun over TCP when
    /// `ranks` > 1 (as root too: the CI machine runs as root).
    fn parallm(ranks: usize) -> Command {
        let exe = env!("CARGO_BIN_EXE_parallm");
        if ranks == 1 {
            return Command::new(exe);
        }
        let mut c = Command::new("mpirun");
        c.args(["--oversubscribe", "-np", &ranks.to_string()])
            .args(["--mca", "btl", "tcp,self"])
            .arg(exe)
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
        c
    }

    fn generate(ranks: usize, args: &[&str]) -> String {
        let mut cmd = parallm(ranks);
        cmd.arg("generate").args(args);
        let out = run(cmd, Duration::from_secs(300));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{ranks} rank(s), {args:?}:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    fn prompts() -> Vec<String> {
        common::golden()["cases"]
            .as_array()
            .expect("cases")
            .iter()
            .map(|c| c["prompt"].as_str().expect("prompt").to_string())
            .collect()
    }

    fn check(weights: &str) {
        let model = common::model_path().display().to_string();
        // Stages and replicas change no arithmetic (tests/engine.rs checks),
        // so one process's text at pp=2 stands for its text at dp=2 too.
        let mut tp1: Vec<Option<String>> = vec![None; prompts().len()];
        for (flags, placement) in [
            (["--tp", "2", "--pp", "1", "--dp", "1"], "spread"),
            (["--tp", "1", "--pp", "2", "--dp", "1"], "by-host"),
            (["--tp", "3", "--pp", "2", "--dp", "1"], "by-host"),
            (["--tp", "1", "--pp", "1", "--dp", "2"], "by-host"),
        ] {
            for (i, prompt) in prompts().iter().enumerate() {
                let mut args = vec!["--model", &model, "--weights", weights];
                args.extend(flags);
                args.extend(["--max-tokens", "12", "--temperature", "0", prompt.as_str()]);
                let want = match (flags[1], &tp1[i]) {
                    ("1", Some(text)) => text.clone(),
                    ("1", None) => tp1[i].insert(generate(1, &args)).clone(),
                    _ => generate(1, &args),
                };
                let mut spread = args.clone();
                spread.extend(["--placement", placement]);
                let got = generate(2, &spread);
                assert_eq!(got, want, "{flags:?} {placement} {weights}: {prompt:?}");
            }
        }
    }

    #[test]
    fn every_layout_across_two_ranks_over_tcp_gives_the_text_of_one_process() {
        check("f32");
    }

    #[test]
    fn the_default_weights_across_ranks_give_the_text_of_one_process() {
        check("auto");
    }

    #[test]
    fn a_draft_model_across_ranks_gives_the_text_of_one_process() {
        // The reference model's own file drafts for its f32 weights; the
        // drafts cross from the draft node's rank to the target's nodes on
        // the other (pp=2 by host: the draft node with the last stage on
        // rank 1; tp=2 spread: the draft node on rank 0, tensor rank 1 on
        // rank 1), and the text is one process's without speculation.
        let model = common::model_path().display().to_string();
        for (flags, placement) in [
            (["--tp", "1", "--pp", "2"], "by-host"),
            (["--tp", "2", "--pp", "1"], "spread"),
        ] {
            for prompt in prompts().iter() {
                let mut args = vec!["--model", &model, "--weights", "f32"];
                args.extend(flags);
                args.extend(["--max-tokens", "12", "--temperature", "0", prompt.as_str()]);
                let want = generate(1, &args);
                let mut spec = args.clone();
                spec.extend(["--placement", placement, "--speculative", "draft"]);
                spec.extend(["--draft-model", &model]);
                let got = generate(2, &spec);
                assert_eq!(got, want, "{flags:?} {placement}: {prompt:?}");
            }
        }
    }

    /// A server (`ranks` > 1: under mpirun) on `port`, stopped (SIGTERM to
    /// mpirun, which passes it on) when dropped.
    struct Server(std::process::Child);

    impl Drop for Server {
        fn drop(&mut self) {
            common::stop(&mut self.0, Duration::from_secs(20));
        }
    }

    fn serve(ranks: usize, port: u16, args: &[&str]) -> Server {
        serve_with(ranks, port, args, &[])
    }

    /// [`serve`], with `env` set for the server's processes.
    fn serve_with(ranks: usize, port: u16, args: &[&str], env: &[(&str, &str)]) -> Server {
        let mut cmd = parallm(ranks);
        cmd.args(["serve", "--port", &port.to_string()])
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let server = Server(cmd.spawn().expect("start the server"));
        let agent = agent();
        let t = Instant::now();
        while agent
            .get(&format!("http://127.0.0.1:{port}/health"))
            .call()
            .map(|r| r.status() != 200)
            .unwrap_or(true)
        {
            assert!(
                t.elapsed() < Duration::from_secs(180),
                "{ranks} rank(s): never healthy"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        server
    }

    fn agent() -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(600)))
            .build()
            .into()
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port")
    }

    /// POSTs `body` to the server's `/v1/completions`.
    fn post_completion(port: u16, body: &serde_json::Value) -> ureq::http::Response<ureq::Body> {
        agent()
            .post(&format!("http://127.0.0.1:{port}/v1/completions"))
            .header("Content-Type", "application/json")
            .send(body.to_string())
            .expect("a response")
    }

    /// A completion: its tokens, and at each the gap between the two most
    /// likely tokens.
    type Completion = (Vec<String>, Vec<f64>);

    /// Each of `bodies` POSTed to `/v1/completions` at once, each on a
    /// thread of its own; each answer must be a 200, and `parse` reads it.
    fn post_all<T: Send + 'static>(
        port: u16,
        bodies: Vec<serde_json::Value>,
        parse: fn(serde_json::Value) -> T,
    ) -> Vec<T> {
        let handles: Vec<_> = bodies
            .into_iter()
            .map(|body| {
                std::thread::spawn(move || {
                    let mut r = post_completion(port, &body);
                    let status = r.status().as_u16();
                    let text = r.body_mut().read_to_string().expect("a body");
                    assert_eq!(status, 200, "{text}");
                    parse(serde_json::from_str(&text).expect("JSON"))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("request thread"))
            .collect()
    }

    /// The 64 prompts' greedy completions, sent at once.
    fn complete_all(port: u16, prompts: &[Vec<u32>]) -> Vec<Completion> {
        let bodies = prompts
            .iter()
            .map(|p| {
                serde_json::json!({
                    "prompt": p,
                    "max_tokens": 16,
                    "temperature": 0,
                    "logprobs": 2,
                })
            })
            .collect();
        post_all(port, bodies, |v| {
            let lp = &v["choices"][0]["logprobs"];
            let tokens = lp["tokens"]
                .as_array()
                .expect("tokens")
                .iter()
                .map(|t| t.as_str().unwrap_or_default().to_string())
                .collect();
            let gaps = lp["top_logprobs"]
                .as_array()
                .expect("top_logprobs")
                .iter()
                .map(|top| {
                    let mut v: Vec<f64> = top
                        .as_object()
                        .map(|o| o.values().filter_map(serde_json::Value::as_f64).collect())
                        .unwrap_or_default();
                    v.sort_by(|a, b| b.total_cmp(a));
                    v.first()
                        .zip(v.get(1))
                        .map_or(f64::INFINITY, |(a, b)| a - b)
                })
                .collect();
            (tokens, gaps)
        })
    }

    #[test]
    fn serve_on_three_ranks_answers_64_concurrent_requests_as_one_process() {
        let model = common::model_path().display().to_string();
        let args = ["--model", model.as_str(), "--pp", "3"];
        let prompts = common::sixty_four_prompts();
        let want = {
            let port = free_port();
            let _one = serve(1, port, &args);
            complete_all(port, &prompts)
        };
        let port = free_port();
        let _three = serve(3, port, &args);
        let got = complete_all(port, &prompts);
        assert_eq!(got.len(), 64);
        // Equal, or diverging only where the one-process run had a near-tie
        // (batches form differently from run to run, and a batch's
        // composition may move a logit by rounding).
        let mut diverged = 0;
        for (i, ((g, _), (w, gaps))) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.len(), 16, "request {i} ended early");
            if let Some(k) = g.iter().zip(w).position(|(a, b)| a != b) {
                assert!(
                    gaps[k] < 1e-3,
                    "request {i} diverges at token {k}, where the top-2 gap is {} (not a near-tie)\n got  {g:?}\n want {w:?}",
                    gaps[k]
                );
                diverged += 1;
            }
        }
        eprintln!("{diverged} of 64 diverged, each at a near-tie");
    }

    /// Each prompt's greedy text (12 tokens) and the prompt tokens the
    /// server reported served from its cache, all sent at once.
    fn complete_texts(port: u16, prompts: &[String]) -> Vec<(String, u64)> {
        let bodies = prompts
            .iter()
            .map(|p| {
                serde_json::json!({
                    "prompt": p,
                    "max_tokens": 12,
                    "temperature": 0,
                    "ignore_eos": true,
                })
            })
            .collect();
        post_all(port, bodies, |v| {
            let out = v["choices"][0]["text"].as_str().expect("text").to_string();
            let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .expect("usage.prompt_tokens_details.cached_tokens");
            (out, cached)
        })
    }

    /// One request of each family, then all 48 at once, on a server of
    /// `ranks` ranks started with `args` and `env`.
    fn two_waves(ranks: usize, args: &[&str], env: &[(&str, &str)]) -> Vec<(String, u64)> {
        let prompts = common::shared_prefix_texts(48);
        let port = free_port();
        let _server = serve_with(ranks, port, args, env);
        let mut got = complete_texts(port, &prompts[..3]);
        got.extend(complete_texts(port, &prompts));
        got
    }

    #[test]
    fn prefix_caching_across_ranks_changes_no_output() {
        // Nodes on other ranks hold the cached blocks' keys and values: a
        // hit hands a later request's block table the blocks an earlier one
        // wrote there. With f32 weights, every layout's text with caching on
        // across two ranks equals one process's with caching off.
        let model = common::model_path().display().to_string();
        let base = ["--model", model.as_str(), "--weights", "f32"];
        let want = two_waves(1, &base, &[("PARALLM__SCHEDULER__PREFIX_CACHING", "false")]);
        assert!(want.iter().all(|(_, cached)| *cached == 0), "{want:?}");
        for (flags, placement) in [
            (["--tp", "2", "--pp", "1", "--dp", "1"], "spread"),
            (["--tp", "1", "--pp", "2", "--dp", "1"], "by-host"),
            (["--tp", "1", "--pp", "1", "--dp", "2"], "by-host"),
        ] {
            let mut args = base.to_vec();
            args.extend(flags);
            args.extend(["--placement", placement]);
            let got = two_waves(2, &args, &[]);
            for (i, ((g, _), (w, _))) in got.iter().zip(&want).enumerate() {
                assert_eq!(g, w, "{flags:?} {placement}: request {i}");
            }
            let cached: u64 = got.iter().map(|(_, c)| c).sum();
            // The second wave alone finds 45 of its prefixes cached by the
            // first; each is at least 16 tokens.
            assert!(cached >= 45 * 16, "{flags:?}: {cached} cached tokens");
            eprintln!("{flags:?} {placement}: {cached} prompt tokens from the cache");
        }
    }

    /// The processes whose environment holds `mark` (`mpirun` passes its
    /// environment to its ranks): pid and environment variables each.
    fn job_environs(mark: &str) -> Vec<(u32, Vec<Vec<u8>>)> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
                continue;
            };
            let vars: Vec<Vec<u8>> = env.split(|&b| b == 0).map(<[u8]>::to_vec).collect();
            if vars.iter().any(|v| v == mark.as_bytes()) {
                found.push((pid, vars));
            }
        }
        found
    }

    /// The `OMPI_COMM_WORLD_RANK` in a process's environment, if any.
    fn rank_of(vars: &[Vec<u8>]) -> Option<String> {
        vars.iter()
            .find_map(|v| v.strip_prefix(b"OMPI_COMM_WORLD_RANK="))
            .map(|r| String::from_utf8_lossy(r).into_owned())
    }

    /// The pid of the process of rank `rank` among those whose environment
    /// holds `mark`.
    fn rank_pid(mark: &str, rank: usize) -> u32 {
        let want = rank.to_string();
        let t = Instant::now();
        loop {
            let procs = job_environs(mark);
            if let Some((pid, _)) = procs
                .iter()
                .find(|(_, vars)| rank_of(vars).as_ref() == Some(&want))
            {
                return *pid;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "no rank {rank} with {mark}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Every process whose environment holds `mark`, one line each: pid,
    /// state (`/proc/PID/stat`), its `OMPI_COMM_WORLD_RANK` and command
    /// line; for a failure's message.
    fn job_processes(mark: &str) -> String {
        let mut lines = Vec::new();
        for (pid, vars) in job_environs(mark) {
            let rank = rank_of(&vars).unwrap_or_else(|| "-".into());
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // The state follows the parenthesized command name.
            let state = stat
                .rsplit_once(") ")
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .unwrap_or("?")
                .to_owned();
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                .unwrap_or_default();
            lines.push(format!("pid {pid} state {state} rank {rank}: {cmdline}"));
        }
        lines.join("\n")
    }

    /// One request's outcome (`max_tokens`, never stopped early): its
    /// status and body (a stream's whole text). `started` hears when a
    /// stream has its first tokens.
    fn long_request(
        port: u16,
        stream: bool,
        max_tokens: usize,
        started: std::sync::mpsc::Sender<()>,
    ) -> (u16, String) {
        let body = serde_json::json!({
            "prompt": "Once upon a time",
            "max_tokens": max_tokens,
            "ignore_eos": true,
            "stream": stream,
        });
        let mut r = post_completion(port, &body);
        let status = r.status().as_u16();
        if !stream {
            return (status, r.body_mut().read_to_string().unwrap_or_default());
        }
        use std::io::BufRead;
        let mut text = String::new();
        let mut told = false;
        for line in std::io::BufReader::new(r.body_mut().as_reader()).lines() {
            let Ok(line) = line else { break };
            if !told && line.starts_with("data:") {
                let _ = started.send(());
                told = true;
            }
            text.push_str(&line);
            text.push('\n');
        }
        (status, text)
    }

    /// Serves pp=2 on 2 ranks, starts 3 streamed and 3 plain long requests,
    /// sends `signal` to rank 1 once every stream has tokens, and checks
    /// what clients and the launcher see; the job must end within
    /// `within` of the signal.
    fn lose_rank_one(signal: &str, heartbeat_secs: u64, within: Duration) {
        let port = free_port();
        let mark = format!("PARALLM_TEST_JOB={port}");
        let mut cmd = pp2_server(port);
        cmd.env(
            "PARALLM__CLUSTER__HEARTBEAT_TIMEOUT_SECS",
            heartbeat_secs.to_string(),
        )
        .env("PARALLM_TEST_JOB", port.to_string());
        let mut job = cmd.spawn().expect("start the job");
        let stderr = stderr_reader(&mut job);
        wait_healthy(port, &mut job);
        let victim = rank_pid(&mark, 1);
        let requests = three_streams_three_plain(port, 4000);
        // /health, polled until the server is gone.
        let polling = std::thread::spawn(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(2)))
                .build()
                .into();
            let mut seen = Vec::new();
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(60) {
                match agent.get(&format!("http://127.0.0.1:{port}/health")).call() {
                    Ok(r) => seen.push(r.status().as_u16()),
                    Err(_) if seen.contains(&503) => break,
                    Err(_) => {}
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            seen
        });
        let killed = Instant::now();
        self::signal(victim, signal);
        let status = loop {
            if let Some(s) = job.try_wait().expect("wait") {
                break s;
            }
            if killed.elapsed() > within + Duration::from_secs(30) {
                // What the job's processes are doing, before they go.
                let processes = job_processes(&mark);
                let _ = Command::new("kill")
                    .args(["-9", &victim.to_string()])
                    .status();
                let _ = job.kill();
                let _ = job.wait();
                panic!(
                    "the job still ran {:?} after kill {signal} to pid {victim}; its processes:\n{processes}\nstderr:\n{}",
                    killed.elapsed(),
                    stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let took = killed.elapsed();
        let stderr = stderr();
        // Rank 1 is gone whatever the signal (mpirun continues and kills
        // a stopped rank).
        let _ = Command::new("kill")
            .args(["-9", &victim.to_string()])
            .stderr(Stdio::null())
            .status();
        assert!(
            !status.success(),
            "the job exited 0 after kill {signal}\n{stderr}"
        );
        assert!(
            took <= within,
            "the job ended {took:?} after kill {signal} (limit {within:?})\n{stderr}"
        );
        for (i, (stream, h)) in requests.into_iter().enumerate() {
            let (status, body) = h.join().expect("a request's thread");
            assert!(
                body.contains("\"error\"") && body.contains("MPI job cannot go on"),
                "request {i} (stream {stream}, status {status}) got no error naming the loss: {}",
                &body[body.len().saturating_sub(600)..]
            );
            if stream {
                assert!(!body.contains("[DONE]") || body.contains("error"), "{body}");
            } else {
                assert!(status >= 500, "request {i}: {status} {body}");
            }
        }
        let seen = polling.join().expect("the /health poller");
        assert!(
            seen.contains(&503),
            "/health never answered 503: {seen:?}\n{stderr}"
        );
        let count = |code| seen.iter().filter(|&&s| s == code).count();
        eprintln!(
            "kill {signal}: the job ended non-zero {took:?} after it; /health answered 200 {} times, then 503 {} times",
            count(200),
            count(503)
        );
    }

    /// `parallm serve` of the reference model on `port`, pp=2 with a stage
    /// on each of 2 ranks; stdout dropped, stderr piped.
    fn pp2_server(port: u16) -> Command {
        let model = common::model_path().display().to_string();
        let mut cmd = parallm(2);
        cmd.args(["serve", "--port", &port.to_string(), "--model", &model])
            .args(["--pp", "2", "--placement", "spread"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        cmd
    }

    /// Reads `job`'s stderr all along (so a full pipe never blocks it);
    /// the returned function gives all of it once the job has ended.
    fn stderr_reader(job: &mut std::process::Child) -> impl FnOnce() -> String {
        let reader = job.stderr.take().map(|mut e| {
            std::thread::spawn(move || {
                use std::io::Read;
                let mut text = String::new();
                let _ = e.read_to_string(&mut text);
                text
            })
        });
        move || {
            reader
                .map(|h| h.join().unwrap_or_default())
                .unwrap_or_default()
        }
    }

    /// Waits until the server on `port` is healthy; fails if `job` ends
    /// first or it takes over 3 minutes.
    fn wait_healthy(port: u16, job: &mut std::process::Child) {
        let t = Instant::now();
        while agent()
            .get(&format!("http://127.0.0.1:{port}/health"))
            .call()
            .map(|r| r.status() != 200)
            .unwrap_or(true)
        {
            assert!(t.elapsed() < Duration::from_secs(180), "never healthy");
            assert!(
                job.try_wait().expect("wait").is_none(),
                "the job ended early"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Three streamed and three plain requests of `max_tokens` each, on
    /// threads; returns once every stream has its first tokens. Each
    /// thread gives whether it streams, its status and its body.
    fn three_streams_three_plain(
        port: u16,
        max_tokens: usize,
    ) -> Vec<(bool, std::thread::JoinHandle<(u16, String)>)> {
        let (started_tx, started) = std::sync::mpsc::channel();
        let requests = [true, false, true, false, true, false]
            .into_iter()
            .map(|stream| {
                let tx = started_tx.clone();
                (
                    stream,
                    std::thread::spawn(move || long_request(port, stream, max_tokens, tx)),
                )
            })
            .collect();
        for _ in 0..3 {
            started
                .recv_timeout(Duration::from_secs(60))
                .expect("every stream has its first tokens");
        }
        // The plain ones, too, have reached the scheduler (a busy machine can
        // hold their threads back past the streams' first tokens).
        let t = Instant::now();
        while routed_requests(port) < 6.0 {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "the six requests were not all admitted"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        requests
    }

    /// Requests admitted so far (`parallm_requests_routed_total` over every
    /// replica; health probes are not counted).
    fn routed_requests(port: u16) -> f64 {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(5)))
            .build()
            .into();
        let text = agent
            .get(&format!("http://127.0.0.1:{port}/metrics"))
            .call()
            .ok()
            .and_then(|mut r| r.body_mut().read_to_string().ok())
            .unwrap_or_default();
        text.lines()
            .filter(|l| l.starts_with("parallm_requests_routed_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Serves pp=2 on 2 ranks as `job` (started with its stderr piped, on
    /// `port`), starts 3 streamed and 3 plain requests, calls `stop` with
    /// `job`'s pid once every stream has tokens, and checks that the job
    /// drains: `/health` and a new request answer 503 while the requests
    /// finish whole, and the job then exits 0.
    fn drains(mut job: std::process::Child, port: u16, stop: impl FnOnce(u32)) {
        let stderr = stderr_reader(&mut job);
        wait_healthy(port, &mut job);
        const TOKENS: usize = 160;
        let requests = three_streams_three_plain(port, TOKENS);
        stop(job.id());
        let asked = Instant::now();
        let health = |port| {
            agent()
                .get(&format!("http://127.0.0.1:{port}/health"))
                .call()
                .map(|r| r.status().as_u16())
        };
        while health(port).ok() != Some(503) {
            assert!(
                asked.elapsed() < Duration::from_secs(10),
                "/health did not turn 503"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let late = post_completion(port, &serde_json::json!({"prompt": "Hi", "max_tokens": 4}));
        assert_eq!(late.status().as_u16(), 503, "a new request while draining");
        for (i, (stream, h)) in requests.into_iter().enumerate() {
            let (status, body) = h.join().expect("a request's thread");
            assert_eq!(status, 200, "request {i} (stream {stream}): {body}");
            // An error object, not a sampled token that reads "error".
            assert!(!body.contains("\"error\":{"), "request {i}: {body}");
            if stream {
                assert!(body.contains("data: [DONE]"), "request {i}: {body}");
            } else {
                let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
                assert_eq!(
                    v["usage"]["completion_tokens"].as_u64(),
                    Some(TOKENS as u64),
                    "request {i}: {body}"
                );
            }
        }
        let (status, stderr) = ended_within(
            &mut job,
            asked,
            Duration::from_secs(120),
            "the drain began",
            stderr,
        );
        assert!(status.success(), "the job ended {status}\n{stderr}");
        assert!(
            stderr.contains("every in-flight request finished"),
            "{stderr}"
        );
        eprintln!("drained in {:?}", asked.elapsed());
    }

    /// `job`'s exit status and stderr (`stderr` gives it) once it ends;
    /// fails if it still runs `limit` after `since`, when `what` happened.
    fn ended_within(
        job: &mut std::process::Child,
        since: Instant,
        limit: Duration,
        what: &str,
        stderr: impl FnOnce() -> String,
    ) -> (std::process::ExitStatus, String) {
        loop {
            if let Some(s) = job.try_wait().expect("wait") {
                return (s, stderr());
            }
            if since.elapsed() > limit {
                let _ = job.kill();
                let _ = job.wait();
                panic!("the job still ran {limit:?} after {what}\n{}", stderr());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` to `pid`.
    fn signal(pid: u32, signal: &str) {
        let sent = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("kill");
        assert!(sent.success());
    }

    #[test]
    fn sigusr1_to_mpirun_drains_the_job() {
        // mpirun passes SIGUSR1 on to every rank; rank 0's server drains
        // and the other ranks (which ignore it) end cleanly after it.
        let port = free_port();
        let job = pp2_server(port).spawn().expect("start the job");
        drains(job, port, |pid| signal(pid, "-USR1"));
    }

    #[test]
    fn a_drain_past_its_timeout_still_ends_the_job_cleanly() {
        // The other ranks' nodes end when rank 0's engine goes, which the
        // handlers of requests cut off at the timeout hold for a moment.
        let port = free_port();
        let mut job = pp2_server(port)
            .args(["--set", "server.shutdown_timeout_secs=1"])
            .spawn()
            .expect("start the job");
        let stderr = stderr_reader(&mut job);
        wait_healthy(port, &mut job);
        let (started_tx, started) = std::sync::mpsc::channel();
        let streams: Vec<_> = (0..2)
            .map(|_| {
                let tx = started_tx.clone();
                std::thread::spawn(move || long_request(port, true, 4000, tx))
            })
            .collect();
        for _ in &streams {
            started
                .recv_timeout(Duration::from_secs(60))
                .expect("every stream has its first tokens");
        }
        signal(job.id(), "-USR1");
        let t = Instant::now();
        let (status, stderr) =
            ended_within(&mut job, t, Duration::from_secs(60), "SIGUSR1", stderr);
        assert!(status.success(), "the job ended {status}\n{stderr}");
        assert!(
            stderr.contains("2 request(s) were cut off by the shutdown timeout"),
            "{stderr}"
        );
        for s in streams {
            let (_, body) = s.join().expect("a stream's thread");
            assert!(!body.contains("[DONE]"), "{body}");
        }
        eprintln!("ended {:?} after SIGUSR1", t.elapsed());
    }

    #[test]
    fn sigterm_to_parallm_launch_drains_the_job() {
        // `launch` stands in front of the job as `serve` does in front of
        // one process: its SIGTERM reaches the ranks as a drain.
        let dir = tempfile::tempdir().expect("a temporary directory");
        let port = free_port();
        let config = dir.path().join("job.toml");
        std::fs::write(
            &config,
            format!(
                "[model]\npath = {:?}\n[server]\nport = {port}\n[parallel]\npp = 2\n[cluster]\nranks = 2\nmpirun_args = [\"--mca\", \"btl\", \"tcp,self\"]\n",
                common::model_path().display().to_string()
            ),
        )
        .expect("write the config");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_parallm"));
        cmd.args(["launch", "--config"])
            .arg(&config)
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        drains(cmd.spawn().expect("start the job"), port, |pid| {
            signal(pid, "-TERM")
        });
    }

    #[test]
    fn bench_throughput_runs_across_ranks_and_bench_latency_is_refused() {
        let model = common::model_path().display().to_string();
        let out = job_output(
            2,
            &[
                "bench",
                "throughput",
                "--model",
                &model,
                "--pp",
                "2",
                "--placement",
                "spread",
            ],
            &["--concurrency", "1,4", "--output-tokens", "8", "--no-bare"],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let table = String::from_utf8_lossy(&out.stdout);
        let rows: Vec<&str> = table
            .lines()
            .filter(|l| l.starts_with("| 1 |") || l.starts_with("| 4 |"))
            .collect();
        assert_eq!(rows.len(), 2, "{table}");
        let out = job_output(2, &["bench", "latency", "--model", &model], &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            stderr.contains("`bench latency` measures one shard"),
            "{stderr}"
        );
    }

    /// Ranks that read different settings (here rank 1 another weight
    /// format, as a host's own configuration file would give it; mpirun's
    /// `:` gives each rank its own command line) do not start: the job
    /// ends non-zero at once, and rank 0 names the rank and the setting,
    /// with both values, instead of computing with two formats.
    #[test]
    fn ranks_that_run_different_jobs_are_refused_naming_what_differs() {
        let model = common::model_path().display().to_string();
        let exe = env!("CARGO_BIN_EXE_parallm");
        let args = [
            "generate",
            "--model",
            &model,
            "--pp",
            "2",
            "--max-tokens",
            "4",
        ];
        let mut cmd = Command::new("mpirun");
        cmd.args([
            "--oversubscribe",
            "--mca",
            "btl",
            "tcp,self",
            "-np",
            "1",
            exe,
        ])
        .args(args)
        .args(["--weights", "f32", "hello"])
        .args([":", "-np", "1", exe])
        .args(args)
        .args(["--weights", "auto", "hello"])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
        let out = run(cmd, Duration::from_secs(120));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(
            stderr.contains(
                "rank 1 does not run rank 0's job: its weight format is `Auto` where rank 0's is `F32`"
            ),
            "{stderr}"
        );
        assert!(!stderr.contains("its model is"), "{stderr}");
    }

    /// `parallm ARGS MORE` on `ranks` ranks, to the end.
    fn job_output(ranks: usize, args: &[&str], more: &[&str]) -> Output {
        let mut cmd = parallm(ranks);
        cmd.args(args).args(more);
        run(cmd, Duration::from_secs(300))
    }

    #[test]
    fn a_worker_rank_killed_mid_generation_fails_every_request_and_the_job() {
        // mpirun ends the job, or a send to the dead rank fails, long before
        // the heartbeat's 30 s (the 10 s leave a busy machine room to tear
        // the job down).
        lose_rank_one("-KILL", 30, Duration::from_secs(10));
    }

    #[test]
    fn a_worker_rank_that_stops_answering_is_caught_by_the_heartbeat() {
        // Detection takes the timeout; rank 0 then writes the errors out
        // and exits in about a second (the rest is room for a busy machine).
        lose_rank_one("-STOP", 3, Duration::from_secs(10));
    }
}

#[cfg(not(feature = "mpi"))]
#[test]
#[ignore = "needs the mpi feature and OpenMPI: bash tests/support/install-openmpi.sh && cargo test --release --features mpi --test cluster_mpi"]
fn generate_under_mpirun_needs_the_mpi_feature() {}
