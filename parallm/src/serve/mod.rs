//! `parallm serve`: the engine behind an OpenAI-compatible HTTP server.
//!
//! [`run`] installs the Prometheus recorder, binds the listener at once (so
//! `/health` answers 503 while the model loads), loads the engine on its own
//! thread, and then serves until SIGTERM, SIGUSR1 or Ctrl-C. Shutdown
//! drains: new generation requests and `/health` get 503, in-flight requests
//! get up to `server.shutdown_timeout_secs` to finish (a second SIGTERM or
//! Ctrl-C cuts that short), then the listener and the engine stop and the
//! process exits 0. Under `mpirun` (a cluster in the settings) SIGTERM is
//! the launcher ending the job, as it does when a rank dies: SIGTERM, or a
//! rank of the job lost, also while draining, ends every request with an
//! error at once, `/health` answers 503, and [`ServeError::Stopped`] makes
//! the process exit non-zero within 0.75 s (see `end_lost_job`). An engine
//! that halts by itself (its policy or merge panicked) is ended the same
//! way, in or out of a job. SIGUSR1,
//! which `mpirun` forwards to every rank (the others ignore it), drains the
//! job: after the drain the engine goes, which ends the other ranks' nodes,
//! and every rank leaves the job cleanly. A request counts as finished when its
//! handler (or its stream) is done, which is before the last bytes reach the
//! socket, so every response written while draining says `Connection: close`
//! and the listener then stops gracefully: the HTTP workers wait (up to
//! [`FLUSH_TIMEOUT_SECS`]) for those connections to be written and closed.
//!
//! [`AppState`] is shared by every HTTP worker: the engine (set once, when
//! loaded), the checked [`Settings`], the draining flag, the count of
//! in-flight generation requests (each held by an [`InFlight`] guard for as
//! long as its response is being produced) and the time of the last
//! successful health probe, written only by the probe task.

pub mod api;
pub mod error;
pub mod routes;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use actix_web::dev::Service;
use actix_web::http::ConnectionType;
use actix_web::{web, App, HttpServer};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use actors::llm::{Engine, EngineBuilder, Event, ModelSource, Request};
use framework::metrics as m;

use crate::config::Settings;
use crate::serve::error::ApiError;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The listener could not bind.
    #[error("cannot listen on {addr}: {reason}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        reason: std::io::Error,
    },
    /// The metrics recorder could not be installed.
    #[error("cannot install the metrics recorder: {0}")]
    Metrics(String),
    /// The model could not be loaded.
    #[error("cannot load the model: {0}")]
    Load(String),
    /// The HTTP server failed.
    #[error("the HTTP server failed: {0}")]
    Io(#[from] std::io::Error),
    /// The tokenizer threads could not start.
    #[error("cannot start the tokenizer threads: {0}")]
    Threads(String),
    /// The `[cluster]` placement asks for what this build does not run.
    #[error("{0}")]
    Cluster(String),
    /// The engine stopped for good while serving: a rank of the MPI job
    /// died or stopped answering, or the engine's own policy or merge
    /// panicked. Every request was ended with an error, and the process
    /// exits non-zero so that it (or its job) is restarted.
    #[error("{0}")]
    Stopped(String),
}

/// What every handler shares.
pub struct AppState {
    /// The engine, once loaded.
    pub engine: OnceLock<Arc<Engine>>,
    /// The embedding models of `[[models]]`, once loaded (with the engine).
    pub embedders: OnceLock<Vec<Served>>,
    /// The checked configuration.
    pub settings: Settings,
    /// The served model's id.
    pub model_id: String,
    /// Unix seconds at start.
    pub started: u64,
    /// Set when the drain begins: refuse new work.
    pub draining: AtomicBool,
    /// Generation requests being answered.
    pub inflight: AtomicUsize,
    /// Each data-parallel replica's health probes: when the last one
    /// succeeded, and the last one's failure, if it failed (empty until the
    /// first round).
    pub probes: Mutex<Vec<ProbeState>>,
    /// Renders `/metrics`.
    pub prometheus: PrometheusHandle,
    /// Tokenizes prompts and renders templates off the HTTP workers.
    pub tokenizer_pool: rayon::ThreadPool,
}

