//! The tokio runtime of a process, and how an operator chooses its shape.
//!
//! Each program has a default (a multi-threaded runtime with the workers its main file
//! asks for). The environment can change it, for all programs or for one:
//!
//! - `JABBERD_RUNTIME=current`: one thread runs every task (no cross-thread wake-ups:
//!   cheapest per message at low load, but the process uses one core at most);
//! - `JABBERD_RUNTIME=multi` or `multi:N`: a multi-threaded runtime with N workers (or the
//!   program's default, or tokio's: one per core, `TOKIO_WORKER_THREADS`);
//! - `JABBERD_RUNTIME_SM=...` (the program's name in capitals, `-` as `_`): for that
//!   program only, before `JABBERD_RUNTIME`.
//!
//! docs/benchmarks.md, "Low load", measures the shapes.

use std::fmt;

/// A runtime's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// One thread (`new_current_thread`).
    Current,
    /// Worker threads: this many, or tokio's default when `None`.
    Multi(Option<usize>),
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Shape::Current => f.write_str("current"),
            Shape::Multi(None) => f.write_str("multi"),
            Shape::Multi(Some(n)) => write!(f, "multi:{n}"),
        }
    }
}

impl Shape {
    /// Reads `current`, `multi` or `multi:N` (N from 1 to 64).
    pub fn parse(s: &str) -> Result<Shape, String> {
        match s.trim() {
            "current" => Ok(Shape::Current),
            "multi" => Ok(Shape::Multi(None)),
            other => other
                .strip_prefix("multi:")
                .and_then(|n| n.parse::<usize>().ok())
                .filter(|n| (1..=64).contains(n))
                .map(|n| Shape::Multi(Some(n)))
                .ok_or_else(|| {
                    format!("'{other}': expected current, multi or multi:N (N from 1 to 64)")
                }),
        }
    }

    /// The shape the environment asks for `program`, else `default`.
    pub fn chosen(program: &str, default: Shape) -> Result<Shape, String> {
        let own = format!(
            "JABBERD_RUNTIME_{}",
            program.to_ascii_uppercase().replace('-', "_")
        );
        for var in [own.as_str(), "JABBERD_RUNTIME"] {
            if let Ok(value) = std::env::var(var) {
                return Shape::parse(&value).map_err(|e| format!("{var}={e}"));
            }
        }
        Ok(default)
    }
}

/// Builds `program`'s runtime: the environment's shape, else `default`.
pub fn build(program: &str, default: Shape) -> anyhow::Result<tokio::runtime::Runtime> {
    let shape = Shape::chosen(program, default).map_err(anyhow::Error::msg)?;
    let mut builder = match shape {
        Shape::Current => tokio::runtime::Builder::new_current_thread(),
        Shape::Multi(workers) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            if let Some(n) = workers {
                b.worker_threads(n);
            }
            b
        }
    };
    if shape != default {
        tracing::info!(runtime = %shape, "runtime chosen by the environment");
    }
    Ok(builder.enable_all().build()?)
}

#[cfg(test)]
mod tests {
    use super::Shape;

    #[test]
    fn shapes_are_read() {
        assert_eq!(Shape::parse("current"), Ok(Shape::Current));
        assert_eq!(Shape::parse("multi"), Ok(Shape::Multi(None)));
        assert_eq!(Shape::parse(" multi:3 "), Ok(Shape::Multi(Some(3))));
        for bad in ["", "multi:0", "multi:65", "multi:x", "single", "current:1"] {
            assert!(Shape::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Shape::Multi(Some(2)).to_string(), "multi:2");
    }
}
