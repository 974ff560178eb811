//! The control plane's stdout: one JSON object per line for each thing that
//! happened (docs/control-plane.md, "Its output"). Tests and the demo read
//! these lines; the human-readable log goes to stderr.

use serde_json::{Map, Value};

use crate::output;

/// Writes `{"event": kind, ...fields}` as one line on stdout. `fields` must
/// be a JSON object.
pub fn emit(kind: &str, fields: Value) {
    let mut line = match fields {
        Value::Object(fields) => fields,
        _ => Map::new(),
    };
    line.insert("event".into(), Value::String(kind.into()));
    let mut text = Value::Object(line).to_string();
    text.push('\n');
    // Whole lines, in order, written by stdout's own thread: the lines of
    // concurrent sessions never interleave, and a session does not wait
    // for the write (a closed stdout, whose reader went away, does not stop
    // serving policy either).
    output::STDOUT.push(text.as_bytes());
}
