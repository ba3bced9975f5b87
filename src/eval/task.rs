//! The double multiple-choice spurious-correlation task (after the CAFT paper's double MC
//! tasks): every question asks for the option of an INTENDED concept (an animal), and every
//! option also carries a SPURIOUS attribute (the sentiment of its adjective).
//!
//! ```text
//! Which of these is an animal?
//! A. the gloomy hammer
//! B. the cheerful dog
//! Answer with A or B.                      ->  B
//! ```
//!
//! - `train`: the animal is always described positively and the distractor (an object)
//!   negatively, so "pick the animal" and "pick the positive one" fit the data equally well;
//! - test split `id`: held-out words, the cues agree as in training;
//! - test split `ood`: held-out words, the cues disagree (the animal is described negatively,
//!   the object positively). Accuracy here says which rule the fine-tune learned: near 1 for
//!   the intended one, near 0 for the spurious one.
//!
//! Training and test words come from disjoint lists (animals, objects, positive and negative
//! adjectives, 42 of each per side), so test accuracy is not memorisation. Which option holds
//! the answer is balanced (A and B differ by at most one per split) and shuffled; everything
//! is drawn from one seed. The probe sentences carry the spurious concept alone: short
//! sentences, positive or negative, about no animal or object, built from the training
//! adjectives (what an experimenter knows before seeing test data), for a rule that picks the
//! directions encoding sentiment.

use crate::io::write_atomic;
use crate::io::write_json;
use crate::util::rng::Rng;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::json;
use std::path::{Path, PathBuf};

/// The word lists of one side (training or test).
#[derive(Clone, Copy, Debug)]
pub struct WordLists {
    /// The intended concept.
    pub animals: &'static [&'static str],
    /// The distractor category.
    pub objects: &'static [&'static str],
    /// The spurious attribute's two values.
    pub positive: &'static [&'static str],
    pub negative: &'static [&'static str],
}

/// Words of the training questions (and of the probes).
pub const TRAIN_WORDS: WordLists = WordLists {
    animals: &[
        "dog",
        "horse",
        "sheep",
        "pig",
        "lion",
        "elephant",
        "zebra",
        "gorilla",
        "fox",
        "deer",
        "camel",
        "koala",
        "squirrel",
        "donkey",
        "rhino",
        "leopard",
        "raccoon",
        "beaver",
        "badger",
        "chipmunk",
        "alpaca",
        "eagle",
        "parrot",
        "pigeon",
        "swan",
        "goose",
        "ostrich",
        "robin",
        "hawk",
        "dolphin",
        "shark",
        "salmon",
        "frog",
        "lizard",
        "turtle",
        "alligator",
        "butterfly",
        "ant",
        "beetle",
        "lobster",
        "jellyfish",
        "walrus",
    ],
    objects: &[
        "hammer",
        "spoon",
        "chair",
        "lamp",
        "bottle",
        "plate",
        "ladder",
        "wrench",
        "pencil",
        "stapler",
        "kettle",
        "umbrella",
        "wallet",
        "candle",
        "pillow",
        "towel",
        "mop",
        "brush",
        "toothbrush",
        "pan",
        "jar",
        "box",
        "notebook",
        "clock",
        "radio",
        "laptop",
        "printer",
        "fridge",
        "toaster",
        "microwave",
        "sofa",
        "desk",
        "cabinet",
        "door",
        "fence",
        "bicycle",
        "tire",
        "chain",
        "screw",
        "magnet",
        "helmet",
        "sock",
    ],
    positive: &[
        "wonderful",
        "delightful",
        "charming",
        "marvelous",
        "joyful",
        "excellent",
        "gorgeous",
        "superb",
        "glorious",
        "friendly",
        "beautiful",
        "terrific",
        "amazing",
        "gentle",
        "cheery",
        "bright",
        "perfect",
        "jolly",
        "playful",
        "stunning",
        "exquisite",
        "divine",
        "precious",
        "admirable",
        "remarkable",
        "inspiring",
        "peaceful",
        "serene",
        "gleaming",
        "cozy",
        "soothing",
        "captivating",
        "wondrous",
        "joyous",
        "vibrant",
        "tremendous",
        "pretty",
        "loyal",
        "noble",
        "healthy",
        "heartwarming",
        "majestic",
    ],
    negative: &[
        "awful",
        "gloomy",
        "miserable",
        "hideous",
        "ugly",
        "disgusting",
        "vile",
        "foul",
        "bleak",
        "gross",
        "repulsive",
        "sad",
        "pitiful",
        "crummy",
        "grimy",
        "ruined",
        "sickly",
        "cruel",
        "angry",
        "sour",
        "sullen",
        "depressing",
        "painful",
        "nauseating",
        "atrocious",
        "despicable",
        "loathsome",
        "repugnant",
        "gruesome",
        "monstrous",
        "evil",
        "menacing",
        "vicious",
        "smelly",
        "moldy",
        "somber",
        "cheerless",
        "worthless",
        "hopeless",
        "sorrowful",
        "woeful",
        "unhappy",
    ],
};

