//! Queries that call Python functions run in py-polars: the worker's `python_executable`, an
//! environment with `polars==2.0.0` and `cloudpickle`, loads the client's plan and runs it
//! whole. Its output (the client's placeholder sink writes Parquet) becomes the result like
//! any other query's, so Flight, stored results and their head are the same code for both.
//!
//! The interpreter is checked when the worker starts (so a broken environment stops the
//! worker rather than its first query) and its version goes into the worker's registration:
//! cloudpickle loads only in the Python that pickled, and the scheduler matches the two.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use engine::python::PythonVersion;
use polars_node_engine as engine;

/// Prints what the worker needs to know of an environment, or why it cannot run plans.
const PROBE: &str = r#"
import sys
try:
    import polars, cloudpickle
except ImportError as e:
    sys.exit(f"cannot import {e.name}: install it there (pip install polars=={sys.argv[1]} cloudpickle)")
if polars.__version__ != sys.argv[1]:
    sys.exit(f"it has polars {polars.__version__}, and the workers run Polars {sys.argv[1]}: pip install polars=={sys.argv[1]}")
print("%d.%d.%d" % sys.version_info[:3])
"#;

/// Runs the plan on stdin with the engine named in argv; a failure ends with one line,
/// `MARK` then the exception's type and message, that the worker reports to the client.
const RUN: &str = r#"
import io, sys, traceback
try:
    import polars as pl
    plan = pl.LazyFrame.deserialize(io.BytesIO(sys.stdin.buffer.read()))
    plan.collect(engine=sys.argv[1])
except BaseException as e:
    traceback.print_exc()
    kind = type(e).__name__
    sys.stderr.write("\n" + sys.argv[2] + kind + ": " + str(e).replace("\n", " ") + "\n")
    sys.exit(3)
"#;

const MARK: &str = "polars-node-python-error: ";

/// A Python environment that runs plans.
#[derive(Debug, Clone)]
pub struct PythonEnv {
    pub executable: PathBuf,
    pub version: PythonVersion,
}

impl PythonEnv {
    /// Checks `executable` (`worker.python_executable`): it runs, imports polars of the
    /// engine's version and cloudpickle.
    pub fn probe(executable: &Path) -> Result<PythonEnv, String> {
        let problem = |why: String| {
            format!(
                "worker.python_executable = {:?} cannot run queries that call Python: {why}",
                executable.display().to_string()
            )
        };
        let out = Command::new(executable)
            .args(["-c", PROBE, engine::POLARS_VERSION])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| problem(format!("cannot start it ({e})")))?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            return Err(problem(stderr.trim().lines().last().unwrap_or("it failed").to_string()));
        }
        let printed = String::from_utf8_lossy(&out.stdout);
        let version = PythonVersion::parse(&printed)
            .ok_or_else(|| problem(format!("it is not Python 3 ({})", printed.trim())))?;
        Ok(PythonEnv { executable: executable.to_path_buf(), version })
    }
}

/// Runs a whole plan in `executable` with its working directory `dir`, where the client's
/// placeholder sink writes the output. The error of a failed run is the Python exception,
/// as the client shows it (`ComputeError: ...`).
pub fn run(executable: &Path, plan: &[u8], engine: &str, dir: &Path) -> Result<(), String> {
    let mut command = Command::new(executable);
    command
        .args(["-c", RUN, engine, MARK])
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: only an async-signal-safe prctl between fork and exec: the interpreter dies with
    // its execution process (a canceled task is a killed process).
    unsafe {
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
    let mut child = command
        .spawn()
        .map_err(|e| format!("ComputeError: cannot start the worker's Python {}: {e}", executable.display()))?;
    let mut stdin = child.stdin.take().expect("piped");
    let writing = std::thread::scope(|s| {
        let writer = s.spawn(move || stdin.write_all(plan));
        let out = child.wait_with_output();
        (writer.join(), out)
    });
    let out = match writing {
        (_, Ok(out)) => out,
        (_, Err(e)) => return Err(format!("ComputeError: the worker's Python did not finish: {e}")),
    };
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    for line in stderr.lines() {
        eprintln!("python: {line}");
    }
    Err(match stderr.lines().rev().find_map(|l| l.strip_prefix(MARK)) {
        Some(exception) => describe(exception),
        None => format!(
            "ComputeError: the worker's Python exited with {} while running the query: {}",
            out.status,
            stderr.trim().lines().last().unwrap_or_default()
        ),
    })
}

/// The client re-raises `"<PolarsException>: message"` as that exception; other exceptions
/// (those of the user's own function) become a ComputeError that names them.
fn describe(exception: &str) -> String {
    let (kind, message) = exception.split_once(": ").unwrap_or((exception, ""));
    const POLARS: [&str; 12] = [
        "ColumnNotFoundError",
        "ComputeError",
        "DuplicateError",
        "InvalidOperationError",
        "NoDataError",
        "OutOfBoundsError",
        "SchemaError",
        "SchemaFieldNotFoundError",
        "ShapeError",
        "SQLInterfaceError",
        "SQLSyntaxError",
        "StringCacheMismatchError",
    ];
    let described = match POLARS.contains(&kind) {
        true => format!("{kind}: {message}"),
        false => format!("ComputeError: a Python function of the query raised {kind}: {message}"),
    };
    match message.contains("No module named") || kind == "ModuleNotFoundError" {
        // cloudpickle pickles functions of importable modules by reference.
        true => format!(
            "{described}; the worker's Python must be able to import the modules the query's functions come from: \
             install them there, or define the functions in the script or notebook that runs the query \
             (or cloudpickle.register_pickle_by_value(module))"
        ),
        false => described,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polars_exceptions_keep_their_kind_and_others_name_theirs() {
        assert_eq!(describe("SchemaError: no column b"), "SchemaError: no column b");
        assert_eq!(
            describe("ZeroDivisionError: division by zero"),
            "ComputeError: a Python function of the query raised ZeroDivisionError: division by zero"
        );
    }

    #[test]
    fn a_missing_interpreter_is_named_with_the_key() {
        let e = PythonEnv::probe(Path::new("/nonexistent/python3")).unwrap_err();
        assert!(e.contains("worker.python_executable = \"/nonexistent/python3\"") && e.contains("cannot start"), "{e}");
    }
}
