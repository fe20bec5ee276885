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