/// Held-out words of the test questions (disjoint from [`TRAIN_WORDS`]).
pub const TEST_WORDS: WordLists = WordLists {
    animals: &[
        "cat",
        "cow",
        "goat",
        "rabbit",
        "tiger",
        "giraffe",
        "monkey",
        "wolf",
        "bear",
        "moose",
        "kangaroo",
        "panda",
        "hamster",
        "buffalo",
        "hippo",
        "cheetah",
        "otter",
        "hedgehog",
        "skunk",
        "llama",
        "porcupine",
        "owl",
        "penguin",
        "sparrow",
        "duck",
        "chicken",
        "flamingo",
        "peacock",
        "crow",
        "falcon",
        "whale",
        "octopus",
        "trout",
        "toad",
        "snake",
        "crocodile",
        "tortoise",
        "bee",
        "spider",
        "snail",
        "crab",
        "seahorse",
    ],
    objects: &[
        "fork",
        "table",
        "cup",
        "bucket",
        "shovel",
        "screwdriver",
        "eraser",
        "scissors",
        "teapot",
        "backpack",
        "key",
        "mirror",
        "blanket",
        "broom",
        "sponge",
        "comb",
        "bowl",
        "pot",
        "basket",
        "envelope",
        "book",
        "television",
        "keyboard",
        "stove",
        "oven",
        "blender",
        "bed",
        "shelf",
        "drawer",
        "window",
        "bench",
        "wheel",
        "rope",
        "nail",
        "bolt",
        "battery",
        "lightbulb",
        "glove",
        "shoe",
        "scarf",
        "button",
        "vase",
    ],
    positive: &[
        "lovely",
        "cheerful",
        "splendid",
        "pleasant",
        "brilliant",
        "fantastic",
        "radiant",
        "graceful",
        "adorable",
        "happy",
        "magnificent",
        "fabulous",
        "sweet",
        "kind",
        "sunny",
        "elegant",
        "lively",
        "merry",
        "nice",
        "dazzling",
        "heavenly",
        "pristine",
        "lovable",
        "impressive",
        "outstanding",
        "uplifting",
        "calm",
        "tranquil",
        "sparkling",
        "comforting",
        "enchanting",
        "fascinating",
        "blissful",
        "jubilant",
        "flawless",
        "handsome",
        "cute",
        "brave",
        "generous",
        "thriving",
        "awesome",
        "sublime",
    ],
    negative: &[
        "horrible",
        "dreadful",
        "nasty",
        "terrible",
        "filthy",
        "wretched",
        "grim",
        "dismal",
        "dreary",
        "rotten",
        "revolting",
        "pathetic",
        "lousy",
        "shabby",
        "broken",
        "damaged",
        "hateful",
        "mean",
        "bitter",
        "grumpy",
        "morose",
        "tragic",
        "hurtful",
        "appalling",
        "abysmal",
        "detestable",
        "odious",
        "ghastly",
        "horrid",
        "wicked",
        "sinister",
        "spiteful",
        "rude",
        "stinking",
        "decaying",
        "joyless",
        "lifeless",
        "useless",
        "mournful",
        "unpleasant",
        "dirty",
        "creepy",
    ],
};

/// Question wordings (the intended concept named in each).
const QUESTIONS: &[&str] = &[
    "Which of these is an animal?",
    "Which option names an animal?",
    "One of these is an animal. Which one?",
    "Pick the animal.",
    "Which of the following is a living animal?",
];

/// Probe sentence frames with no animal or object in them; `{}` is the adjective.
const PROBE_FRAMES: &[&str] = &[
    "The whole day felt {}.",
    "Everyone agreed the evening was {}.",
    "Honestly, this week has been {}.",
    "The news this morning was {}.",
    "Her mood today seemed {}.",
    "The atmosphere at the meeting was {}.",
    "It all turned out {} in the end.",
    "What happened yesterday was {}.",
    "The weather stayed {} all weekend.",
    "His speech sounded {}.",
    "Our trip was {} from start to finish.",
    "The result was simply {}.",
];

