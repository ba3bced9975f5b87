//! Training: configuration, data preparation, the optimizer and its schedule, the training
//! loop with checkpoints, and the outputs it writes (PEFT adapter, merged model, loss plot).

pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod merge;
pub mod optim;
pub mod plan;
mod run;
pub mod trainer;

pub use run::{run, Outcome, RunOptions};