/// An embedding model the server holds.
pub struct Served {
    /// The id clients name.
    pub name: String,
    /// Its engine.
    pub embedder: Arc<actors::embed::Embedder>,
    /// Whether requests may ask for fewer dimensions.
    pub matryoshka: bool,
}

impl AppState {
    /// The embedding model `model` names (the only one when it names
    /// none), or why there is none: 400 naming `model` for the generation
    /// model or when none is served, 404 for an unknown name; 503 while
    /// loading or draining.
    pub fn embedder(&self, model: Option<&str>) -> Result<&Served, ApiError> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(ApiError::Unavailable(
                "the server is shutting down and accepts no new requests".into(),
            ));
        }
        let generation = |name: &str| {
            ApiError::param(
                "model",
                format!("`model` '{name}' is a generation model and does not serve embeddings; GET /v1/models lists the embedding models"),
            )
        };
        let Some(list) = self.embedders.get() else {
            return match self
                .settings
                .embed_models
                .iter()
                .any(|m| Some(m.name.as_str()) == model)
            {
                true => Err(ApiError::Unavailable("the model is still loading".into())),
                false if self.settings.embed_models.is_empty() => {
                    Err(generation(model.unwrap_or(&self.model_id)))
                }
                false => Err(ApiError::Unavailable("the models are still loading".into())),
            };
        };
        match model {
            Some(name) => {
                list.iter()
                    .find(|s| s.name == name)
                    .ok_or_else(|| match name == self.model_id {
                        true => generation(name),
                        false => ApiError::ModelNotFound(name.to_string()),
                    })
            }
            None => match list.as_slice() {
                [one] => Ok(one),
                [] => Err(generation(&self.model_id)),
                _ => Err(ApiError::param(
                    "model",
                    "`model` is required: this server holds several embedding models",
                )),
            },
        }
    }

    /// The engine, or 503 while loading or draining, or once it stopped
    /// for good.
    pub fn engine(&self) -> Result<Arc<Engine>, ApiError> {
        if let Some(why) = self.stopped() {
            return Err(ApiError::Unavailable(format!(
                "{why}; the server is exiting"
            )));
        }
        if self.draining.load(Ordering::SeqCst) {
            return Err(ApiError::Unavailable(
                "the server is shutting down and accepts no new requests".into(),
            ));
        }
        self.engine
            .get()
            .cloned()
            .ok_or_else(|| ApiError::Unavailable("the model is still loading".into()))
    }

    /// Why the engine stopped for good (its MPI job lost a rank, or it
    /// halted), if it did.
    fn stopped(&self) -> Option<String> {
        self.engine
            .get()
            .and_then(|e| e.stopped().map(str::to_string))
    }

    /// Whether the server is healthy, and why not: every data-parallel
    /// replica must have answered a probe within `health_max_age` (a
    /// replica that fails would fail its share of the requests).
    pub fn health(&self) -> (bool, String) {
        if let Some(why) = self.stopped() {
            return (false, format!("{why}; exiting"));
        }
        if self.draining.load(Ordering::SeqCst) {
            return (false, "shutting down".into());
        }
        if self.engine.get().is_none() {
            return (false, "loading the model".into());
        }
        let probes = match self.probes.lock() {
            Ok(p) => p.clone(),
            Err(_) => return (false, "the probes' state was lost".into()),
        };
        if probes.is_empty() {
            return (false, "no probe has finished yet".into());
        }
        let max_age = self.settings.health_max_age;
        let replica = |r: usize| match probes.len() {
            1 => String::new(),
            _ => format!("replica {r}: "),
        };
        let mut failing = Vec::new();
        let mut oldest = Duration::ZERO;
        for (r, p) in probes.iter().enumerate() {
            let why = p.error.as_deref().unwrap_or("none has finished");
            match p.ok.map(|t| t.elapsed()) {
                Some(age) if age <= max_age => oldest = oldest.max(age),
                Some(age) => failing.push(format!(
                    "{}no successful probe for {:.0}s ({why})",
                    replica(r),
                    age.as_secs_f64()
                )),
                None => failing.push(format!("{}no successful probe yet ({why})", replica(r))),
            }
        }
        if failing.is_empty() {
            let what = match probes.len() {
                1 => "probe".to_string(),
                n => format!("probes of all {n} replicas"),
            };
            (
                true,
                format!("{what} succeeded within {:.1}s", oldest.as_secs_f64()),
            )
        } else {
            (false, failing.join("; "))
        }
    }

    /// Refreshes the engine gauges (so they are right even between steps).
    pub fn publish_gauges(&self) {
        if let Some(engine) = self.engine.get() {
            actors::llm::policy::publish_gauges(&engine.stats().scheduler.policy);
        }
    }

    /// One probe of data-parallel replica `replica`: a one-token request
    /// through the engine, sent to that replica.
    async fn probe(&self, replica: usize) -> Result<(), String> {
        let engine = self
            .engine
            .get()
            .cloned()
            .ok_or("the model is not loaded")?;
        let token = engine.tokenizer().and_then(|t| t.bos()).unwrap_or(0);
        let mut req = Request::greedy_tokens(vec![token], 1);
        req.priority = i32::MAX;
        // Not user traffic: the request-level metrics leave it out.
        req.traffic = actors::llm::Traffic::Probe { replica };
        let mut events = engine
            .generate_async(req)
            .await
            .map_err(|e| e.to_string())?;
        let id = events.id();
        let wait = async {
            while let Some(ev) = events.next().await {
                match ev {
                    Event::Token { .. } | Event::PromptScores(_) => {}
                    Event::Finished { .. } => return Ok(()),
                    Event::Failed { error } => return Err(error),
                    Event::Refused { field, reason } => return Err(format!("`{field}` {reason}")),
                    Event::Cancelled => return Err("the probe was cancelled".into()),
                }
            }
            Err("the probe's stream ended early".into())
        };
        match actix_web::rt::time::timeout(routes::PROBE_TIMEOUT, wait).await {
            Ok(r) => r,
            Err(_) => {
                engine.cancel(id);
                Err(format!(
                    "the probe took longer than {}s",
                    routes::PROBE_TIMEOUT.as_secs()
                ))
            }
        }
    }
}

