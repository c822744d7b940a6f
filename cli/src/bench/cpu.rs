//! Where the machine's CPU went during a phase of `swell bench fleet`: each
//! process's CPU time (from `/proc/<pid>/stat`) and the whole machine's busy
//! time (from `/proc/stat`), taken at the start and end of the phase.
//!
//! The fleet benchmark runs the broker, the coordinator and the simulated
//! fleet on the same cores, so its ingest rate is bounded by the CPU the three
//! spend per report together, not by the coordinator's alone. These figures
//! say how much each spends, so the ingest/relay ratio can be read against
//! them (BENCHMARKS.md, eleventh round).

use serde_json::{Value, json};
use std::time::Instant;

/// Kernel clock ticks per second for `/proc` CPU times (USER_HZ: 100 on Linux).
const TICKS: f64 = 100.0;

/// CPU seconds (user + system) and peak RSS (KiB) of a process, from /proc;
/// zeros for a process that is gone.
pub fn proc_usage(pid: &str) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces) are split by ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime are fields 14 and 15 (1-based), in USER_HZ.
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let cpu = (ticks(11) + ticks(12)) / TICKS;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    (cpu, hwm)
}

/// The machine's busy and stolen CPU seconds since boot, summed over its cores
/// (`/proc/stat`'s first line: busy is everything but idle, iowait and steal).
fn machine_seconds() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let nums: Vec<f64> = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .map(|rest| {
            rest.split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let at = |i: usize| nums.get(i).copied().unwrap_or(0.0);
    // user nice system idle iowait irq softirq steal (guest time is in user).
    let busy = at(0) + at(1) + at(2) + at(5) + at(6);
    (busy / TICKS, at(7) / TICKS)
}

/// The processes a phase is charged to, by role; `None` for a role that has no
/// process of its own (the embedded broker runs inside the fleet's process, an
/// external broker is not watched).
#[derive(Debug, Clone)]
pub struct Roles {
    pub coordinator: Option<String>,
    pub broker: Option<String>,
    /// The benchmark's own process: the simulated fleet, or the relay
    /// baseline's publishers and subscriber.
    pub clients: String,
}

/// CPU counters at one moment.
#[derive(Debug, Clone)]
pub struct Mark {
    at: Instant,
    coordinator: f64,
    broker: f64,
    clients: f64,
    machine_busy: f64,
    machine_steal: f64,
}

impl Roles {
    pub fn mark(&self) -> Mark {
        let cpu = |pid: &Option<String>| pid.as_deref().map_or(0.0, |p| proc_usage(p).0);
        let (machine_busy, machine_steal) = machine_seconds();
        Mark {
            at: Instant::now(),
            coordinator: cpu(&self.coordinator),
            broker: cpu(&self.broker),
            clients: proc_usage(&self.clients).0,
            machine_busy,
            machine_steal,
        }
    }
}

/// What a phase between two marks cost, per message and in cores.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spent {
    pub seconds: f64,
    pub messages: u64,
    /// CPU microseconds per message, by role (`None`: no process of its own).
    pub coordinator_us: Option<f64>,
    pub broker_us: Option<f64>,
    pub clients_us: f64,
    /// Busy cores of the whole machine over the phase, and cores' worth of
    /// time stolen by the hypervisor.
    pub machine_busy_cores: f64,
    pub machine_steal_cores: f64,
}

impl Spent {
    pub fn between(roles: &Roles, from: &Mark, to: &Mark, messages: u64) -> Spent {
        let seconds = to.at.duration_since(from.at).as_secs_f64().max(1e-9);
        let per = |a: f64, b: f64| (b - a).max(0.0) * 1e6 / messages.max(1) as f64;
        Spent {
            seconds,
            messages,
            coordinator_us: roles
                .coordinator
                .as_ref()
                .map(|_| per(from.coordinator, to.coordinator)),
            broker_us: roles.broker.as_ref().map(|_| per(from.broker, to.broker)),
            clients_us: per(from.clients, to.clients),
            machine_busy_cores: (to.machine_busy - from.machine_busy).max(0.0) / seconds,
            machine_steal_cores: (to.machine_steal - from.machine_steal).max(0.0) / seconds,
        }
    }

    /// CPU microseconds per message of every process watched.
    pub fn total_us(&self) -> f64 {
        self.coordinator_us.unwrap_or(0.0) + self.broker_us.unwrap_or(0.0) + self.clients_us
    }

    /// CPU microseconds per message of the broker and the clients together,
    /// if the broker was watched: what a coordinator could not take away.
    fn without_coordinator_us(&self) -> Option<f64> {
        Some(self.broker_us? + self.clients_us)
    }

    pub fn to_json(self) -> Value {
        json!({
            "seconds": self.seconds,
            "messages": self.messages,
            "coordinator_us_per_message": self.coordinator_us,
            "broker_us_per_message": self.broker_us,
            "clients_us_per_message": self.clients_us,
            "all_us_per_message": self.total_us(),
            "machine_busy_cores": self.machine_busy_cores,
            "machine_steal_cores": self.machine_steal_cores,
        })
    }
}

