//! Training: the learning-rate schedule and the optimizer step over a `Backend`.

pub mod optim;
