//! Small shared helpers: seeded random numbers, atomic file writes.

pub mod rng;
