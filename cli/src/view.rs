//! What operators look at: the live view of a rollout (a row per wave with a
//! progress bar, like `kubectl argo rollouts get rollout --watch`), events in
//! words, the rollout list. Shared by `swell rollout watch|list` and `swell demo`.

use serde_json::Value;

/// One event in words.
pub fn describe(e: &Value) -> String {
    match e["decision"]
        .as_str()
        .unwrap_or(e["event"].as_str().unwrap_or(""))
    {
        "open_wave" => format!("wave {} opened", e["wave"]),
        "widen" => format!("wave {} widened", e["wave"]),
        "start_bake" => format!("wave {} installed, baking", e["wave"]),
        "gate_passed" => format!("wave {} passed its health gate", e["wave"]),
        "breach" => format!(
            "BREACH: {} (policy {})",
            e["reason"].as_str().unwrap_or(""),
            e["policy"].as_str().unwrap_or("")
        ),
        "start_rollback" => "rolling back".into(),
        "rollback_done" => "rolled back".into(),
        "complete" => "completed".into(),
        "wait" => format!("waiting: {}", e["reason"].as_str().unwrap_or("")),
        "pause" => "paused".into(),
        "created" => "created".into(),
        other => other.to_string(),
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
pub fn watch_view(s: &Value) -> String {
    let mut out = format!(
        "  {} {:<12} wave {}  members {}\n",
        s["rollout"].as_str().unwrap_or(""),
        s["phase"].as_str().unwrap_or(""),
        s["wave"],
        s["members"]
    );
    for w in s["waves"].as_array().into_iter().flatten() {
        let n = |k: &str| w[k].as_u64().unwrap_or(0);
        let done = n("healthy") + n("failed");
        out.push_str(&format!(
            "    {:<7} {} {:>5}/{:<5} healthy {:>5} failed {:>5} installing {:>5}{}\n",
            w["label"].as_str().unwrap_or(""),
            bar(done, n("population")),
            done,
            n("population"),
            n("healthy"),
            n("failed"),
            n("in_progress"),
            if w["opened"] == true {
                ""
            } else {
                "  (not open)"
            }
        ));
    }
    out
}

/// One line per rollout: id, phase, wave, members, healthy and failed totals.
pub fn list(statuses: &[Value]) -> String {
    let mut out = format!(
        "{:<24} {:<12} {:>5} {:>8} {:>8} {:>8}\n",
        "ROLLOUT", "PHASE", "WAVE", "MEMBERS", "HEALTHY", "FAILED"
    );
    for s in statuses {
        let total = |k: &str| {
            s["waves"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|w| w[k].as_u64().unwrap_or(0))
                .sum::<u64>()
        };
        out.push_str(&format!(
            "{:<24} {:<12} {:>5} {:>8} {:>8} {:>8}\n",
            s["rollout"].as_str().unwrap_or(""),
            s["phase"].as_str().unwrap_or(""),
            s["wave"],
            s["members"],
            total("healthy"),
            total("failed"),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn status() -> Value {
        json!({"rollout": "fw-2", "phase": "baking", "wave": 1, "members": 10,
               "waves": [
                 {"label": "canary", "population": 2, "healthy": 2, "failed": 0, "in_progress": 0, "opened": true},
                 {"label": "50%", "population": 4, "healthy": 1, "failed": 1, "in_progress": 2, "opened": true},
                 {"label": "100%", "population": 4, "healthy": 0, "failed": 0, "in_progress": 0, "opened": false}]})
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
            describe(&json!({"decision": "open_wave", "wave": 2})),
            "wave 2 opened"
        );
        assert!(
            describe(
                &json!({"decision": "breach", "reason": "failures 40%", "policy": "rollback"})
            )
            .contains("BREACH")
        );
    }
}
