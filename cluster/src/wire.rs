//! The wire format of control messages between ranks: what rank 0 sends a
//! remote node's rank (a step to run, a restart, the end of the job) and
//! what comes back (a step's outcome).
//!
//! A message is a preamble — the bytes `PL`, then the format's
//! [`VERSION`] as a little-endian `u16` — followed by the [`Message`] in
//! postcard's encoding (serde; a compact, documented and stable format).
//! A peer of another version is refused by [`decode`], naming both
//! versions, rather than misread: every rank of a job must run the same
//! build. Bulk data — hidden rows between stages, collective buffers,
//! drafts — does not go through here: it travels as raw little-endian
//! values on its link's own stream ([`stream`]).

use framework::batching::StepPlan;
use framework::model::Logits;
use serde::{Deserialize, Serialize};

/// The version of this format; bumped whenever [`Message`] changes.
pub const VERSION: u16 = 4;
const MAGIC: [u8; 2] = *b"PL";

/// A control message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Message {
    /// Rank 0 to a node's rank: run one step on that node.
    RunStep(RunStep),
    /// A node's rank to rank 0: how the step went.
    StepDone(StepDone),
    /// Rank 0 to a node's rank: rebuild the node (after a failure of its
    /// replica), dropping its KV cache.
    Restart {
        /// The node's replica.
        replica: u32,
        /// The node's index in its replica.
        index: u32,
    },
    /// Rank 0 to every rank: the job ends; stop the node loop.
    Shutdown,
    /// A node's rank to rank 0, once, at the start: the node's worker is
    /// built (or why it could not be); rank 0 takes requests only when
    /// every node of the job has said so.
    Loaded {
        /// The node's replica.
        replica: u32,
        /// The node's index in its replica.
        index: u32,
        /// Why the node could not load, if it could not.
        error: Option<String>,
    },
    /// A rank other than 0 to rank 0, once, before it builds its nodes:
    /// the settings every rank of the job must agree on (its model's
    /// contents, the layout and placement, what sizes a node's buffers), by
    /// name, or why this rank cannot serve its nodes at all.
    Hello {
        /// The settings, or why there are none.
        settings: Result<Vec<(String, String)>, String>,
    },
    /// Rank 0 to every other rank, in answer to the hellos: build the
    /// nodes (`None`), or why the job cannot start.
    Welcome {
        /// Why the job cannot start, if it cannot.
        refused: Option<String>,
    },
}

/// One node's part of a step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunStep {
    /// The node's replica.
    pub replica: u32,
    /// The node's index in its replica.
    pub index: u32,
    /// The step's id in the job (the kit's, unique): its links' streams
    /// derive from it ([`stream`]).
    pub step: u64,
    /// The plan every node of the replica runs.
    pub plan: StepPlan,
}

/// A node's outcome of a step.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepDone {
    /// The node's replica.
    pub replica: u32,
    /// The node's index in its replica.
    pub index: u32,
    /// The step (`StepPlan::id`).
    pub step: u64,
    /// What the last stage's rank 0 hands back for rank 0 to choose the
    /// tokens with the requests' samplers; empty for every other node.
    pub outcome: Result<Hosted, Failure>,
}

/// What a node in another process hands back from a step: empty, except
/// from the last stage's rank 0.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Hosted {
    /// The logits, per micro-batch: its first item and its rows.
    pub logits: Vec<(u32, Logits)>,
    /// The draft model's drafts the step verified, per item (empty for
    /// items whose drafts are not the model's; no items at all in a step
    /// without such drafts).
    pub drafts: Vec<Vec<u32>>,
}

/// Why a node's step failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Failure {
    /// A peer failed, and the step was aborted.
    Aborted(String),
    /// The node itself failed.
    Failed(String),
}

/// A message that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Too short for the preamble, or not this format.
    #[error("not a parallm message ({0} bytes, without the PL preamble)")]
    NotOurs(usize),
    /// Another version of the format: the ranks run different builds.
    #[error("a message of wire version {theirs}; this build speaks version {VERSION} (every rank must run the same build)")]
    Version {
        /// The sender's version.
        theirs: u16,
    },
    /// The body does not decode.
    #[error("a malformed message: {0}")]
    Malformed(String),
}

/// `message` as bytes: the preamble, then its postcard encoding.
pub fn encode(message: &Message) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    // Encoding into a Vec fails only if serde's data model cannot express
    // a value, and every type here is plain data.
    match postcard::to_extend(message, out) {
        Ok(v) => v,
        Err(e) => unreachable!("a plain-data message did not encode: {e}"),
    }
}

/// The message in `bytes`.
pub fn decode(bytes: &[u8]) -> Result<Message, WireError> {
    if bytes.len() < 4 || bytes[..2] != MAGIC {
        return Err(WireError::NotOurs(bytes.len()));
    }
    let theirs = u16::from_le_bytes([bytes[2], bytes[3]]);
    if theirs != VERSION {
        return Err(WireError::Version { theirs });
    }
    postcard::from_bytes(&bytes[4..]).map_err(|e| WireError::Malformed(e.to_string()))
}

