//! A two-stage document pipeline on parallm's kit, the full trait path, where
//! nodes do different work: the kit alone, no model.
//!
//! A task is "which chunks of this document best match this query?":
//!
//! * stage 1, nodes 0 and 1: each takes half of the document's chunks,
//!   tokenizes them (lowercase words) and embeds each one (a hashed
//!   bag-of-words vector, unit length), and sends the embeddings to stage 2
//!   through the step's channel;
//! * stage 2, node 2: embeds the query, receives every chunk's embedding and
//!   scores it (cosine similarity), and returns the best three;
//! * the merge answers the requester with node 2's ranking.
//!
//! [`DocPolicy`] cuts every task into one [`Plan`] with a different
//! [`DocWork`] for each node and fresh channels as the step's links; two
//! documents are in flight at once, so stage 2 scores one while stage 1 embeds
//! the next. The program ranks every document serially too and exits with
//! status 1 unless both rankings are identical.
//!
//! Run: `cargo run --release --example doc_pipeline`

use std::collections::{HashMap, VecDeque};
use std::process::exit;
use std::sync::Arc;
use std::time::Duration;

use parallm::kit::{
    End, Merge, NodeError, NodeId, NodeTask, NodeWorker, Pipeline, PipelineConfig, Plan, Policy,
    StepId, Task, TaskId,
};
use std::sync::mpsc::{channel, Receiver, Sender};

/// Embedding width.
const DIM: usize = 64;
/// Chunks returned per document.
const TOP: usize = 3;

/// Words of a chunk, lowercased, without punctuation.
fn tokenize(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// A hashed bag of words (FNV-1a into `DIM` buckets), scaled to unit length.
fn embed(text: &str) -> Vec<f32> {
    let mut v = vec![0f32; DIM];
    for w in tokenize(text) {
        let h = w.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
        });
        v[(h % DIM as u64) as usize] += 1.0;
    }
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= norm);
    v
}

/// The best `TOP` chunks `(index, score)`, best first (ties: lower index).
fn rank(query: &[f32], chunks: impl Iterator<Item = (usize, Vec<f32>)>) -> Vec<(usize, f32)> {
    let mut scored: Vec<(usize, f32)> = chunks
        .map(|(i, e)| (i, e.iter().zip(query).map(|(a, b)| a * b).sum()))
        .collect();
    scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    scored.truncate(TOP);
    scored
}

/// A document and a query: what users submit.
struct Doc {
    id: TaskId,
    chunks: Arc<Vec<String>>,
    query: String,
}

impl Task for Doc {
    fn id(&self) -> TaskId {
        self.id
    }
}

/// One node's work in a step.
enum DocWork {
    /// Stage 1: embed these chunks `(index, text)`.
    Embed(Vec<(usize, String)>),
    /// Stage 2: embed the query and score `chunks` embeddings.
    Score { query: String, chunks: usize },
}

/// One node's links in a step: stage 1 sends, stage 2 receives.
enum DocLinks {
    To(Sender<(usize, Vec<f32>)>),
    From(Receiver<(usize, Vec<f32>)>),
}

/// One step per document, two in flight; three nodes, two stages.
#[derive(Default)]
struct DocPolicy {
    waiting: VecDeque<Doc>,
    running: HashMap<StepId, Doc>,
}

impl Policy for DocPolicy {
    type Task = Doc;
    type Work = DocWork;
    type Links = DocLinks;
    type Step = TaskId;
    type Verdict = ();
    type Stats = usize;

    fn replicas(&self) -> usize {
        1
    }
    fn room(&self) -> usize {
        4usize.saturating_sub(self.waiting.len() + self.running.len())
    }
    fn load(&self, _: usize) -> usize {
        self.waiting.len() + self.running.len()
    }
    fn admit(&mut self, _: usize, doc: Doc) {
        self.waiting.push_back(doc);
    }
    fn next_step(&mut self, _: usize, step: StepId) -> Option<Plan<TaskId, DocWork, DocLinks>> {
        let doc = self.waiting.pop_front()?;
        let (tx, rx) = channel();
        let half = doc.chunks.len().div_ceil(2);
        let part = |range: std::ops::Range<usize>| {
            DocWork::Embed(range.map(|i| (i, doc.chunks[i].clone())).collect())
        };
        let nodes = vec![
            NodeTask {
                node: 0,
                work: part(0..half),
                links: DocLinks::To(tx.clone()),
            },
            NodeTask {
                node: 1,
                work: part(half..doc.chunks.len()),
                links: DocLinks::To(tx),
            },
            NodeTask {
                node: 2,
                work: DocWork::Score {
                    query: doc.query.clone(),
                    chunks: doc.chunks.len(),
                },
                links: DocLinks::From(rx),
            },
        ];
        let id = doc.id;
        self.running.insert(step, doc);
        Some(Plan { step: id, nodes })
    }
    fn completed(&mut self, _: usize, step: StepId, _: ()) {
        self.running.remove(&step);
    }
    fn failed(&mut self, _: usize, steps: &[StepId]) -> Vec<TaskId> {
        let again: Vec<Doc> = steps
            .iter()
            .filter_map(|s| self.running.remove(s))
            .collect();
        let ids = again.iter().map(|d| d.id).collect();
        again
            .into_iter()
            .rev()
            .for_each(|d| self.waiting.push_front(d));
        ids
    }
    fn cancel(&mut self, task: TaskId) -> bool {
        let held = self.contains(task);
        self.waiting.retain(|d| d.id != task);
        held
    }
    fn contains(&self, task: TaskId) -> bool {
        self.waiting
            .iter()
            .chain(self.running.values())
            .any(|d| d.id == task)
    }
    fn drop_task(&mut self, task: TaskId) {
        self.waiting.retain(|d| d.id != task);
        self.running.retain(|_, d| d.id != task);
    }
    fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }
    fn stats(&self) -> usize {
        self.running.len()
    }
}

