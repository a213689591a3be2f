//! Task fragments as DSL: column selections, placeholders for other stages' outputs, and
//! fusing a small gather stage into the task that reads it.

use super::*;

/// A selection of columns keeps the height of its input, even of none (`select(pl.len())` of a
/// scan reads no column but counts its rows).
pub(super) fn select_columns<'a>(plan: DslPlan, names: impl Iterator<Item = &'a PlSmallStr>) -> DslPlan {
    let options = ProjectionOptions { maintain_dataframe_height: true, ..Default::default() };
    DslPlan::Select { expr: names.map(|n| col(n.clone())).collect(), input: Arc::new(plan), options }
}

/// The placeholder scan for another stage's output.
pub(super) fn placeholder(stage: usize, part: Option<usize>) -> DslPlan {
    let path = PlRefPath::new(input_path(stage, part));
    DslPlan::Scan {
        sources: ScanSources::Paths(vec![path].into()),
        unified_scan_args: Box::default(),
        scan_type: Box::new(FileScanDsl::Ipc { options: Default::default() }),
        cached_ir: Arc::new(Mutex::new(None)),
    }
}

/// The stages a fragment reads.
pub(super) fn inputs_of(plan: &DslPlan) -> Vec<usize> {
    let mut found = Vec::new();
    crate::walk(plan, &mut |p| {
        if let DslPlan::Scan { sources: ScanSources::Paths(paths), .. } = p {
            found.extend(paths.iter().filter_map(|p| parse_input_path(p.as_str())).map(|(s, _)| s));
        }
    });
    found.sort_unstable();
    found.dedup();
    found
}

/// Whether a task fragment reads nothing but other stages' outputs (no files of its own).
pub fn reads_only_inputs(task: &[u8]) -> PolarsResult<bool> {
    let plan = DslPlan::deserialize_versioned(task)?;
    let mut only = true;
    crate::walk(&plan, &mut |p| {
        if let DslPlan::Scan { sources, .. } = p {
            only &= matches!(sources, ScanSources::Paths(paths) if paths.iter().all(|p| parse_input_path(p.as_str()).is_some()));
        }
    });
    Ok(only)
}

/// `consumer` (a task fragment reading all of gather stage `stage`) with that stage's work done
/// inside it: the placeholder replaced by the concatenation, in task order, of the stage's task
/// fragments, which read the stage's own inputs. For a gather whose inputs turned out small,
/// one task beats a stage of tasks and a shuffle.
pub fn fuse(consumer: &[u8], stage: usize, tasks: &[Vec<u8>]) -> PolarsResult<Vec<u8>> {
    let mut plan = DslPlan::deserialize_versioned(consumer)?;
    let parts = tasks.iter().map(|t| DslPlan::deserialize_versioned(t.as_slice())).collect::<PolarsResult<Vec<_>>>()?;
    let args = UnionArgs {
        parallel: true,
        rechunk: false,
        to_supertypes: false,
        diagonal: false,
        strict: false,
        from_partitioned_ds: false,
        maintain_order: true,
    };
    let concat = DslPlan::Union { inputs: parts, args };
    let all = input_path(stage, None);
    let mut replaced = false;
    crate::rewrite(&mut plan, &mut |node| {
        if let DslPlan::Scan { sources: ScanSources::Paths(paths), .. } = node
            && paths.len() == 1
            && paths[0].as_str() == all
        {
            *node = concat.clone();
            replaced = true;
        }
    });
    polars_ensure!(replaced, ComputeError: "the fragment does not read stage {stage}");
    serialize(&plan)
}

pub(super) fn serialize(plan: &DslPlan) -> PolarsResult<Vec<u8>> {
    let mut bytes = Vec::new();
    plan.serialize_versioned(&mut bytes, Default::default())?;
    Ok(bytes)
}
