//! A KV pool's memory is provided as its blocks are written, not all at
//! once when it is made. Alone in its test binary: it reads the resident
//! memory of the whole process, which tests running beside it would move.

#![cfg(target_os = "linux")]

use framework::kv::{KvLayer, KvPool};

/// This process's resident memory, in bytes.
fn resident() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        .expect("VmRSS in kB")
        * 1024
}

#[test]
fn a_pool_holds_memory_for_the_blocks_written_not_for_all_it_could_hold() {
    // 512 MiB of f32 keys and values in buffers of 16 MiB, made after a
    // buffer of 24 MiB was freed (which raises glibc's mmap threshold to
    // 24 MiB, so `calloc` would take them from its heap and memset them),
    // on a thread of its own, as a node's is.
    let before = resident();
    let (mut pool, grown) = std::thread::spawn(move || {
        drop(std::hint::black_box(vec![1u8; 24 << 20]));
        let pool = KvPool::new(16, 1024, 16, 256);
        (pool, resident().saturating_sub(before))
    })
    .join()
    .expect("the pool's thread");
    assert_eq!(pool.bytes(), 512 << 20);
    assert!(grown < 64 << 20, "{} MiB resident once made", grown >> 20);
    for block in 0..4u32 {
        pool.write(3, &[block], 0, &[1.0; 1024], &[2.0; 1024]);
    }
    let grown = resident().saturating_sub(before);
    assert!(
        grown < 64 << 20,
        "{} MiB resident once written",
        grown >> 20
    );
    let KvLayer::F32(k, v) = pool.layer(3) else {
        panic!("an f32 pool")
    };
    let at = pool.offset(&[2], 0);
    assert_eq!((k[at], v[at]), (1.0, 2.0));
}
