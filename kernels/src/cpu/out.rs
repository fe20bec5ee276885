//! The output matrix shared by a kernel's parallel chunks.
//!
//! A product `y = x·Wᵀ` is split over output columns (weight rows); each
//! parallel chunk writes a disjoint column range of the same row-major `y`.
//! [`SharedOut`] holds the exclusive borrow of `y` and hands out [`OutCols`]
//! views, one per chunk; what makes that sound is the contract of
//! [`SharedOut::cols`]: views whose column ranges overlap are never alive at
//! the same time.

/// `y` (m×n row-major) shared by the parallel tasks; each task takes a
/// disjoint column range through [`SharedOut::cols`].
pub(crate) struct SharedOut<'a> {
    pub(crate) ptr: *mut f32,
    pub(crate) m: usize,
    pub(crate) n: usize,
    _y: std::marker::PhantomData<&'a mut [f32]>,
}

// SAFETY: SharedOut holds the exclusive borrow of `y` for its lifetime and only
// hands out OutCols views through the unsafe `cols`, whose contract (disjoint
// column ranges) rules out two threads writing the same element.
unsafe impl Sync for SharedOut<'_> {}

impl<'a> SharedOut<'a> {
    pub(crate) fn new(y: &'a mut [f32], m: usize, n: usize) -> Self {
        assert_eq!(y.len(), m * n);
        SharedOut {
            ptr: y.as_mut_ptr(),
            m,
            n,
            _y: std::marker::PhantomData,
        }
    }

    /// View of columns `col0..col0 + cols`.
    ///
    /// # Safety
    /// Views whose column ranges overlap must not be alive at the same time
    /// (they could be written from different threads).
    pub(crate) unsafe fn cols(&self, col0: usize, cols: usize) -> OutCols<'_> {
        assert!(col0 + cols <= self.n);
        OutCols {
            ptr: self.ptr,
            ld: self.n,
            m: self.m,
            col0,
            cols,
            _y: std::marker::PhantomData,
        }
    }
}

/// Writable view of columns `col0..col0+cols` of the m×ld row-major output.
pub(crate) struct OutCols<'a> {
    pub(crate) ptr: *mut f32,
    pub(crate) ld: usize,
    pub(crate) m: usize,
    pub(crate) col0: usize,
    pub(crate) cols: usize,
    _y: std::marker::PhantomData<&'a mut [f32]>,
}

impl<'a> OutCols<'a> {
    /// The whole of `y` (m×ld) as one view.
    pub(crate) fn new(y: &'a mut [f32], m: usize, ld: usize, col0: usize, cols: usize) -> Self {
        assert!(y.len() == m * ld && col0 + cols <= ld);
        OutCols {
            ptr: y.as_mut_ptr(),
            ld,
            m,
            col0,
            cols,
            _y: std::marker::PhantomData,
        }
    }

    /// y[i][col0 + j .. col0 + j + v.len()] = v
    #[inline(always)]
    pub(crate) fn write(&mut self, i: usize, j: usize, v: &[f32]) {
        assert!(i < self.m && j + v.len() <= self.cols);
        // SAFETY: i < m and col0 + j + len <= col0 + cols <= ld, so the range is
        // inside the m×ld buffer the view was made from; this view's column range
        // is not written by anyone else while it lives (see SharedOut::cols).
        unsafe {
            std::ptr::copy_nonoverlapping(
                v.as_ptr(),
                self.ptr.add(i * self.ld + self.col0 + j),
                v.len(),
            );
        }
    }

    /// The view of this view's columns `j..j + cols`.
    pub(crate) fn sub(&mut self, j: usize, cols: usize) -> OutCols<'_> {
        assert!(j + cols <= self.cols);
        OutCols {
            ptr: self.ptr,
            ld: self.ld,
            m: self.m,
            col0: self.col0 + j,
            cols,
            _y: std::marker::PhantomData,
        }
    }

    /// The view of this view's rows `i0..i0 + m` (as rows `0..m`).
    pub(crate) fn rows(&mut self, i0: usize, m: usize) -> OutCols<'_> {
        assert!(i0 + m <= self.m);
        OutCols {
            // Only forms the address: writes through the view stay inside
            // its m rows, which are rows i0.. of this one.
            ptr: self.ptr.wrapping_add(i0 * self.ld),
            ld: self.ld,
            m,
            col0: self.col0,
            cols: self.cols,
            _y: std::marker::PhantomData,
        }
    }

    /// `y[i + c][col0 + j] = v[c]` for every `c`.
    #[inline(always)]
    pub(crate) fn write_col(&mut self, i: usize, j: usize, v: &[f32]) {
        assert!(i + v.len() <= self.m && j < self.cols);
        for (c, &x) in v.iter().enumerate() {
            // SAFETY: i + c < m and col0 + j < col0 + cols <= ld, so the
            // element is inside the m×ld buffer the view was made from, and
            // this view's columns are written by no one else while it lives.
            unsafe { *self.ptr.add((i + c) * self.ld + self.col0 + j) = x };
        }
    }
}