/// Holds one in-flight generation request for the drain at shutdown.
pub struct InFlight(Arc<AppState>);

impl InFlight {
    /// Counts a request in.
    pub fn new(state: Arc<AppState>) -> Self {
        state.inflight.fetch_add(1, Ordering::SeqCst);
        Self(state)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One data-parallel replica's health probes.
#[derive(Debug, Clone, Default)]
pub struct ProbeState {
    /// When its last probe succeeded.
    pub ok: Option<Instant>,
    /// Its last probe's failure, if that failed.
    pub error: Option<String>,
}

/// Installs the Prometheus recorder with every metric described and bucketed.
pub fn install_metrics() -> Result<PrometheusHandle, ServeError> {
    let mut builder = PrometheusBuilder::new();
    for metric in m::ALL {
        if metric.kind == m::Kind::Histogram {
            builder = builder
                .set_buckets_for_metric(Matcher::Full(metric.name.to_string()), metric.buckets())
                .map_err(|e| ServeError::Metrics(e.to_string()))?;
        }
    }
    let handle = builder
        .install_recorder()
        .map_err(|e| ServeError::Metrics(e.to_string()))?;
    for metric in m::ALL {
        match metric.kind {
            m::Kind::Counter => metrics::describe_counter!(metric.name, metric.help),
            m::Kind::Gauge => metrics::describe_gauge!(metric.name, metric.help),
            m::Kind::Histogram => metrics::describe_histogram!(metric.name, metric.help),
        }
    }
    // Counters are exported from the start, at 0, so that rates, ratios
    // and absent() alerts work before the first event: those without
    // labels, and those whose label values are a fixed few.
    for metric in m::ALL {
        if metric.kind == m::Kind::Counter && metric.labels.is_empty() {
            metrics::counter!(metric.name).increment(0);
        }
    }
    for reason in m::FAILURE_REASONS {
        metrics::counter!(m::REQUEST_FAILURE, "reason" => *reason).increment(0);
    }
    for reason in ["stop", "length"] {
        metrics::counter!(m::REQUEST_SUCCESS, "finish_reason" => reason).increment(0);
    }
    Ok(handle)
}

/// The model id a file is served under.
pub fn model_id(settings: &Settings, path: Option<&std::path::Path>) -> String {
    if let Some(name) = &settings.model_name {
        return name.clone();
    }
    path.and_then(|p| p.file_name())
        .and_then(|n| n.to_str())
        .map(|n| n.trim_end_matches(".gguf").to_string())
        .unwrap_or_else(|| "SmolLM2-135M-Instruct.Q4_1".into())
}

fn checks_key(state: &AppState, req: &actix_web::dev::ServiceRequest) -> Result<(), ApiError> {
    let keys = &state.settings.api_keys;
    if keys.is_empty() || req.path() == "/health" {
        return Ok(());
    }
    let header = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    check_bearer(header, keys)
}

/// Checks an `Authorization` header against the accepted keys: the scheme
/// `Bearer` in any case (RFC 7235), exactly one space, then a key equal to
/// one of `keys` byte for byte. Keys are compared by their SHA-256 digests,
/// every key and every digest byte, so the time taken says nothing about
/// how much of a key matched or which one did.
fn check_bearer(header: Option<&str>, keys: &[String]) -> Result<(), ApiError> {
    use sha2::{Digest, Sha256};
    let token = header.and_then(|h| {
        let (scheme, token) = h.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then_some(token)
    });
    let Some(token) = token else {
        return Err(ApiError::Unauthorized(
            "an API key is required: send `Authorization: Bearer KEY`".into(),
        ));
    };
    let sent = Sha256::digest(token.as_bytes());
    let mut matched = 0u8;
    for key in keys {
        let want = Sha256::digest(key.as_bytes());
        let diff = sent
            .iter()
            .zip(want.iter())
            .fold(0u8, |d, (a, b)| d | (a ^ b));
        matched |= u8::from(diff == 0);
    }
    if matched == 1 {
        Ok(())
    } else {
        Err(ApiError::Unauthorized("the API key is not valid".into()))
    }
}

/// Serves until SIGTERM, SIGUSR1 or Ctrl-C (see the module's
/// documentation); `loader` resolves the model path (it may
/// fetch the reference model) on the loading thread.
pub fn run<L>(settings: Settings, loader: L) -> Result<(), ServeError>
where
    L: FnOnce() -> Result<std::path::PathBuf, String> + Send + 'static,
{
    if !settings.placement.is_local() && settings.engine.cluster.is_none() {
        return Err(ServeError::Cluster(format!(
            "cluster.ranks: the placement puts nodes on {} ranks; start them with mpirun or srun (`parallm launch`), from a build with the mpi feature",
            settings.placement.ranks()
        )));
    }
    let prometheus = install_metrics()?;
    let system = actix_web::rt::System::new();
    system.block_on(serve(settings, loader, prometheus))
}

async fn serve<L>(
    settings: Settings,
    loader: L,
    prometheus: PrometheusHandle,
) -> Result<(), ServeError>
where
    L: FnOnce() -> Result<std::path::PathBuf, String> + Send + 'static,
{
    let tokenizer_pool = rayon::ThreadPoolBuilder::new()
        .num_threads(settings.tokenizer_threads)
        .thread_name(|i| format!("tokenize-{i}"))
        // A panic drops the job's answer channel: the request gets a 500.
        .panic_handler(|_| {})
        .build()
        .map_err(|e| ServeError::Threads(e.to_string()))?;
    let state = Arc::new(AppState {
        tokenizer_pool,
        engine: OnceLock::new(),
        embedders: OnceLock::new(),
        model_id: model_id(&settings, settings.model_path.as_deref()),
        settings,
        started: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        draining: AtomicBool::new(false),
        inflight: AtomicUsize::new(0),
        probes: Mutex::new(Vec::new()),
        prometheus,
    });
    let data = web::Data::from(state.clone());
    let addr = state.settings.addr;
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .wrap_fn(|req, srv| {
                let route = req.match_pattern().unwrap_or_else(|| "unmatched".into());
                let state = req.app_data::<web::Data<AppState>>().cloned();
                let denied = state.as_ref().and_then(|s| checks_key(s, &req).err());
                let fut = denied.is_none().then(|| srv.call(req));
                async move {
                    let result = match (denied, fut) {
                        (Some(e), _) => Err(e.into()),
                        (None, Some(f)) => f.await,
                        (None, None) => Err(ApiError::Engine("unreachable".into()).into()),
                    };
                    let draining = state.as_ref().is_some_and(|s| s.draining.load(Ordering::SeqCst));
                    let mut result = result;
                    if let (true, Ok(r)) = (draining, result.as_mut()) {
                        // Closed once written, so the graceful stop need not
                        // wait for an idle keep-alive connection.
                        r.response_mut().head_mut().set_connection_type(ConnectionType::Close);
                    }
                    let status = match &result {
                        Ok(r) => r.status().as_u16(),
                        Err(e) => e.as_response_error().status_code().as_u16(),
                    };
                    metrics::counter!(m::HTTP_REQUESTS, "route" => route, "status" => status.to_string())
                        .increment(1);
                    result
                }
            })
            .route("/v1/completions", web::post().to(routes::completions))
            .route("/v1/chat/completions", web::post().to(routes::chat_completions))
            .route("/v1/embeddings", web::post().to(routes::embeddings))
            .route("/v1/models", web::get().to(routes::models))
            .route("/v1/models/{id:.+}", web::get().to(routes::model))
            .route("/tokenize", web::post().to(routes::tokenize))
            .route("/tokenizer_info", web::get().to(routes::tokenizer_info))
            .route("/detokenize", web::post().to(routes::detokenize))
            .route("/health", web::get().to(routes::health))
            .route("/metrics", web::get().to(routes::metrics))
            .default_service(web::to(routes::not_found))
    })
    .on_connect(routes::on_connect)
    .workers(state.settings.workers)
    // actix counts connections per worker.
    .max_connections(
        state
            .settings
            .max_connections
            .div_ceil(state.settings.workers)
            .max(1),
    )
    .disable_signals()
    .shutdown_timeout(FLUSH_TIMEOUT_SECS)
    .bind(addr)
    .map_err(|reason| ServeError::Bind { addr, reason })?;
    let bound = server.addrs().first().copied().unwrap_or(addr);
    println!("parallm: listening on http://{bound}");
    tracing::info!("listening on http://{bound}");
    let server = server.run();
    let handle = server.handle();

