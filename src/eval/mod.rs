//! `caft-fast eval`: measuring what a fine-tune learned and what it generalises to (step 4 of
//! the workflow in the README: compare base, plain fine-tune and CAFT fine-tune).
//!
//! - [`mc`]: multiple-choice accuracy from next-token logits. Each option is scored by the
//!   logit of its first token at the prompt's last position (one forward pass per prompt,
//!   whatever the number of options); accuracy per split and overall.
//! - [`loss`]: mean cross-entropy (and perplexity) on the assistant tokens of held-out chat
//!   data, through the training data pipeline, so the masked tokens are exactly training's.
//! - [`task`]: the double multiple-choice spurious-correlation task (an intended concept and a
//!   spurious attribute that agree in training and disagree in the out-of-distribution test),
//!   with probe sentences for the spurious concept alone.
//!
//! Evaluation runs the model as inference does: LoRA on when an adapter is given, no ablation
//! unless directions are given explicitly (`--ablate`).

pub mod loss;
pub mod mc;
pub mod task;