/// The rollout's report rate this machine's `cores` could reach if the
/// coordinator cost nothing: the broker and the fleet at their measured CPU
/// per report. `None` when they were not both watched.
pub fn rate_without_coordinator(rollout: &Spent, cores: f64) -> Option<f64> {
    let others = rollout.without_coordinator_us()?;
    (others > 0.0).then(|| cores * 1e6 / others)
}

/// CPU microseconds per report the coordinator may spend, beside the broker's
/// and the fleet's measured cost, for the ingest rate to reach `ratio` of
/// `relay` on `cores` (negative: not even a coordinator that costs nothing).
pub fn coordinator_budget_us(rollout: &Spent, cores: f64, ratio: f64, relay: f64) -> Option<f64> {
    let others = rollout.without_coordinator_us()?;
    (relay > 0.0).then(|| cores * 1e6 / (ratio * relay) - others)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(secs: f64, coordinator: f64, broker: f64, clients: f64, busy: f64) -> (Mark, Mark) {
        let at = Instant::now();
        let a = Mark {
            at,
            coordinator: 10.0,
            broker: 20.0,
            clients: 30.0,
            machine_busy: 1000.0,
            machine_steal: 5.0,
        };
        let b = Mark {
            at: at + std::time::Duration::from_secs_f64(secs),
            coordinator: 10.0 + coordinator,
            broker: 20.0 + broker,
            clients: 30.0 + clients,
            machine_busy: 1000.0 + busy,
            machine_steal: 5.0,
        };
        (a, b)
    }

    #[test]
    fn a_phase_is_charged_per_message_to_each_role() {
        let roles = Roles {
            coordinator: Some("1".into()),
            broker: Some("2".into()),
            clients: "3".into(),
        };
        // 100 s, 1,000,000 reports: 40 s coordinator, 50 s broker, 90 s fleet.
        let (a, b) = mark(100.0, 40.0, 50.0, 90.0, 190.0);
        let s = Spent::between(&roles, &a, &b, 1_000_000);
        assert_eq!(s.coordinator_us, Some(40.0));
        assert_eq!(s.broker_us, Some(50.0));
        assert!((s.clients_us - 90.0).abs() < 1e-9);
        assert!((s.total_us() - 180.0).abs() < 1e-9);
        assert!((s.machine_busy_cores - 1.9).abs() < 1e-9);
        assert_eq!(s.machine_steal_cores, 0.0);
        // Broker + fleet 140 µs per report: 2 cores reach 14,286 reports/s.
        let ceiling = rate_without_coordinator(&s, 2.0).unwrap_or(0.0);
        assert!((ceiling - 2e6 / 140.0).abs() < 1e-6);
        // 0.8 of a 10,000/s relay is 8,000/s: 250 µs of CPU per report on two
        // cores, 110 µs of it left to the coordinator.
        let budget = coordinator_budget_us(&s, 2.0, 0.8, 10_000.0).unwrap_or(0.0);
        assert!((budget - 110.0).abs() < 1e-9);
        // A relay fast enough leaves the coordinator less than nothing.
        let budget = coordinator_budget_us(&s, 2.0, 0.8, 20_000.0).unwrap_or(0.0);
        assert!(budget < 0.0);
    }

    #[test]
    fn roles_without_a_process_are_not_charged_or_used() {
        let roles = Roles {
            coordinator: None,
            broker: None,
            clients: "3".into(),
        };
        let (a, b) = mark(10.0, 4.0, 5.0, 6.0, 15.0);
        let s = Spent::between(&roles, &a, &b, 1_000);
        assert_eq!(s.coordinator_us, None);
        assert_eq!(s.broker_us, None);
        assert!((s.total_us() - 6_000.0).abs() < 1e-9);
        assert_eq!(rate_without_coordinator(&s, 2.0), None);
        assert_eq!(coordinator_budget_us(&s, 2.0, 0.8, 1.0), None);
    }

    #[test]
    fn this_process_and_the_machine_are_read_from_proc() {
        let roles = Roles {
            coordinator: None,
            broker: None,
            clients: std::process::id().to_string(),
        };
        let a = roles.mark();
        // Burn CPU until this process's counter moves (10 ms ticks), however
        // busy the machine is; give up only after a minute.
        let t = Instant::now();
        let mut x = 0u64;
        while proc_usage("self").0 <= a.clients + 0.02
            && t.elapsed() < std::time::Duration::from_secs(60)
        {
            for _ in 0..100_000 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            }
        }
        std::hint::black_box(x);
        let b = roles.mark();
        let s = Spent::between(&roles, &a, &b, 1);
        assert!(s.clients_us > 0.0, "this process's CPU time moved");
        assert!(s.machine_busy_cores > 0.0, "the machine was busy");
        let (_, hwm) = proc_usage("self");
        assert!(hwm > 0, "peak RSS of this process is read");
        assert_eq!(proc_usage("0"), (0.0, 0), "no such process: zeros");
    }
}
