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
