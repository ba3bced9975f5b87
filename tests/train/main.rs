//! Training: `caft-fast train` end to end (`cli`) and through the library (`library`: the
//! adapter against PEFT, ablation during training, the merged model, chat labels), and the
//! summary of the training-step comparison with PyTorch (`bench_scripts`). One test binary for
//! the area (tests/support/mod.rs says why).

#[path = "../support/mod.rs"]
mod support;

mod bench_scripts;
mod cli;
mod full;
mod library;
mod plan;
