//! The reference model against `shared/golden/smollm2-135m-q4_1.json`: its
//! README's tolerances, against the `exact` reference with f32 weights and
//! against the `llamacpp` reference with the default (quantized) weights.

mod common;

use common::{golden, ids, model, tokenizer, top_k};
use parallm::framework::collective::SingleCollective;
use parallm::framework::generate::generate;
use parallm::framework::{BatchItem, LogitsWanted, SamplingParams, WeightFormat};

fn all_logits(format: WeightFormat, prompt: &[u32]) -> parallm::framework::Logits {
    let m = model(format);
    let mut cache = m.new_cache();
    m.forward(
        &mut [BatchItem {
            tokens: prompt,
            cache: &mut cache,
            logits: LogitsWanted::All,
        }],
        &SingleCollective,
    )
    .expect("forward")
}

fn greedy(format: WeightFormat, prompt: &[u32], n: usize) -> Vec<u32> {
    let params = SamplingParams {
        ignore_eos: false,
        ..SamplingParams::greedy(n)
    };
    generate(model(format), tokenizer(), prompt, &params, |_| {})
        .expect("generate")
        .tokens
}

#[test]
fn tokenization_matches_llama_cpp() {
    for case in golden()["cases"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        assert_eq!(
            tokenizer().encode(prompt).unwrap(),
            ids(&case["prompt_tokens"]),
            "prompt {prompt:?}"
        );
    }
}

#[test]
fn top1_matches_both_references_in_every_format() {
    for format in [
        WeightFormat::F32,
        WeightFormat::Auto,
        WeightFormat::Native,
        WeightFormat::Q8_0,
    ] {
        for case in golden()["cases"].as_array().unwrap() {
            let prompt = ids(&case["prompt_tokens"]);
            let logits = all_logits(format, &prompt);
            let top = top_k(logits.row(prompt.len() - 1), 1)[0] as u64;
            for reference in ["llamacpp", "exact"] {
                let key = if reference == "exact" {
                    "last_logits_top20"
                } else {
                    "last_logits_top10"
                };
                let want = case[reference][key][0][0].as_u64().unwrap();
                assert_eq!(top, want, "{format} vs {reference} on {:?}", case["prompt"]);
            }
        }
    }
}

#[test]
fn f32_weights_meet_the_exact_tolerances() {
    for case in golden()["cases"].as_array().unwrap() {
        let prompt = ids(&case["prompt_tokens"]);
        let exact = &case["exact"];
        let logits = all_logits(WeightFormat::F32, &prompt);
        let last = logits.row(prompt.len() - 1);
        for pair in exact["last_logits_top20"].as_array().unwrap() {
            let (t, want) = (
                pair[0].as_u64().unwrap() as usize,
                pair[1].as_f64().unwrap() as f32,
            );
            assert!(
                (last[t] - want).abs() <= 0.05,
                "token {t}: {} vs {want} on {:?}",
                last[t],
                case["prompt"]
            );
        }
        let argmax: Vec<u32> = (0..prompt.len())
            .map(|r| top_k(logits.row(r), 1)[0] as u32)
            .collect();
        assert_eq!(
            argmax,
            ids(&exact["per_position_argmax"]),
            "per-position argmax on {:?}",
            case["prompt"]
        );
        let want = ids(&exact["greedy_tokens"]);
        let got = greedy(WeightFormat::F32, &prompt, want.len());
        assert_eq!(got[..8], want[..8], "greedy prefix on {:?}", case["prompt"]);
    }
}

#[test]
fn default_weights_meet_the_llama_cpp_tolerances() {
    for case in golden()["cases"].as_array().unwrap() {
        let prompt = ids(&case["prompt_tokens"]);
        let reference = &case["llamacpp"];
        let logits = all_logits(WeightFormat::Auto, &prompt);
        let last = logits.row(prompt.len() - 1);
        for pair in reference["last_logits_top10"].as_array().unwrap() {
            let (t, want) = (
                pair[0].as_u64().unwrap() as usize,
                pair[1].as_f64().unwrap() as f32,
            );
            // Both round activations to 8-bit blocks, independently: on these
            // prompts each lands within 0.5 of the exact logits (llama.cpp
            // within 0.36, parallm within 0.50), so they may differ by up to
            // the sum; 0.75 leaves that room and catches real errors.
            assert!(
                (last[t] - want).abs() <= 0.75,
                "token {t}: {} vs {want} on {:?}",
                last[t],
                case["prompt"]
            );
        }
        // And as close to the exact logits as llama.cpp's own error allows.
        for pair in case["exact"]["last_logits_top20"].as_array().unwrap() {
            let (t, want) = (
                pair[0].as_u64().unwrap() as usize,
                pair[1].as_f64().unwrap() as f32,
            );
            assert!(
                (last[t] - want).abs() <= 0.6,
                "token {t}: {} vs exact {want} on {:?}",
                last[t],
                case["prompt"]
            );
        }
        let want_argmax = ids(&reference["per_position_argmax"]);
        let same = (0..prompt.len())
            .filter(|&r| top_k(logits.row(r), 1)[0] as u32 == want_argmax[r])
            .count();
        let exact_argmax = ids(&case["exact"]["per_position_argmax"]);
        let ours_exact = (0..prompt.len())
            .filter(|&r| top_k(logits.row(r), 1)[0] as u32 == exact_argmax[r])
            .count();
        let theirs_exact = (0..prompt.len())
            .filter(|&r| want_argmax[r] == exact_argmax[r])
            .count();
        // Mid-prompt argmaxes include near-ties that any rounding flips:
        // llama.cpp itself matches the exact reference at only 25 of 30
        // positions of the café prompt. So: parallm must match the exact
        // reference about as often as llama.cpp does (one position of
        // slack), and llama.cpp at three positions in four.
        assert!(
            ours_exact + 1 >= theirs_exact,
            "argmax matches the exact reference at {ours_exact}/{} positions, llama.cpp at {theirs_exact}, on {:?}",
            prompt.len(),
            case["prompt"]
        );
        assert!(
            same * 4 >= prompt.len() * 3,
            "argmax agrees with llama.cpp at {same}/{} positions on {:?}",
            prompt.len(),
            case["prompt"]
        );
        let want = ids(&reference["greedy_tokens"]);
        let got = greedy(WeightFormat::Auto, &prompt, 4);
        assert_eq!(got[..], want[..4], "greedy prefix on {:?}", case["prompt"]);
    }
}