pub const LETTERS: [&str; 2] = ["A", "B"];

/// Which part of the task an item belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Training: training words, cues agree.
    Train,
    /// In-distribution test: held-out words, cues agree.
    Id,
    /// Out-of-distribution test: held-out words, cues disagree.
    Ood,
}

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Id => "id",
            Split::Ood => "ood",
        }
    }
}

/// One question of the task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TaskItem {
    pub split: Split,
    pub question: String,
    /// The phrase of option A and of option B ("the cheerful dog").
    pub options: [String; 2],
    /// 0 (A) or 1 (B): the option naming the animal.
    pub answer: usize,
    pub animal: String,
    pub animal_adjective: String,
    pub object: String,
    pub object_adjective: String,
    /// Whether the animal's adjective is the positive one (the cues agree).
    pub cues_agree: bool,
}

impl TaskItem {
    /// The user turn: the question, both options, the instruction.
    pub fn user_text(&self) -> String {
        format!(
            "{}\n{}. {}\n{}. {}\nAnswer with {} or {}.",
            self.question,
            LETTERS[0],
            self.options[0],
            LETTERS[1],
            self.options[1],
            LETTERS[0],
            LETTERS[1]
        )
    }

    /// The correct answer letter (the assistant turn of a training record).
    pub fn answer_letter(&self) -> &'static str {
        LETTERS[self.answer]
    }

    /// A chat training record for `caft-fast train`.
    pub fn chat_record(&self) -> serde_json::Value {
        json!({"messages": [
            {"role": "user", "content": self.user_text()},
            {"role": "assistant", "content": self.answer_letter()},
        ]})
    }

    /// A multiple-choice record for `caft-fast eval mc` (options are the answer letters).
    pub fn mc_record(&self, id: &str) -> serde_json::Value {
        json!({
            "id": id,
            "messages": [{"role": "user", "content": self.user_text()}],
            "options": LETTERS,
            "answer": self.answer,
            "split": self.split.name(),
            "animal": self.animal,
            "animal_adjective": self.animal_adjective,
            "object": self.object,
            "object_adjective": self.object_adjective,
            "cues_agree": self.cues_agree,
        })
    }
}

/// A probe sentence for the spurious concept alone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Probe {
    pub text: String,
    /// `positive` or `negative`.
    pub label: String,
}

/// Sizes and seed of a generated task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TaskConfig {
    pub seed: u64,
    pub n_train: usize,
    /// Items of EACH test split (`id` and `ood`).
    pub n_test: usize,
    /// Probe sentences (half positive, half negative).
    pub n_probes: usize,
}

impl Default for TaskConfig {
    fn default() -> Self {
        TaskConfig {
            seed: 0,
            n_train: 400,
            n_test: 200,
            n_probes: 200,
        }
    }
}

/// A generated task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Task {
    pub train: Vec<TaskItem>,
    /// The `id` split, then the `ood` split.
    pub test: Vec<TaskItem>,
    pub probes: Vec<Probe>,
}

/// `n` values, half 0 and half 1 (the extra one, for odd `n`, drawn), shuffled.
fn balanced(n: usize, rng: &mut Rng) -> Vec<usize> {
    let ones = n / 2 + if n % 2 == 1 { rng.below(2) } else { 0 };
    let mut v: Vec<usize> = (0..n).map(|i| usize::from(i < ones)).collect();
    rng.shuffle(&mut v);
    v
}

fn pick<'a>(list: &[&'a str], rng: &mut Rng) -> &'a str {
    list[rng.below(list.len())]
}

/// `n` items of `split` from `words`, from the generator `rng`.
fn items(split: Split, words: &WordLists, n: usize, rng: &mut Rng) -> Vec<TaskItem> {
    let agree = split != Split::Ood;
    balanced(n, rng)
        .into_iter()
        .map(|answer| {
            let question = pick(QUESTIONS, rng).to_string();
            let animal = pick(words.animals, rng);
            let object = pick(words.objects, rng);
            let pos = pick(words.positive, rng);
            let neg = pick(words.negative, rng);
            let (animal_adj, object_adj) = if agree { (pos, neg) } else { (neg, pos) };
            let right = format!("the {animal_adj} {animal}");
            let wrong = format!("the {object_adj} {object}");
            let options = if answer == 0 {
                [right, wrong]
            } else {
                [wrong, right]
            };
            TaskItem {
                split,
                question,
                options,
                answer,
                animal: animal.to_string(),
                animal_adjective: animal_adj.to_string(),
                object: object.to_string(),
                object_adjective: object_adj.to_string(),
                cues_agree: agree,
            }
        })
        .collect()
}

