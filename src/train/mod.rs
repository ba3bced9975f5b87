//! Training: data preparation, the optimizer and its schedule, the training loop, and the
//! PEFT adapter it writes.

pub mod adapter;
pub mod bench;
pub mod data;
pub mod optim;
