//! What operators look at: the live view of a rollout (a row per wave with a
//! progress bar, like `kubectl argo rollouts get rollout --watch`), events in
//! words, the rollout list. Shared by `swell rollout watch|list` and `swell demo`.

use swell_coordinator::rollout::state::Decision;
use swell_coordinator::status::{EventKind, Lifecycle, RolloutEvent, RolloutStatus, WaveProgress};

/// One event in words.
pub fn describe(e: &RolloutEvent) -> String {
    match &e.what {
        EventKind::Decision(d) => match d {
            Decision::OpenWave { wave, .. } => format!("wave {wave} opened"),
            Decision::Widen { wave, .. } => format!("wave {wave} widened"),
            Decision::StartBake { wave } => format!("wave {wave} installed, baking"),
            Decision::GatePassed { wave } => format!("wave {wave} passed its health gate"),
            Decision::Breach { reason, policy } => {
                format!("BREACH: {reason} (policy {})", policy.name())
            }
            Decision::StartRollback { .. } => "rolling back".into(),
            Decision::RollbackDone => "rolled back".into(),
            Decision::Complete => "completed".into(),
            Decision::Wait { reason } => format!("waiting: {reason}"),
            Decision::Pause { .. } => "paused".into(),
            Decision::Resume { wave } => format!("resumed at wave {wave}"),
            Decision::Abort { reason } => format!("aborted: {reason}"),
            Decision::Retry { retry } => format!("retry {retry}"),
        },
        EventKind::Lifecycle(Lifecycle::Created { .. }) => "created".into(),
        EventKind::Lifecycle(Lifecycle::Removed) => "removed".into(),
        EventKind::Lifecycle(Lifecycle::Superseded { by }) => {
            format!("superseded by {by}: its manifest is cleared")
        }
    }
}

/// A 20-character progress bar.
pub fn bar(done: u64, total: u64) -> String {
    let width = 20;
    let filled = (done * width).checked_div(total).unwrap_or(0).min(width) as usize;
    format!(
        "[{}{}]",
        "#".repeat(filled),
        "-".repeat(width as usize - filled)
    )
}

/// The live view of one rollout status.
pub fn watch_view(s: &RolloutStatus) -> String {
    let mut out = format!(
        "  {} {:<12} wave {}  members {}{}\n",
        s.rollout,
        s.phase,
        s.wave,
        s.members,
        if s.finished { "  (final)" } else { "" }
    );
    for w in &s.waves {
        let done = u64::from(w.healthy) + u64::from(w.failed);
        out.push_str(&format!(
            "    {:<7} {} {:>5}/{:<5} healthy {:>5} failed {:>5} installing {:>5}{}{}\n",
            w.label,
            bar(done, u64::from(w.population)),
            done,
            w.population,
            w.healthy,
            w.failed,
            w.in_progress,
            others(w),
            if w.opened { "" } else { "  (not open)" }
        ));
    }
    out
}

/// The outcomes that are neither healthy nor failed, where there are any.
pub fn others(w: &WaveProgress) -> String {
    [
        ("waiting", w.waiting),
        ("not eligible", w.not_eligible),
        ("rolled back", w.rolled_back),
    ]
    .iter()
    .filter(|(_, n)| *n > 0)
    .map(|(what, n)| format!(" {what} {n}"))
    .collect()
}

/// One line per rollout: id, phase, wave, members, healthy and failed totals.
pub fn list(statuses: &[RolloutStatus]) -> String {
    let mut out = format!(
        "{:<24} {:<12} {:>5} {:>8} {:>8} {:>8}\n",
        "ROLLOUT", "PHASE", "WAVE", "MEMBERS", "HEALTHY", "FAILED"
    );
    for s in statuses {
        let healthy: u64 = s.waves.iter().map(|w| u64::from(w.healthy)).sum();
        let failed: u64 = s.waves.iter().map(|w| u64::from(w.failed)).sum();
        out.push_str(&format!(
            "{:<24} {:<12} {:>5} {:>8} {:>8} {:>8}\n",
            s.rollout, s.phase, s.wave, s.members, healthy, failed,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn status() -> RolloutStatus {
        serde_json::from_value(json!({"rollout": "fw-2", "fleet": "lab", "release": "ab",
               "phase": "baking", "paused_by": null, "wave": 1, "members": 10,
               "open_below": "5", "manifest_state": "Active", "manifest_seq": 3, "retry": 0,
               "waiting": null, "halt_reason": null, "selector": "", "policy": "pause",
               "updated_at": 1,
               "waves": [
                 {"index": 0, "label": "canary", "planned": 2, "population": 2, "healthy": 2, "failed": 0, "in_progress": 0, "silent": 0, "opened": true},
                 {"index": 1, "label": "50%", "planned": 4, "population": 4, "healthy": 1, "failed": 1, "in_progress": 2, "silent": 0, "opened": true},
                 {"index": 2, "label": "100%", "planned": 4, "population": 4, "healthy": 0, "failed": 0, "in_progress": 0, "silent": 0, "opened": false}]}))
        .unwrap()
    }

    fn event(what: serde_json::Value) -> RolloutEvent {
        let mut v = json!({"at": 1, "epoch": 1, "rollout": "fw-2"});
        for (k, x) in what.as_object().unwrap() {
            v[k] = x.clone();
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn view_watch_rows_and_bars() {
        let v = watch_view(&status());
        assert!(v.contains("fw-2 baking"), "{v}");
        assert!(v.contains("canary  [####################]     2/2"), "{v}");
        assert!(v.contains("[##########----------]     2/4"), "{v}");
        assert!(v.contains("(not open)"), "{v}");
        assert_eq!(bar(0, 0), format!("[{}]", "-".repeat(20)));
    }

    #[test]
    fn view_list_sums_waves() {
        let l = list(&[status()]);
        let row = l.lines().nth(1).unwrap();
        assert!(row.starts_with("fw-2"), "{l}");
        assert!(row.ends_with("       3        1"), "{l}");
    }

    #[test]
    fn view_events_in_words() {
        assert_eq!(
            describe(&event(
                json!({"decision": "open_wave", "wave": 2, "open_below": 9})
            )),
            "wave 2 opened"
        );
        let breach = describe(&event(json!({"decision": "breach", "policy": "rollback",
                   "reason": {"kind": "critical_failures", "devices": 2}})));
        assert_eq!(breach, "BREACH: 2 critical failure(s) (policy rollback)");
    }

    #[test]
    fn view_shows_outcomes_that_are_not_failures_and_final() {
        let mut s = status();
        s.waves[1].not_eligible = 3;
        s.waves[1].rolled_back = 1;
        s.finished = true;
        let v = watch_view(&s);
        assert!(v.lines().next().unwrap().ends_with("(final)"), "{v}");
        assert!(
            v.contains("installing     2 not eligible 3 rolled back 1"),
            "{v}"
        );
        assert!(!v.contains("waiting"), "only the outcomes there are: {v}");
    }
}
