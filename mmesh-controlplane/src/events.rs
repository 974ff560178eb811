//! The control plane's stdout: one JSON object per line for each thing that
//! happened (docs/control-plane.md, "Its output"). Tests and the demo read
//! these lines; the human-readable log goes to stderr.

use std::io::Write as _;

use serde_json::{Map, Value};

/// Writes `{"event": kind, ...fields}` as one line on stdout. `fields` must
/// be a JSON object.
pub fn emit(kind: &str, fields: Value) {
    let mut line = Map::new();
    line.insert("event".into(), Value::String(kind.into()));
    if let Value::Object(fields) = fields {
        line.extend(fields);
    }
    let text = Value::Object(line).to_string();
    // One locked write per line so lines of concurrent sessions never
    // interleave. A closed stdout (the reader went away) must not stop
    // serving policy: the error is only logged.
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{text}").and_then(|()| out.flush()) {
        tracing::debug!("cannot write an event line to stdout: {e}");
    }
}
