//! Malformed model files are refused at open with an error that names the
//! file, the tensor and the fault: never a panic, an abort or an allocation
//! sized by the file's claims.

#[path = "support/gguf.rs"]
mod gguf;

use framework::gguf::GgufFile;
use gguf::{Meta, Tensor};

const F32: u32 = 0;
const Q4_0: u32 = 2;

fn open(meta: &[(&str, Meta)], tensors: &[Tensor], data: usize) -> Result<GgufFile, String> {
    GgufFile::from_bytes("case.gguf", gguf::gguf(meta, tensors, data)).map_err(|e| e.to_string())
}

fn refused(meta: &[(&str, Meta)], tensors: &[Tensor], data: usize, want: &[&str]) {
    let err = open(meta, tensors, data).expect_err("a malformed file was accepted");
    assert!(err.contains("case.gguf"), "{err}");
    for w in want {
        assert!(err.contains(w), "{err:?} does not say {w:?}");
    }
}

#[test]
fn a_well_formed_table_opens() {
    let t = [
        Tensor::new("a", &[8], F32, 0),
        Tensor::new("b", &[32], Q4_0, 32),
        Tensor::new("c", &[8], F32, 64),
    ];
    let file = open(&[], &t, 96).expect("valid");
    assert!(file.has_tensor("b"));
}

#[test]
fn overlapping_tensors_are_refused() {
    let t = [
        Tensor::new("a", &[16], F32, 0),
        Tensor::new("b", &[8], F32, 32),
    ];
    refused(&[], &t, 96, &["tensor 'a'", "overlaps tensor 'b'"]);
    let same = [
        Tensor::new("a", &[8], F32, 0),
        Tensor::new("b", &[8], F32, 0),
    ];
    refused(&[], &same, 64, &["overlaps"]);
}

#[test]
fn misaligned_tensors_are_refused() {
    let t = [Tensor::new("a", &[8], F32, 4)];
    refused(&[], &t, 64, &["tensor 'a'", "offset 4", "alignment 32"]);
    let aligned_64 = [("general.alignment", Meta::U32(64))];
    let t = [
        Tensor::new("a", &[8], F32, 0),
        Tensor::new("b", &[8], F32, 32),
    ];
    refused(&aligned_64, &t, 128, &["offset 32", "alignment 64"]);
}

#[test]
fn a_type_that_disagrees_with_the_data_size_is_refused() {
    // Written as 64 bytes of f32, declared as 18 bytes of Q4_0.
    let t = [
        Tensor::new("a", &[32], Q4_0, 0),
        Tensor::new("b", &[8], F32, 64),
    ];
    refused(&[], &t, 96, &["tensor 'a'", "Q4_0 disagrees"]);
    // Declared f32 where only a Q4_0's bytes were written.
    let t = [Tensor::new("a", &[1024], F32, 0)];
    refused(&[], &t, 576, &["tensor 'a'", "truncated"]);
    // Not a whole number of blocks.
    let t = [Tensor::new("a", &[33], Q4_0, 0)];
    refused(&[], &t, 64, &["not a whole number of Q4_0 blocks"]);
}

#[test]
fn bad_alignments_repeats_zero_and_huge_dimensions_are_refused() {
    let t = [Tensor::new("a", &[8], F32, 0)];
    refused(
        &[("general.alignment", Meta::U32(0))],
        &t,
        32,
        &["alignment"],
    );
    refused(
        &[("general.alignment", Meta::U32(24))],
        &t,
        32,
        &["general.alignment", "power of two"],
    );
    let twice = [
        Tensor::new("a", &[8], F32, 0),
        Tensor::new("a", &[8], F32, 32),
    ];
    refused(&[], &twice, 64, &["repeated"]);
    refused(
        &[],
        &[Tensor::new("a", &[8, 0], F32, 0)],
        32,
        &["zero dimension"],
    );
    let huge = [Tensor::new("a", &[1 << 40, 1 << 40], F32, 0)];
    refused(&[], &huge, 32, &["tensor 'a'", "overflows"]);
    let big = [Tensor::new("a", &[1 << 30, 1 << 20], F32, 0)];
    refused(&[], &big, 32, &["tensor 'a'", "truncated"]);
}

#[test]
fn a_tensor_type_this_build_cannot_read_is_named() {
    for (id, name) in [(23, "IQ4_XS"), (20, "IQ4_NL"), (99, "not a GGML type")] {
        let t = [Tensor::new("a", &[256], id, 0)];
        refused(
            &[],
            &t,
            256,
            &[
                "unsupported tensor type",
                &format!("'{id} ({name})'"),
                "Q6_K",
            ],
        );
    }
}