/// What a stream carries within a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// Control messages of the job (steps, outcomes).
    Control,
    /// The tensor-parallel group of a stage.
    Collective {
        /// The stage.
        stage: u16,
    },
    /// Hidden rows from a stage to the next (all tensor ranks).
    Pipeline {
        /// The sending stage.
        stage: u16,
    },
    /// The draft node's drafts to the target's nodes.
    Drafts,
    /// Nothing travels on it: aborting it aborts the step on every rank
    /// that hosts a node of the replica, for the links within a process
    /// (rank 0 refusing a node's part of a step, planned before that node
    /// was rebuilt, tells its rank this way).
    Step,
}

/// The stream of `link` in step `step` of `replica`: unique in the job,
/// the same on every rank. Bits: replica (12), step (36), link (16).
pub fn stream(replica: usize, step: u64, link: Link) -> u64 {
    let link: u64 = match link {
        Link::Control => return 0,
        Link::Drafts => 1,
        Link::Step => 2,
        Link::Collective { stage } => 0x1000 | u64::from(stage),
        Link::Pipeline { stage } => 0x2000 | u64::from(stage),
    };
    ((replica as u64 & 0xfff) << 52) | ((step & 0xf_ffff_ffff) << 16) | link
}

#[cfg(test)]
mod tests {
    use super::*;
    use framework::batching::StepItem;

    fn plan() -> StepPlan {
        StepPlan {
            id: 41,
            items: vec![
                StepItem {
                    group: 7,
                    seq: 3,
                    tokens: vec![1, 2, 3, 49_151],
                    start: 12,
                    table: vec![0, 5, 9],
                    logits: true,
                    drafts: 2,
                    model_drafts: true,
                    draft_prev: Some(77),
                    scored: 0..0,
                },
                StepItem {
                    group: 8,
                    seq: 4,
                    tokens: vec![42],
                    start: 0,
                    table: vec![1],
                    logits: false,
                    drafts: 0,
                    model_drafts: false,
                    draft_prev: None,
                    scored: 2..5,
                },
            ],
            copies: vec![(3, 4)],
            micro_batches: vec![0..1, 1..2],
        }
    }

    #[test]
    fn every_message_round_trips() {
        let logits = Logits {
            vocab: 3,
            data: vec![0.5, -1.0, f32::MIN_POSITIVE, 2.0, 0.0, -0.0],
            item_rows: vec![0..1, 1..2],
        };
        for m in [
            Message::RunStep(RunStep {
                replica: 1,
                index: 2,
                step: 3,
                plan: plan(),
            }),
            Message::StepDone(StepDone {
                replica: 1,
                index: 2,
                step: 41,
                outcome: Ok(Hosted {
                    logits: vec![(0, logits)],
                    drafts: vec![vec![], vec![5, 6]],
                }),
            }),
            Message::StepDone(StepDone {
                replica: 0,
                index: 0,
                step: 9,
                outcome: Err(Failure::Aborted("a peer failed".into())),
            }),
            Message::Restart {
                replica: 0,
                index: 1,
            },
            Message::Shutdown,
            Message::Loaded {
                replica: 1,
                index: 0,
                error: Some("no such file".into()),
            },
            Message::Hello {
                settings: Ok(vec![("weights".into(), "F32".into())]),
            },
            Message::Hello {
                settings: Err("no such file".into()),
            },
            Message::Welcome { refused: None },
            Message::Welcome {
                refused: Some("rank 1 runs another model".into()),
            },
        ] {
            let bytes = encode(&m);
            let back = decode(&bytes).expect("decodes");
            // Compare through Debug: f32 payloads with -0.0 compare equal
            // as values, so check the bits too.
            assert_eq!(format!("{back:?}"), format!("{m:?}"));
        }
    }

    #[test]
    fn other_versions_and_garbage_are_refused() {
        let mut bytes = encode(&Message::Shutdown);
        bytes[2] = 9;
        let e = decode(&bytes).unwrap_err();
        assert_eq!(e, WireError::Version { theirs: 9 }, "{e}");
        assert!(e.to_string().contains("same build"), "{e}");
        assert!(matches!(decode(b"PL"), Err(WireError::NotOurs(2))));
        assert!(matches!(decode(b"XY\x01\x00"), Err(WireError::NotOurs(4))));
        let mut cut = encode(&Message::RunStep(RunStep {
            replica: 0,
            index: 0,
            step: 0,
            plan: plan(),
        }));
        cut.truncate(cut.len() - 3);
        assert!(matches!(decode(&cut), Err(WireError::Malformed(_))));
    }

    #[test]
    fn streams_differ_per_replica_step_and_link() {
        let mut seen = std::collections::HashSet::new();
        for replica in 0..3 {
            for step in [0u64, 1, 1 << 30] {
                for link in [
                    Link::Drafts,
                    Link::Step,
                    Link::Collective { stage: 0 },
                    Link::Collective { stage: 1 },
                    Link::Pipeline { stage: 0 },
                ] {
                    assert!(seen.insert(stream(replica, step, link)));
                }
            }
        }
        assert!(!seen.contains(&stream(0, 0, Link::Control)));
    }
}
