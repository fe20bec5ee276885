//! Helpers shared by the engine's integration tests.

use actors::llm::{Engine, Event, Request};

/// The tokens of a request's one terminal event, which must be `Finished`.
pub fn finished_tokens(events: Vec<Event>) -> Vec<u32> {
    let terminal: Vec<_> = events.iter().filter(|e| e.is_terminal()).collect();
    assert_eq!(terminal.len(), 1, "exactly one terminal event: {events:?}");
    match events.last() {
        Some(Event::Finished { tokens, .. }) => tokens.clone(),
        other => panic!("expected Finished, got {other:?}"),
    }
}

/// Every prompt submitted at once for `n` greedy tokens; each one's tokens,
/// in order.
pub fn run_all(e: &Engine, prompts: Vec<Vec<u32>>, n: usize) -> Vec<Vec<u32>> {
    let streams: Vec<_> = prompts
        .into_iter()
        .map(|p| e.generate(Request::greedy_tokens(p, n)).unwrap())
        .collect();
    streams
        .into_iter()
        .map(|s| finished_tokens(s.collect_blocking()))
        .collect()
}

/// The engine's figures once it is idle (requesters hear their last event a
/// moment before the scheduler applies the step's verdict), or after 30 s.
pub fn idle_stats(e: &Engine) -> actors::llm::EngineStats {
    let t0 = std::time::Instant::now();
    loop {
        let s = e.stats();
        if s.scheduler.idle || t0.elapsed() > std::time::Duration::from_secs(30) {
            return s;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}
