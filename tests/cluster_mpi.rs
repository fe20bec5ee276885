//! `parallm generate` as an MPI job (feature `mpi`; `.ci/run` installs
//! OpenMPI and runs this file with the feature): on loopback, with OpenMPI's
//! TCP transport forced (`--mca btl tcp,self`) so the network path is
//! exercised, and f32 weights, each layout's greedy text over the golden
//! prompts equals the same layout's in one process: tp=2 across 2 ranks,
//! pp=2 across 2 ranks, tp=3 in-process × pp=2 across 2 ranks, dp=2 across
//! 2 ranks; and the same with the default (Q4_1) weights. `parallm serve`
//! on 3 ranks (pp=3, a stage per rank) answers 64 concurrent requests
//! exactly as a one-process server does.

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
        for (flags, placement) in [
            (["--tp", "2", "--pp", "1", "--dp", "1"], "spread"),
            (["--tp", "1", "--pp", "2", "--dp", "1"], "by-host"),
            (["--tp", "3", "--pp", "2", "--dp", "1"], "by-host"),
            (["--tp", "1", "--pp", "1", "--dp", "2"], "by-host"),
        ] {
            for prompt in prompts().iter().take(3) {
                let mut args = vec!["--model", &model, "--weights", weights];
                args.extend(flags);
                args.extend(["--max-tokens", "12", "--temperature", "0", prompt.as_str()]);
                let want = generate(1, &args);
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

    /// A server (`ranks` > 1: under mpirun) on `port`, stopped (SIGTERM to
    /// mpirun, which passes it on) when dropped.
    struct Server(std::process::Child);

    impl Drop for Server {
        fn drop(&mut self) {
            common::stop(&mut self.0, Duration::from_secs(20));
        }
    }

    fn serve(ranks: usize, port: u16, args: &[&str]) -> Server {
        let mut cmd = parallm(ranks);
        cmd.args(["serve", "--port", &port.to_string()])
            .args(args)
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

    /// A completion: its tokens, and at each the gap between the two most
    /// likely tokens.
    type Completion = (Vec<String>, Vec<f64>);

    /// The 64 prompts' greedy completions, sent at once.
    fn complete_all(port: u16, prompts: &[Vec<u32>]) -> Vec<Completion> {
        let handles: Vec<_> = prompts
            .iter()
            .cloned()
            .map(|p| {
                std::thread::spawn(move || {
                    let body = serde_json::json!({
                        "prompt": p,
                        "max_tokens": 16,
                        "temperature": 0,
                        "logprobs": 2,
                    });
                    let mut r = agent()
                        .post(&format!("http://127.0.0.1:{port}/v1/completions"))
                        .header("Content-Type", "application/json")
                        .send(body.to_string())
                        .expect("a response");
                    let status = r.status().as_u16();
                    let text = r.body_mut().read_to_string().expect("a body");
                    assert_eq!(status, 200, "{text}");
                    let v: serde_json::Value = serde_json::from_str(&text).expect("JSON");
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
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("request thread"))
            .collect()
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
}

#[cfg(not(feature = "mpi"))]
#[test]
#[ignore = "needs the mpi feature and OpenMPI: bash tests/support/install-openmpi.sh && cargo test --release --features mpi --test cluster_mpi"]
fn generate_under_mpirun_needs_the_mpi_feature() {}
