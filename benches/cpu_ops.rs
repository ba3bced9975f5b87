//! Criterion benchmarks of the CPU backend's hot ops (being written).
fn main() {}
