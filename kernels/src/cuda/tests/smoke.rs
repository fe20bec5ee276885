use super::*;
use crate::cuda::ops;

#[test]
fn add_f32_adds_across_blocks() {
    let Some(dev) = emu() else { return };
    let n = 5000;
    let a: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let b: Vec<f32> = (0..n).map(|i| 0.5 * i as f32).collect();
    let (da, db) = (buf(&dev, &a), buf(&dev, &b));
    // SAFETY: both buffers hold n f32.
    unsafe { ops::add_f32(&*dev, da.ptr(), db.ptr(), n) }.unwrap();
    let got: Vec<f32> = da.read(n).unwrap();
    for (i, g) in got.iter().enumerate() {
        assert_eq!(*g, 1.5 * i as f32, "at {i}");
    }
}

/// Launches the emulation's own barrier self-test over one block of 64.
fn selftest(dev: &Arc<dyn Device>, waiters: u32, out: &DevBuf) -> crate::cuda::Result<()> {
    // SAFETY: the self-test takes (u32, u32*) and writes 64 u32.
    unsafe {
        ops::launch(
            &**dev,
            crate::cuda::emu::SELFTEST_DEADLOCK,
            crate::cuda::LaunchCfg::linear(1, 64),
            &[ops::Arg::U32(waiters), ops::Arg::Ptr(out.ptr())],
        )
    }
}

#[test]
fn emulation_reports_a_deadlock_and_recovers() {
    let Some(dev) = emu() else { return };
    let out = buf(&dev, &[0u32; 64]);
    // Every thread at every barrier: runs through.
    selftest(&dev, 64, &out).unwrap();
    assert_eq!(out.read::<u32>(64).unwrap(), (0..64).collect::<Vec<u32>>());
    // Five threads wait at barriers the others never reach: an error that
    // says so, not a hang.
    let err = selftest(&dev, 5, &out).unwrap_err().to_string();
    assert!(err.contains("deadlock"), "{err}");
    // The next launch starts clean.
    let out = buf(&dev, &[0u32; 64]);
    selftest(&dev, 64, &out).unwrap();
    assert_eq!(out.read::<u32>(64).unwrap(), (0..64).collect::<Vec<u32>>());
}
