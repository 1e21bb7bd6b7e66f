//! Runs every fuzz target over its saved corpus (`fuzz/corpus/NAME`) and its crash
//! regressions (`fuzz/regressions/NAME`) on stable: what the fuzzer found stays found,
//! without nightly or libFuzzer (docs/fuzzing.md).

use std::alloc::{GlobalAlloc, Layout, System};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

/// libFuzzer counts an allocation over its memory limit (2 GiB) as a crash; on stable
/// such an allocation may well succeed (untouched pages cost nothing), so the
/// regressions of that kind would pass whatever the code does. Over 1 GiB, this test
/// process fails instead (the allocation error aborts it).
struct Capped;

const ALLOCATION_LIMIT: usize = 1 << 30;

unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > ALLOCATION_LIMIT {
            return std::ptr::null_mut();
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > ALLOCATION_LIMIT {
            return std::ptr::null_mut();
        }
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > ALLOCATION_LIMIT {
            return std::ptr::null_mut();
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Capped = Capped;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return vec![];
    };
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

fn replay(kind: &str) -> usize {
    let mut failed = vec![];
    let mut count = 0;
    for (name, target) in jrs_fuzz::TARGETS {
        for file in inputs(&fuzz_dir().join(kind).join(name)) {
            let data = std::fs::read(&file).expect("reading an input");
            count += 1;
            if catch_unwind(AssertUnwindSafe(|| target(&data))).is_err() {
                failed.push(file.display().to_string());
            }
        }
    }
    assert!(
        failed.is_empty(),
        "targets panicked on:\n{}",
        failed.join("\n")
    );
    count
}

#[test]
fn corpus() {
    assert!(replay("corpus") > 0);
}

#[test]
fn regressions() {
    replay("regressions");
}

/// Every target has a fuzz binary and a seed corpus, and every fuzz binary a target.
#[test]
fn targets_match_the_fuzz_crate() {
    let binaries: Vec<String> = inputs(&fuzz_dir().join("fuzz_targets"))
        .iter()
        .filter_map(|p| Some(p.file_stem()?.to_str()?.to_owned()))
        .collect();
    let names: Vec<&str> = jrs_fuzz::TARGETS.iter().map(|(n, _)| *n).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(
        binaries, sorted,
        "fuzz/fuzz_targets and jrs_fuzz::TARGETS differ"
    );
    for name in names {
        assert!(
            !inputs(&fuzz_dir().join("corpus").join(name)).is_empty(),
            "no seed corpus for {name}"
        );
    }
    let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).expect("fuzz/Cargo.toml");
    for name in jrs_fuzz::TARGETS.iter().map(|(n, _)| n) {
        assert!(
            manifest.contains(&format!("name = \"{name}\"")),
            "{name} is not a [[bin]] of fuzz/Cargo.toml"
        );
    }
}
