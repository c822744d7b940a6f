//! When a wave may open: `start_at`, per-wave `not_before`, and daily maintenance
//! windows in a named time zone (IANA database bundled, so a distroless image
//! without /usr/share/zoneinfo behaves the same).

use super::spec::{MaintenanceWindows, RolloutSpec};
use jiff::Timestamp;
use jiff::tz::TimeZone;
use swell_protocol::cohort::{self, format_percent};

/// The time zone called `name`.
pub fn zone(name: &str) -> Result<TimeZone, String> {
    TimeZone::get(name).map_err(|e| format!("unknown time zone {name:?}: {e}"))
}

fn hhmm(m: u16) -> String {
    format!("{:02}:{:02}", m / 60, m % 60)
}

/// Whether `now` falls inside one of the daily windows.
pub fn in_window(w: &MaintenanceWindows, now: u64) -> Result<bool, String> {
    let tz = zone(&w.tz)?;
    let ts = Timestamp::from_second(i64::try_from(now).map_err(|_| "time out of range")?)
        .map_err(|e| e.to_string())?;
    let local = tz.to_datetime(ts);
    let minute = u16::try_from(i32::from(local.hour()) * 60 + i32::from(local.minute()))
        .map_err(|_| "bad local time")?;
    Ok(w.daily.iter().any(|&(a, b)| {
        if a < b {
            a <= minute && minute < b
        } else {
            minute >= a || minute < b
        }
    }))
}

/// ROLL-3 at the coordinator: the release's exposure schedule caps what
/// devices accept, so a wave wider than the cap allows now would only collect
/// refusals. Why it waits, with when the cap allows it.
fn capped(spec: &RolloutSpec, wave: u16, now: u64) -> Option<String> {
    let exposure = spec.exposure.as_ref()?;
    let target = spec.plan.open_below(usize::from(wave)).unwrap_or(u64::MAX);
    let allows = |t: u64| cohort::open_below(exposure.max_ppm_at(t)) >= target;
    if allows(now) {
        return None;
    }
    let cap = format_percent(exposure.max_ppm_at(now));
    let wants = spec.plan.wave_label(usize::from(wave));
    let when = exposure
        .steps
        .iter()
        .map(|s| exposure.start.saturating_add(s.after_secs))
        .find(|&t| t > now && allows(t));
    Some(match when {
        Some(t) => format!(
            "exposure cap: {cap} until {} (wave {wave} opens {wants})",
            Timestamp::from_second(t as i64).map_or(t.to_string(), |ts| ts.to_string())
        ),
        None => format!(
            "exposure cap: the release never allows {wants} (wave {wave}); at most {cap} now"
        ),
    })
}

/// Why wave `wave` may not open at `now`, or `None` when it may.
pub fn blocked(spec: &RolloutSpec, wave: u16, now: u64) -> Option<String> {
    if let Some(t) = spec.start_at
        && now < t
    {
        return Some(format!(
            "scheduled to start at {}",
            Timestamp::from_second(t as i64).map_or(t.to_string(), |ts| ts.to_string())
        ));
    }
    if let Some(t) = spec.not_before(wave)
        && now < t
    {
        return Some(format!(
            "wave {wave} not before {}",
            Timestamp::from_second(t as i64).map_or(t.to_string(), |ts| ts.to_string())
        ));
    }
    if let Some(why) = capped(spec, wave, now) {
        return Some(why);
    }
    if let Some(w) = &spec.windows {
        match in_window(w, now) {
            Ok(true) => {}
            Ok(false) => {
                let list: Vec<String> = w
                    .daily
                    .iter()
                    .map(|&(a, b)| format!("{}-{}", hhmm(a), hhmm(b)))
                    .collect();
                return Some(format!(
                    "outside maintenance windows {} {}",
                    list.join(","),
                    w.tz
                ));
            }
            Err(e) => return Some(e),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn win(tz: &str, daily: Vec<(u16, u16)>) -> MaintenanceWindows {
        MaintenanceWindows {
            tz: tz.into(),
            daily,
        }
    }

    #[test]
    fn schedule_windows_in_named_zones() {
        // 2026-11-26T01:30:00Z = 02:30 in Berlin (CET, +1), 20:30 the day before in New York.
        let t = 1_795_656_600;
        assert!(in_window(&win("Europe/Berlin", vec![(120, 240)]), t).unwrap());
        assert!(!in_window(&win("Europe/Berlin", vec![(180, 240)]), t).unwrap());
        assert!(in_window(&win("America/New_York", vec![(1200, 1260)]), t).unwrap());
        // Wrapping past midnight: 22:00-03:00 Berlin.
        assert!(in_window(&win("Europe/Berlin", vec![(1320, 180)]), t).unwrap());
        assert!(in_window(&win("Nowhere/Else", vec![(0, 10)]), t).is_err());
    }

    #[test]
    fn schedule_daylight_saving_is_followed() {
        // 2026-07-01T00:30:00Z = 02:30 in Berlin (CEST, +2).
        let t = 1_782_865_800;
        assert!(in_window(&win("Europe/Berlin", vec![(150, 160)]), t).unwrap());
        assert!(!in_window(&win("Europe/Berlin", vec![(90, 100)]), t).unwrap());
    }
}
