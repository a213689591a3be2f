//! A split query as workers run it: its stages, how each hands its output to the next, and
//! the placeholder paths by which a task fragment names another stage's output. The planner
//! produces it; the scheduler runs it; the shuffle writes and reads by it.

use std::fmt::Write as _;

/// Scheme of the placeholder scans standing for another stage's output.
pub const INPUT_SCHEME: &str = "polars-node-input://";

/// How a stage hands its output to the next one.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum StageOutput {
    /// Each task writes one partition; the consumer reads all of them.
    Single,
    /// Each task writes `partitions` partitions by the hash of `keys`; consumer task `i`
    /// reads partition `i` of every task.
    Hash { keys: Vec<String>, partitions: usize },
    /// The query's result (the last stage, one task).
    Result,
    /// One file with `partitions - 1` boundaries of the first sort key, chosen from all the
    /// key values the task reads (the sample stage of a range-partitioned sort).
    Boundaries { key: String, descending: bool, nulls_last: bool, partitions: usize },
    /// Each task writes `partitions` partitions by ranges of `key` between the boundaries that
    /// stage `boundaries` found; consumer task `i` reads partition `i` of every task, and the
    /// partitions follow the sort order.
    Range { key: String, descending: bool, nulls_last: bool, partitions: usize, boundaries: usize },
    /// Each task writes `lows.len() + 1` partitions by ranges of `key` known when planning
    /// (those of a table laid out by it): partition `i` holds the keys from `lows[i - 1]` on
    /// and below `lows[i]`, and the null keys go to partition 0 (the planner's range partitioning).
    KeyRanges { key: String, lows: Vec<i64> },
}

impl StageOutput {
    /// Consumer task `i` reads partition `i` of every task (not every task's one file).
    pub fn is_partitioned(&self) -> bool {
        matches!(self, StageOutput::Hash { .. } | StageOutput::Range { .. } | StageOutput::KeyRanges { .. })
    }

    /// Files each task writes.
    pub fn partitions(&self) -> usize {
        match self {
            StageOutput::Hash { partitions, .. } | StageOutput::Range { partitions, .. } => *partitions,
            StageOutput::KeyRanges { lows, .. } => lows.len() + 1,
            _ => 1,
        }
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StagePlan {
    /// The DSL each task runs (serialized, versioned like a client plan).
    pub tasks: Vec<Vec<u8>>,
    pub output: StageOutput,
    /// Stages whose output this stage reads.
    pub inputs: Vec<usize>,
    /// What the stage does, for people (stage graph, observatory).
    pub label: String,
}

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct StageGraph {
    /// In execution order; the last one produces the result.
    pub stages: Vec<StagePlan>,
    /// The optimized logical plan that was split (EXPLAIN format).
    pub logical_plan: String,
}

/// The placeholder path for partition `part` (or all partitions) of `stage`'s output.
pub fn input_path(stage: usize, part: Option<usize>) -> String {
    match part {
        Some(p) => format!("{INPUT_SCHEME}{stage}/{p}"),
        None => format!("{INPUT_SCHEME}{stage}/all"),
    }
}

/// Reads a placeholder path back: (stage, partition or None for all).
pub fn parse_input_path(path: &str) -> Option<(usize, Option<usize>)> {
    let rest = path.strip_prefix(INPUT_SCHEME)?;
    let (stage, part) = rest.split_once('/')?;
    let part = if part == "all" { None } else { Some(part.parse().ok()?) };
    Some((stage.parse().ok()?, part))
}

impl StageGraph {
    /// The stage graph as text, for `explain()` / `plan()` and the observatory.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for (i, stage) in self.stages.iter().enumerate() {
            let output = match &stage.output {
                StageOutput::Single => "gathered".to_string(),
                StageOutput::Hash { keys, partitions } => {
                    format!("hash({}) into {partitions} partitions", keys.join(", "))
                }
                StageOutput::Result => "result".to_string(),
                StageOutput::Boundaries { key, partitions, .. } => format!("{} boundaries of {key}", partitions - 1),
                StageOutput::Range { key, partitions, .. } => format!("ranges of {key} into {partitions} partitions"),
                StageOutput::KeyRanges { key, lows } => {
                    format!("ranges of {key} into {} partitions (cut at {lows:?})", lows.len() + 1)
                }
            };
            let inputs = if stage.inputs.is_empty() {
                String::new()
            } else {
                format!(" <- {}", stage.inputs.iter().map(|s| format!("stage {s}")).collect::<Vec<_>>().join(", "))
            };
            let _ = writeln!(out, "stage {i}: {} task(s), {output}{inputs}\n  {}", stage.tasks.len(), stage.label);
        }
        out
    }
}
