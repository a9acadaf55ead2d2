//! What the engine's running worker has run: the code of each compiled cell and its outcome.
//! When the compiler crashes and a new one comes up, the engine sends this history in its
//! `engine_hello`; the new compiler replays it into a context that matches the worker, so the
//! worker and its variables are kept. Cleared whenever the worker starts over.

use rpx_protocol::compile::{HistoryCell, LoadOutcome};

/// Code kept at most; beyond it the history cannot be sent and a new compiler means a new worker.
pub const MAX_BYTES: usize = 16 << 20;

/// The running worker's cells, in order.
#[derive(Debug, Default)]
pub struct WorkerHistory {
    /// `(cell id, cell)`: the id tells a retried load (a type change) from a new cell.
    cells: Vec<(String, HistoryCell)>,
    /// The cell asked for last and its code, until its load is done.
    requested: Option<(String, String)>,
    bytes: usize,
    overflowed: bool,
}

impl WorkerHistory {
    /// A cell was sent to the compiler with this code.
    pub fn requested(&mut self, cell_id: &str, code: &str) {
        self.requested = Some((cell_id.to_string(), code.to_string()));
    }

    /// The worker finished a load of `cell_id` (or the engine skipped it).
    pub fn loaded(&mut self, cell_id: &str, outcome: &LoadOutcome) {
        match outcome {
            // The worker died: it starts over with nothing.
            LoadOutcome::Died { .. } => return self.clear(),
            // Nothing ran.
            LoadOutcome::Skipped { .. } => return,
            LoadOutcome::Complete { .. } => {}
        }
        let Some(code) = self.requested.as_ref().filter(|(id, _)| id == cell_id).map(|(_, code)| code.clone()) else { return };
        let cell = HistoryCell { code, outcome: outcome.clone() };
        if let Some(last) = self.cells.last_mut().filter(|(id, _)| id == cell_id) {
            // evcxr ran the cell again after a type change: the last run is what counts.
            last.1 = cell;
            return;
        }
        self.bytes += cell.code.len();
        if self.bytes > MAX_BYTES {
            self.overflowed = true;
            self.cells.clear();
            return;
        }
        self.cells.push((cell_id.to_string(), cell));
    }

    /// The worker is gone or replaced.
    pub fn clear(&mut self) {
        *self = WorkerHistory::default();
    }

    /// What to send a new compiler; `None` when too much ran to be sent (the worker must
    /// start over).
    pub fn snapshot(&self) -> Option<Vec<HistoryCell>> {
        (!self.overflowed).then(|| self.cells.iter().map(|(_, c)| c.clone()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(changed: &[&str]) -> LoadOutcome {
        LoadOutcome::Complete { panicked: false, error_occurred: false, changed_types: changed.iter().map(|s| s.to_string()).collect() }
    }

    #[test]
    fn cells_are_kept_in_order_and_a_retry_replaces_its_first_run() {
        let mut h = WorkerHistory::default();
        h.requested("c1", "let a = 1;");
        h.loaded("c1", &complete(&[]));
        h.requested("c2", "let a = \"x\";");
        h.loaded("c2", &complete(&["a"]));
        h.loaded("c2", &complete(&[]));
        let s = h.snapshot().unwrap();
        assert_eq!(s.iter().map(|c| c.code.as_str()).collect::<Vec<_>>(), ["let a = 1;", "let a = \"x\";"]);
        assert_eq!(s[1].outcome, complete(&[]));
    }

    #[test]
    fn skipped_and_unrequested_loads_are_not_history_and_a_death_clears_it() {
        let mut h = WorkerHistory::default();
        h.requested("c1", "let a = 1;");
        h.loaded("c1", &LoadOutcome::Skipped { reason: "interrupted".into() });
        h.loaded("other", &complete(&[]));
        assert_eq!(h.snapshot().unwrap(), vec![]);
        h.loaded("c1", &complete(&[]));
        assert_eq!(h.snapshot().unwrap().len(), 1);
        h.requested("c2", "std::process::abort();");
        h.loaded("c2", &LoadOutcome::Died { status: "signal 6".into() });
        assert_eq!(h.snapshot().unwrap(), vec![]);
    }

    #[test]
    fn too_much_code_cannot_be_sent() {
        let mut h = WorkerHistory::default();
        let big = "x".repeat(MAX_BYTES / 2 + 1);
        for i in 0..2 {
            h.requested(&format!("c{i}"), &big);
            h.loaded(&format!("c{i}"), &complete(&[]));
        }
        assert_eq!(h.snapshot(), None);
        h.clear();
        assert_eq!(h.snapshot(), Some(vec![]));
    }
}
