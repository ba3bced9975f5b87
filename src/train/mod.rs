//! Training: the optimizer schedule and the training step over a `Backend`.