    // Load the engine on its own thread; the listener answers meanwhile.
    let (loaded_tx, loaded_rx) = tokio::sync::oneshot::channel();
    let engine_cfg = state.settings.engine.clone();
    let embed_models = state.settings.embed_models.clone();
    std::thread::spawn(move || {
        let load = move || {
            let engine = loader().and_then(|path| {
                let mut cfg = engine_cfg;
                cfg.model = ModelSource::Gguf(path);
                EngineBuilder::config(cfg)
                    .build()
                    .map_err(|e| e.to_string())
            })?;
            let mut served = Vec::new();
            for m in embed_models {
                let embedder = actors::embed::Embedder::start(m.config.clone())
                    .map_err(|e| format!("embedding model '{}': {e}", m.name))?;
                served.push(Served {
                    name: m.name,
                    embedder: Arc::new(embedder),
                    matryoshka: m.matryoshka,
                });
            }
            Ok((engine, served))
        };
        // A panic while loading is a bug, but its message still reaches
        // the user as the reason serve stops.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(load)).unwrap_or_else(
            |payload| {
                Err(format!(
                    "loading panicked: {}",
                    crate::kit::panic_text(payload)
                ))
            },
        );
        let _ = loaded_tx.send(result);
    });

    let server_task = actix_web::rt::spawn(server);
    let mut signals = stop_signals();
    let in_job = state.settings.engine.cluster.is_some();
    let load = async {
        match loaded_rx.await {
            Ok(r) => r,
            Err(_) => Err("the loading thread died".into()),
        }
    };
    futures::pin_mut!(load);
    // Under mpirun a drain asked for while the model loads waits for the
    // load: the other ranks' nodes end cleanly only once rank 0's engine
    // has them.
    let mut drain_when_loaded = false;
    let engine = loop {
        tokio::select! {
            r = &mut load => break match r {
                Ok((engine, served)) => {
                    let _ = state.embedders.set(served);
                    Some(Arc::new(engine))
                }
                Err(e) => {
                    handle.stop(false).await;
                    let _ = server_task.await;
                    return Err(ServeError::Load(e));
                }
            },
            signal = signals.recv() => match signal {
                Some(StopSignal::Drain) if in_job => {
                    if !drain_when_loaded {
                        eprintln!("parallm: draining (SIGUSR1) once the model is loaded");
                    }
                    drain_when_loaded = true;
                }
                _ => break None,
            },
        }
    };
    let Some(engine) = engine else {
        eprintln!("parallm: stopped while loading");
        handle.stop(false).await;
        let _ = server_task.await;
        if in_job {
            return Err(ServeError::Stopped(
                "the MPI job was ended (SIGTERM) while the model loaded".into(),
            ));
        }
        return Ok(());
    };
    let _ = state.engine.set(engine);
    state.publish_gauges();
    println!("parallm: model '{}' ready", state.model_id);
    for s in state.embedders.get().into_iter().flatten() {
        println!("parallm: embedding model '{}' ready", s.name);
    }

    // Health probes, one now and then one per interval.
    let probe_state = state.clone();
    let replicas = state.settings.engine.dp.max(1);
    let prober = actix_web::rt::spawn(async move {
        loop {
            // Every replica, at once: one that fails is seen, whatever the
            // router would have chosen, and a slow one delays no other's.
            let results =
                futures::future::join_all((0..replicas).map(|r| probe_state.probe(r))).await;
            for (replica, result) in results.into_iter().enumerate() {
                if let Err(e) = &result {
                    tracing::warn!("health probe of replica {replica} failed: {e}");
                }
                if let Ok(mut probes) = probe_state.probes.lock() {
                    if probes.len() < replicas {
                        probes.resize(replicas, ProbeState::default());
                    }
                    let p = &mut probes[replica];
                    match result {
                        Ok(()) => {
                            p.ok = Some(Instant::now());
                            p.error = None;
                        }
                        Err(e) => p.error = Some(e),
                    }
                }
            }
            probe_state.prometheus.run_upkeep();
            actix_web::rt::time::sleep(probe_state.settings.health_probe_interval).await;
        }
    });

    let stop = match drain_when_loaded {
        true => Ok(StopSignal::Drain),
        false => tokio::select! {
            signal = signals.recv() => Ok(signal.unwrap_or(StopSignal::Terminate)),
            why = stopped_for_good(&state) => Err(why),
        },
    };
    let lost = match stop {
        Err(why) => Some(why),
        // Under mpirun, SIGTERM means the launcher is ending the job (as it
        // does when another rank dies), and a drain cannot outlive the
        // other ranks: end every request now instead.
        Ok(StopSignal::Terminate) if in_job => Some(end_job_now(&state).await),
        Ok(_) => None,
    };
    if let Some(why) = lost {
        prober.abort();
        return end_lost_job(&state, handle, server_task, why).await;
    }
    state.draining.store(true, Ordering::SeqCst);
    prober.abort();
    let deadline = Instant::now() + state.settings.shutdown_timeout;
    let waiting = state.inflight.load(Ordering::SeqCst);
    eprintln!(
        "parallm: shutting down; {waiting} request(s) in flight get up to {}s",
        state.settings.shutdown_timeout.as_secs()
    );
    let mut cut_by = "the shutdown timeout";
    while state.inflight.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        // A rank lost while draining, or the launcher ending the job, ends
        // the drain as it would have ended serving.
        let lost = match signals.try_recv() {
            Ok(StopSignal::Terminate) if in_job => Some(end_job_now(&state).await),
            Ok(StopSignal::Terminate) => {
                eprintln!("parallm: stopping at once (SIGTERM or Ctrl-C while draining)");
                cut_by = "SIGTERM or Ctrl-C while draining";
                break;
            }
            _ => state.stopped(),
        };
        if let Some(why) = lost {
            return end_lost_job(&state, handle, server_task, why).await;
        }
        actix_web::rt::time::sleep(Duration::from_millis(20)).await;
    }
    if let Some(why) = state.stopped() {
        return end_lost_job(&state, handle, server_task, why).await;
    }
    let left = state.inflight.load(Ordering::SeqCst);
    if left > 0 {
        // Each request left gets an error (a 500, or an error event ending
        // its stream) rather than a connection closed mid-answer: the
        // engine and the embedders end them all, and their handlers write
        // that out.
        let why = format!("the server shut down before the request finished ({cut_by})");
        if let Some(engine) = state.engine.get() {
            engine.stop_now(why.clone());
        }
        for s in state.embedders.get().into_iter().flatten() {
            s.embedder.stop_now(why.clone());
        }
        let flushed = Instant::now() + LOST_FLUSH;
        while state.inflight.load(Ordering::SeqCst) > 0 && Instant::now() < flushed {
            actix_web::rt::time::sleep(Duration::from_millis(10)).await;
        }
    }
    // Stop gracefully, so that responses still being written reach their
    // clients; a handler still running after that (its engine did not
    // answer) is cut by closing its connection.
    handle
        .stop(state.inflight.load(Ordering::SeqCst) == 0)
        .await;
    let _ = server_task.await;
    let engine = state.engine.get().cloned();
    let embedders: Vec<Arc<actors::embed::Embedder>> = state
        .embedders
        .get()
        .map(|v| v.iter().map(|s| s.embedder.clone()).collect())
        .unwrap_or_default();
    drop(state);
    // The HTTP workers may still drop their handlers' references for a
    // moment after a forced stop.
    for e in embedders {
        if let Ok(e) = sole_owner(e).await {
            let _ = actix_web::rt::task::spawn_blocking(move || {
                e.shutdown_timeout(Duration::from_secs(5))
            })
            .await;
        }
    }
    if let Some(engine) = engine {
        match sole_owner(engine).await {
            Ok(engine) => {
                let done = actix_web::rt::task::spawn_blocking(move || {
                    engine.shutdown_timeout(Duration::from_secs(5))
                })
                .await
                .unwrap_or(false);
                if !done && left == 0 {
                    eprintln!("parallm: the engine did not stop cleanly");
                }
            }
            // The other ranks' nodes end only when the engine goes: without
            // it, leaving the job would wait for them forever.
            Err(_) if in_job => {
                return Err(ServeError::Stopped(
                    "the engine is still referenced after the drain, so the other ranks cannot be told to stop; ending the job".into(),
                ))
            }
            Err(_) => eprintln!("parallm: the engine is still referenced; leaving it to exit"),
        }
    }
    if left > 0 {
        eprintln!("parallm: {left} request(s) were cut off by {cut_by}");
    } else {
        eprintln!("parallm: every in-flight request finished");
    }
    Ok(())
}