/// Every node runs this worker; what it does depends on the work it gets.
struct DocNode;

impl NodeWorker for DocNode {
    type Work = DocWork;
    type Links = DocLinks;
    /// Stage 2's ranking (stage 1 returns none).
    type Output = Option<Vec<(usize, f32)>>;

    fn run(&mut self, work: &DocWork, links: &DocLinks) -> Result<Self::Output, NodeError> {
        let gone = |_| NodeError::Aborted("the other stage is gone".into());
        match (work, links) {
            (DocWork::Embed(chunks), DocLinks::To(tx)) => {
                for (i, text) in chunks {
                    tx.send((*i, embed(text))).map_err(gone)?;
                }
                Ok(None)
            }
            (DocWork::Score { query, chunks }, DocLinks::From(rx)) => {
                let got: Vec<(usize, Vec<f32>)> = (0..*chunks)
                    .map(|_| rx.recv())
                    .collect::<Result<_, _>>()
                    .map_err(|_| NodeError::Aborted("stage 1 failed".into()))?;
                Ok(Some(rank(&embed(query), got.into_iter())))
            }
            _ => Err(NodeError::Failed(
                "work and links of different stages".into(),
            )),
        }
    }
    fn abort(_: &DocLinks) {}
    fn stateful() -> bool {
        false
    }
}

/// A ranking: `(chunk index, score)`, best first.
type Ranking = Vec<(usize, f32)>;

/// Answers each requester with stage 2's ranking.
#[derive(Default)]
struct DocMerge {
    replies: HashMap<TaskId, Sender<Result<Ranking, End>>>,
}

impl Merge for DocMerge {
    type Step = TaskId;
    type Output = Option<Vec<(usize, f32)>>;
    type Registration = Sender<Result<Ranking, End>>;
    type Verdict = ();

    fn register(&mut self, task: TaskId, reply: Self::Registration) {
        self.replies.insert(task, reply);
    }
    fn merge(&mut self, task: &TaskId, outputs: Vec<(usize, Self::Output)>) {
        let ranking = outputs.into_iter().find_map(|(_, r)| r).unwrap_or_default();
        if let Some(reply) = self.replies.remove(task) {
            let _ = reply.send(Ok(ranking));
        }
    }
    fn end(&mut self, task: TaskId, end: End) {
        if let Some(reply) = self.replies.remove(&task) {
            let _ = reply.send(Err(end));
        }
    }
}

const TEXT: &str = "Actors own their state and talk by messages. A queue admits tasks and \
    refuses them when full. The scheduler cuts every step into work per node. Compute nodes \
    run on their own threads. Pipeline stages hand activations to the next stage. The merger \
    assembles the results and answers the requester. Tensor parallel ranks sum their partial \
    results. Paged attention keeps keys and values in blocks. A failed node is restarted and \
    its task runs again. Metrics are recorded at every state transition.";

fn main() {
    let sentences: Vec<String> = TEXT.split(". ").map(str::to_string).collect();
    let queries = [
        "which stage hands activations",
        "how are failed nodes handled",
        "when does a queue refuse tasks",
        "keys and values in blocks",
        "threads of nodes",
    ];
    let pipeline = Pipeline::start(
        DocPolicy::default(),
        DocMerge::default(),
        Arc::new(|_: NodeId| Ok(DocNode)),
        PipelineConfig {
            nodes_per_replica: 3,
            max_steps_in_flight: 2,
            ..PipelineConfig::default()
        },
    )
    .expect("the pipeline starts");
    let chunks = Arc::new(sentences);
    let mut answers = Vec::new();
    for (id, q) in (0..).zip(queries) {
        let (tx, rx) = channel();
        let doc = Doc {
            id,
            chunks: chunks.clone(),
            query: q.to_string(),
        };
        pipeline.submit(doc, tx).expect("the queue has room");
        answers.push(rx);
    }
    let mut ok = true;
    for (rx, q) in answers.into_iter().zip(queries) {
        let got = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or(Err(End::Failed("no answer".into())));
        let want = rank(&embed(q), chunks.iter().map(|c| embed(c)).enumerate());
        let same = got.as_ref() == Ok(&want);
        ok &= same;
        let best = want.first().map(|(i, _)| chunks[*i].as_str()).unwrap_or("");
        println!(
            "{q:?}: pipeline {got:?}, serial {want:?} {}",
            if same { "ok" } else { "MISMATCH" }
        );
        println!("  best: {best:?}");
    }
    // The answers arrive a moment before the scheduler applies the last verdict.
    while !pipeline.stats().idle {
        std::thread::sleep(Duration::from_millis(1));
    }
    let steps = pipeline.stats().steps;
    if !pipeline.shutdown(Duration::from_secs(10)) || !ok {
        eprintln!("error: the pipeline's rankings differ from the serial ones");
        exit(1);
    }
    println!(
        "all {} rankings match the serial computation ({steps} steps)",
        queries.len()
    );
}
