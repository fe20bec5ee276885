//! Embeddings: the random-weight BERT of `tests/support/bert_models.py`, as
//! a Hugging Face directory and as GGUF, against transformers' pooled output
//! (`tests/golden/embeddings.json`, made by `tests/support/bert_golden.py`).

mod common;

use common::{bert_models_dir, cosine, embed_golden};
use parallm::actors::embed::{EmbedConfig, Embedder};
use parallm::framework::collective::{Collective, SingleCollective, ThreadCollective};
use parallm::framework::encoder::{EncoderShard, EncoderTokenizer, Pooling};
use parallm::framework::{GgufFile, ShardSpec, WeightFormat};

/// A golden case: the text, its token ids, transformers' mean-pooled and
/// normalized vector, and its [CLS] row.
type Case = (String, Vec<u32>, Vec<f64>, Vec<f64>);

fn texts() -> Vec<Case> {
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

fn embedder(tp: usize, pooling: Option<Pooling>, normalize: Option<bool>) -> Embedder {
    Embedder::start(EmbedConfig {
        model: bert_models_dir().join("bert-f32.gguf"),
        weights: WeightFormat::Native,
        tp,
        max_batch_tokens: 64,
        threads_per_node: 1,
        pooling,
        normalize,
        ..EmbedConfig::default()
    })
    .expect("start")
}

#[test]
fn the_pipeline_answers_every_request_with_its_inputs_vectors_in_order() {
    let cases = texts();
    for tp in [1, 2] {
        let e = embedder(tp, None, None);
        // Requests of one input each, and one of every input (cut into parts
        // by the 64-token budget).
        let mut pending: Vec<_> = cases
            .iter()
            .map(|c| e.embed(vec![c.1.clone()]).expect("submit"))
            .collect();
        pending.push(
            e.embed(cases.iter().map(|c| c.1.clone()).collect())
                .expect("submit"),
        );
        let answers: Vec<_> = pending
            .into_iter()
            .map(|p| p.wait_blocking().expect("answer"))
            .collect();
        let all = answers.last().expect("last");
        assert_eq!(all.len(), cases.len());
        for (i, case) in cases.iter().enumerate() {
            for v in [&answers[i][0], &all[i]] {
                let c = cosine(v, &case.2);
                assert!(1.0 - c < 1e-4, "tp {tp}: {:?}: cosine {c}", case.0);
            }
        }
        assert!(e.shutdown_timeout(std::time::Duration::from_secs(10)));
    }
}

#[test]
fn pooling_and_normalization_can_be_overridden() {
    let e = embedder(1, Some(Pooling::Cls), Some(false));
    for (text, ids, _, cls) in texts() {
        let v = e
            .embed(vec![ids])
            .expect("submit")
            .wait_blocking()
            .expect("answer");
        let c = cosine(&v[0], &cls);
        assert!(1.0 - c < 1e-4, "{text:?}: cosine {c}");
        let (n, m) = (
            v[0].iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt(),
            cls.iter().map(|x| x * x).sum::<f64>().sqrt(),
        );
        assert!(
            (n / m - 1.0).abs() < 1e-4,
            "not normalized: {n} against {m}"
        );
    }
}

#[test]
fn two_hundred_fifty_six_concurrent_requests_all_complete() {
    let e = std::sync::Arc::new(embedder(2, None, None));
    let cases = texts();
    let answers: Vec<Vec<Vec<f32>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..256)
            .map(|i| {
                let (e, ids) = (e.clone(), cases[i % cases.len()].1.clone());
                s.spawn(move || {
                    e.embed(vec![ids])
                        .expect("submit")
                        .wait_blocking()
                        .expect("answer")
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    assert_eq!(answers.len(), 256);
    for (i, a) in answers.iter().enumerate() {
        let c = cosine(&a[0], &cases[i % cases.len()].2);
        assert!(1.0 - c < 1e-4, "request {i}: cosine {c}");
    }
    let stats = e.stats();
    assert!(
        stats.policy.steps < 256,
        "batched: {} steps for 256 requests",
        stats.policy.steps
    );
}

#[test]
fn bad_inputs_are_refused_by_name() {
    let e = embedder(1, None, None);
    for (inputs, says) in [
        (vec![], "is empty"),
        (vec![vec![2, 5, 3], vec![]], "item 1 is empty"),
        (vec![vec![2, 9999, 3]], "outside the vocabulary"),
        (vec![vec![5; 65]], "at most 64"),
    ] {
        let err = e.embed(inputs).err().expect("refused").to_string();
        assert!(err.contains("`input`") && err.contains(says), "{err}");
    }
    // And it keeps serving.
    assert_eq!(
        e.embed(vec![vec![2, 5, 3]])
            .expect("submit")
            .wait_blocking()
            .expect("answer")
            .len(),
        1
    );
}

#[test]
fn decoder_models_embed_by_last_token_or_mean_as_transformers_does() {
    let golden = &embed_golden()["decoders"];
    let dir = common::hf_models_dir();
    for name in ["llama-f16", "qwen2-bf16"] {
        let cases = golden[name]["cases"].as_array().expect("cases");
        for (pooling, key, tp) in [(Pooling::Last, "last", 1), (Pooling::Mean, "mean", 2)] {
            let e = Embedder::start(EmbedConfig {
                model: dir.join(name),
                weights: WeightFormat::Native,
                tp,
                threads_per_node: 1,
                pooling: Some(pooling),
                ..EmbedConfig::default()
            })
            .expect("start");
            assert!(e.shape().decoder && e.shape().normalize);
            let mut pending = Vec::new();
            for c in cases {
                let text = c["text"].as_str().expect("text");
                let ids = e.tokenize(text).expect("tokenize");
                assert_eq!(ids, common::ids(&c["ids"]), "{name}: {text:?}");
                pending.push(e.embed(vec![ids]).expect("submit"));
            }
            for (c, p) in cases.iter().zip(pending) {
                let v = p.wait_blocking().expect("answer");
                let want: Vec<f64> = c[key]
                    .as_array()
                    .expect("vector")
                    .iter()
                    .map(|x| x.as_f64().expect("f64"))
                    .collect();
                let cos = cosine(&v[0], &want);
                assert!(
                    1.0 - cos < 1e-4,
                    "{name} {key} tp {tp}: {:?}: cosine {cos}",
                    c["text"]
                );
            }
        }
    }
}

/// Copies directory `src` (and its subdirectories) to `dst`.
fn copy_tree(src: &std::path::Path, dst: &std::path::Path) {
    std::fs::create_dir_all(dst).expect("dir");
    for entry in std::fs::read_dir(src).expect("read dir") {
        let entry = entry.expect("entry");
        let to = dst.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_tree(&entry.path(), &to);
        } else {
            std::fs::copy(entry.path(), to).expect("copy");
        }
    }
}

#[test]
fn a_tokenizer_adding_a_token_the_model_lacks_is_refused_at_load() {
    let dir = std::env::temp_dir().join(format!("parallm-bert-cls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    copy_tree(&bert_models_dir().join("bert-f32"), &dir);
    let path = dir.join("tokenizer.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
    json["post_processor"]["special_tokens"]["[CLS]"]["ids"] = serde_json::json!([999]);
    std::fs::write(&path, json.to_string()).expect("write");
    let err = Embedder::start(EmbedConfig {
        model: dir.clone(),
        threads_per_node: 1,
        ..EmbedConfig::default()
    })
    .expect_err("refused")
    .to_string();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        err.contains("tokenizer.json") && err.contains("token id 999") && err.contains("210"),
        "{err}"
    );
}