/// `shared` itself once no other reference is left, waiting up to 5 s for
/// the others to go; else `shared` back.
async fn sole_owner<T>(mut shared: Arc<T>) -> Result<T, Arc<T>> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match Arc::try_unwrap(shared) {
            Ok(owned) => return Ok(owned),
            Err(again) if Instant::now() >= deadline => return Err(again),
            Err(again) => shared = again,
        }
        actix_web::rt::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Resolves once the engine stopped for good, with why: its MPI job lost
/// a rank, or its own policy or merge panicked ([`Engine::stopped`]).
async fn stopped_for_good(state: &AppState) -> String {
    loop {
        if let Some(why) = state.stopped() {
            return why;
        }
        actix_web::rt::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How long, at most, a server whose job lost a rank waits for its
/// handlers to write their requests' errors.
const LOST_FLUSH: Duration = Duration::from_millis(500);
/// How long it then keeps answering 503 before it exits.
const LOST_LINGER: Duration = Duration::from_millis(250);

/// The engine stopped for good (its job lost a rank, or its policy or
/// merge panicked): it has ended every request with an error
/// (the handlers write them out: an error event on a stream, a 500 with
/// the error otherwise) and `/health` answers 503. Wait for the handlers,
/// briefly, then stop and report the loss, so the process exits non-zero.
/// Both waits together stay under `mpirun`'s second between its SIGTERM
/// and its SIGKILL.
async fn end_lost_job(
    state: &AppState,
    handle: actix_web::dev::ServerHandle,
    server_task: actix_web::rt::task::JoinHandle<std::io::Result<()>>,
    why: String,
) -> Result<(), ServeError> {
    let waiting = state.inflight.load(Ordering::SeqCst);
    eprintln!("parallm: {why}; ending {waiting} request(s) with an error and exiting");
    // The embedding models' requests end with the same error.
    for s in state.embedders.get().into_iter().flatten() {
        s.embedder.stop_now(why.clone());
    }
    let deadline = Instant::now() + LOST_FLUSH;
    while state.inflight.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        actix_web::rt::time::sleep(Duration::from_millis(10)).await;
    }
    actix_web::rt::time::sleep(LOST_LINGER).await;
    handle.stop(false).await;
    let _ = server_task.await;
    Err(ServeError::Stopped(why))
}

/// How long the HTTP workers wait at shutdown for finished responses to be
/// written out before closing their connections.
pub const FLUSH_TIMEOUT_SECS: u64 = 5;

/// Under mpirun: ends the job at once, as the launcher is ending it (it
/// sent SIGTERM), and waits for the engine to end every request; returns
/// why, for [`end_lost_job`].
async fn end_job_now(state: &AppState) -> String {
    if let Some(cluster) = &state.settings.engine.cluster {
        cluster.transport.mailbox().fail(
            "the launcher ended the job (SIGTERM to rank 0, as mpirun does when a rank dies)",
        );
    }
    stopped_for_good(state).await
}

/// A signal that stops the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StopSignal {
    /// SIGTERM or Ctrl-C: a drain, except under mpirun, which sends it to
    /// end the job at once (see [`run`]).
    Terminate,
    /// SIGUSR1: a drain, under mpirun too (which forwards it to every rank).
    Drain,
}

