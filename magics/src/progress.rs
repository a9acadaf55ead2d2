//! The progress display of a blocking `%px` that is still running after `progress_after`
//! seconds (`%pxconfig --progress-after`), as ipyparallel's `wait_interactive`: engines done out
//! of the total and the time so far, one `display_data` with a `display_id` updated in place
//! (`update_display_data`) and finalized when the cell ends.

use std::time::Duration;

use serde_json::json;

use crate::output::IopubMsg;

/// When a blocking `%px` that has run `elapsed` shows its progress: never with a negative
/// `progress_after`, at once with 0, else once `progress_after` seconds have passed.
pub fn progress_due(progress_after: f64, elapsed: Duration) -> bool {
    progress_after >= 0.0 && elapsed.as_secs_f64() >= progress_after
}

/// The progress text: `2/4 engines done after 3 s` (`finished`: all replies are in).
pub fn progress_text(done: usize, total: usize, elapsed: Duration, finished: bool) -> String {
    let unit = if total == 1 { "engine" } else { "engines" };
    let secs = elapsed.as_secs();
    if finished {
        format!("%px: {done}/{total} {unit} done in {:.1} s", elapsed.as_secs_f64())
    } else {
        format!("%px: {done}/{total} {unit} done after {secs} s")
    }
}

/// The display message: the first one a `display_data` (`first`), later ones updates of it.
pub fn progress_message(display_id: &str, first: bool, done: usize, total: usize, elapsed: Duration, finished: bool) -> IopubMsg {
    let text = progress_text(done, total, elapsed, finished);
    let html = format!(
        "<progress value=\"{done}\" max=\"{total}\" style=\"width: 12em\"></progress> <code>{}</code>",
        text.replace('&', "&amp;").replace('<', "&lt;")
    );
    let data = json!({ "text/plain": text, "text/html": html });
    if first {
        IopubMsg::DisplayData { data, metadata: json!({}), display_id: Some(display_id.to_string()) }
    } else {
        IopubMsg::UpdateDisplayData { data, metadata: json!({}), display_id: display_id.to_string() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_shows_after_the_configured_seconds_never_when_negative() {
        assert!(!progress_due(2.0, Duration::from_millis(1999)));
        assert!(progress_due(2.0, Duration::from_secs(2)));
        assert!(progress_due(0.0, Duration::ZERO));
        assert!(!progress_due(-1.0, Duration::from_secs(3600)));
    }

    #[test]
    fn progress_text_counts_engines_and_time() {
        assert_eq!(progress_text(1, 4, Duration::from_millis(3400), false), "%px: 1/4 engines done after 3 s");
        assert_eq!(progress_text(4, 4, Duration::from_millis(5250), true), "%px: 4/4 engines done in 5.2 s");
        assert_eq!(progress_text(0, 1, Duration::ZERO, false), "%px: 0/1 engine done after 0 s");
    }

    #[test]
    fn the_first_message_is_a_display_later_ones_update_it() {
        let first = progress_message("p1", true, 0, 2, Duration::ZERO, false);
        assert!(matches!(first, IopubMsg::DisplayData { display_id: Some(ref id), .. } if id == "p1"));
        let next = progress_message("p1", false, 1, 2, Duration::from_secs(1), false);
        let IopubMsg::UpdateDisplayData { data, display_id, .. } = next else { panic!("an update") };
        assert_eq!(display_id, "p1");
        assert!(data["text/html"].as_str().unwrap().contains("<progress value=\"1\" max=\"2\""));
    }
}
