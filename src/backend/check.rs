//! The buffer-size checks of every backend op, one rule for all backends, so a call is accepted
//! or refused the same way on the CPU and on a GPU.
//!
//! - [`check_len`]: the buffer has exactly the elements the op's shape arguments give it. Used for
//!   every operand and result whose size the caller chooses through those arguments (`[n, d]`
//!   activations, weights, per-row statistics): a longer buffer means the shape and the buffer
//!   disagree, which is a bug on the caller's side, not something to ignore.
//! - [`check_min`]: the op uses a region that must fit inside a larger buffer. Used only where the
//!   buffer is legitimately bigger than what one call touches: the flat LoRA parameter and
//!   gradient buffers (a slot is one region of them), the rotary table (positions up to the
//!   model's maximum), the loss accumulator, and the source and destination of an offset copy.
//!
//! Both panic: a size mismatch is a programming error, like an out-of-bounds index.

/// Panics unless `got == want`: `what`, an argument of `op`, must have exactly `want` elements.
#[track_caller]
pub(crate) fn check_len(op: &str, what: &str, got: usize, want: usize) {
    assert!(
        got == want,
        "{op}: {what} has {got} elements, expected {want}"
    );
}

/// Panics unless `got >= want`: the `want` elements `op` uses must lie inside `what`.
#[track_caller]
pub(crate) fn check_min(op: &str, what: &str, got: usize, want: usize) {
    assert!(
        got >= want,
        "{op}: {what} has {got} elements, needs at least {want}"
    );
}