/// Every stopping signal, in the order they come; the sender lives as long
/// as the server, so the receiver never reports a closed channel while it
/// serves. A signal whose handler cannot be installed is never reported.
fn stop_signals() -> tokio::sync::mpsc::UnboundedReceiver<StopSignal> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    // Installed now, not when the task first runs: until then SIGUSR1's
    // default action would end the process.
    #[cfg(unix)]
    let (mut term, mut usr1) = {
        use actix_web::rt::signal::unix::{signal, SignalKind};
        (
            signal(SignalKind::terminate()).ok(),
            signal(SignalKind::user_defined1()).ok(),
        )
    };
    actix_web::rt::spawn(async move {
        #[cfg(unix)]
        {
            loop {
                let got = tokio::select! {
                    Some(()) = async { term.as_mut()?.recv().await } => StopSignal::Terminate,
                    Some(()) = async { usr1.as_mut()?.recv().await } => StopSignal::Drain,
                    Ok(()) = actix_web::rt::signal::ctrl_c() => StopSignal::Terminate,
                    else => std::future::pending().await,
                };
                if tx.send(got).is_err() {
                    return;
                }
            }
        }
        #[cfg(not(unix))]
        loop {
            if actix_web::rt::signal::ctrl_c().await.is_ok()
                && tx.send(StopSignal::Terminate).is_err()
            {
                return;
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_keys_are_exact_and_the_scheme_is_case_insensitive() {
        let keys = vec!["secret".to_string(), "other key".to_string()];
        let ok = |h: &str| check_bearer(Some(h), &keys).is_ok();
        assert!(ok("Bearer secret"));
        assert!(ok("bearer secret"));
        assert!(ok("BEARER secret"));
        assert!(ok("Bearer other key"));
        for bad in [
            "Bearer  secret",
            "Bearer secret ",
            "Bearer  secret ",
            "Bearer secre",
            "Bearer secretx",
            "Bearer ",
            "Basic secret",
            "Bearersecret",
            "",
        ] {
            assert!(!ok(bad), "{bad:?} was accepted");
        }
        assert!(check_bearer(None, &keys).is_err());
    }
}
