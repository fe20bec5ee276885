//! Embeddings: the random-weight BERT of `tests/support/bert_models.py`, as
//! a Hugging Face directory and as GGUF, against transformers' pooled output
//! (`tests/golden/embeddings.json`, made by `tests/support/bert_golden.py`).

mod common;

use common::{bert_models_dir, cosine, embed_golden};
use parallm::framework::collective::{Collective, SingleCollective, ThreadCollective};
use parallm::framework::encoder::{EncoderShard, EncoderTokenizer};
use parallm::framework::{GgufFile, ShardSpec, WeightFormat};

fn texts() -> Vec<(String, Vec<u32>, Vec<f64>, Vec<f64>)> {
    let f64s = |v: &serde_json::Value| -> Vec<f64> {
        v.as_array()
            .expect("array")
            .iter()
            .map(|x| x.as_f64().expect("f64"))
            .collect()
    };
    embed_golden()["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| {
            (
                c["text"].as_str().expect("text").to_string(),
                common::ids(&c["ids"]),
                f64s(&c["mean_normalized"]),
                f64s(&c["cls"]),
            )
        })
        .collect()
}

fn files() -> Vec<GgufFile> {
    let dir = bert_models_dir();
    ["bert-f32", "bert-f32.gguf"]
        .iter()
        .map(|f| GgufFile::open(dir.join(f)).expect("open"))
        .collect()
}

#[test]
fn both_files_tokenize_and_embed_as_transformers_does() {
    for file in files() {
        let tok = EncoderTokenizer::from_gguf(&file).expect("tokenizer");
        let shard =
            EncoderShard::load(&file, ShardSpec::SINGLE, WeightFormat::Native).expect("load");
        let cases = texts();
        for (text, ids, _, _) in &cases {
            assert_eq!(
                &tok.encode(text).expect("encode"),
                ids,
                "{}: {text:?}",
                file.path().display()
            );
        }
        let seqs: Vec<&[u32]> = cases.iter().map(|c| c.1.as_slice()).collect();
        let out = shard.forward(&seqs, &SingleCollective).expect("forward");
        for ((text, _, mean, _), v) in cases.iter().zip(&out) {
            let c = cosine(v, mean);
            assert!(
                1.0 - c < 1e-4,
                "{}: {text:?}: cosine {c}",
                file.path().display()
            );
            let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-5, "normalized: {norm}");
        }
    }
}

#[test]
fn two_shards_embed_as_one() {
    let file = &files()[1];
    let cases = texts();
    let seqs: Vec<&[u32]> = cases.iter().map(|c| c.1.as_slice()).collect();
    let one = EncoderShard::load(file, ShardSpec::SINGLE, WeightFormat::Native)
        .expect("load")
        .forward(&seqs, &SingleCollective)
        .expect("forward");
    let group = ThreadCollective::group(2);
    let outs: Vec<Vec<Vec<f32>>> = std::thread::scope(|s| {
        let handles: Vec<_> = group
            .into_iter()
            .enumerate()
            .map(|(rank, c)| {
                let seqs = &seqs;
                s.spawn(move || {
                    let shard = EncoderShard::load(
                        file,
                        ShardSpec::new(rank, 2).expect("spec"),
                        WeightFormat::Native,
                    )
                    .expect("load");
                    shard.forward(seqs, &c as &dyn Collective).expect("forward")
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank"))
            .collect()
    });
    for out in &outs {
        for (a, b) in out.iter().zip(&one) {
            let b64: Vec<f64> = b.iter().map(|&x| x as f64).collect();
            assert!(1.0 - cosine(a, &b64) < 1e-6);
        }
    }
}