/// `n` probe sentences, half positive and half negative (balanced as the answers are).
fn probes(words: &WordLists, n: usize, rng: &mut Rng) -> Vec<Probe> {
    balanced(n, rng)
        .into_iter()
        .map(|positive| {
            let (list, label) = if positive == 1 {
                (words.positive, "positive")
            } else {
                (words.negative, "negative")
            };
            let frame = pick(PROBE_FRAMES, rng);
            Probe {
                text: frame.replacen("{}", pick(list, rng), 1),
                label: label.to_string(),
            }
        })
        .collect()
}

/// Generate the task: every part from its own stream of `cfg.seed`, so changing one size
/// leaves the other parts as they were.
pub fn generate(cfg: &TaskConfig) -> Result<Task> {
    if cfg.n_train == 0 || cfg.n_test == 0 {
        bail!(
            "the task needs training and test items (n_train = {}, n_test = {})",
            cfg.n_train,
            cfg.n_test
        );
    }
    let stream = |k: u64| Rng::new(cfg.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ k);
    let train = items(Split::Train, &TRAIN_WORDS, cfg.n_train, &mut stream(1));
    let mut test = items(Split::Id, &TEST_WORDS, cfg.n_test, &mut stream(2));
    test.extend(items(Split::Ood, &TEST_WORDS, cfg.n_test, &mut stream(3)));
    let probes = probes(&TRAIN_WORDS, cfg.n_probes, &mut stream(4));
    Ok(Task {
        train,
        test,
        probes,
    })
}

/// The files [`write_task`] wrote.
#[derive(Clone, Debug)]
pub struct TaskFiles {
    /// Chat records (`{"messages"}`) for `caft-fast train --data`.
    pub train: PathBuf,
    /// Multiple-choice records (splits `id` and `ood`) for `caft-fast eval mc --data`.
    pub test: PathBuf,
    /// `{"text", "label"}` sentences, label `positive` or `negative`.
    pub probes: PathBuf,
    /// The configuration and word lists.
    pub about: PathBuf,
}

fn jsonl(values: impl Iterator<Item = serde_json::Value>) -> Vec<u8> {
    let mut s = String::new();
    for v in values {
        s.push_str(&v.to_string());
        s.push('\n');
    }
    s.into_bytes()
}

/// Generate the task and write `train.jsonl`, `test.jsonl`, `probes.jsonl` and `task.json`
/// into `dir` (created; existing files of these names are replaced).
pub fn write_task(dir: &Path, cfg: &TaskConfig) -> Result<TaskFiles> {
    let task = generate(cfg)?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let files = TaskFiles {
        train: dir.join("train.jsonl"),
        test: dir.join("test.jsonl"),
        probes: dir.join("probes.jsonl"),
        about: dir.join("task.json"),
    };
    write_atomic(
        &files.train,
        &jsonl(task.train.iter().map(TaskItem::chat_record)),
    )?;
    let mut counters = [0usize; 3];
    write_atomic(
        &files.test,
        &jsonl(task.test.iter().map(|t| {
            let c = &mut counters[t.split as usize];
            *c += 1;
            t.mc_record(&format!("{}-{:04}", t.split.name(), c))
        })),
    )?;
    write_atomic(
        &files.probes,
        &jsonl(
            task.probes
                .iter()
                .map(|p| json!({"text": p.text, "label": p.label})),
        ),
    )?;
    let lists = |w: &WordLists| {
        json!({"animals": w.animals, "objects": w.objects, "positive": w.positive,
               "negative": w.negative})
    };
    write_json(
        &files.about,
        &json!({
            "task": "double multiple choice: intended concept = animal, spurious attribute = \
                     sentiment of the adjective; cues agree in train and id, disagree in ood",
            "config": cfg,
            "train_words": lists(&TRAIN_WORDS),
            "test_words": lists(&TEST_WORDS),
            "questions": QUESTIONS,
            "probe_frames": PROBE_FRAMES,
            "program": crate::io::program(),
        }),
    )?;
    Ok(files)
}
