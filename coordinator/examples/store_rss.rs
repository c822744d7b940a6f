//! The store alone at fleet scale: the writes of a fleet benchmark (a device
//! record per Hello, then four waves of five reports and a device record per
//! device), flushed every 512 records as the server loop does, against a real
//! sled database in a temporary directory. It prints the resident set every
//! 250,000 records and the peak, beside the baseline of the same run (the
//! resident set before the store opened), so a change to the journal or the
//! fold shows its memory in a minute instead of a ten-minute fleet run.
//!
//! `cargo run --release -p swell-coordinator --example store_rss -- 1000000 [cache MiB]`
#![allow(clippy::unwrap_used)]

use std::time::Instant;
use swell_coordinator::fleet::interner::Interner;
use swell_coordinator::fleet::registry::{DeviceRecord, Enrollment};
use swell_coordinator::store::{DiskStore, Store, StoredReport, Tuning};
use swell_protocol::crypto::PublicKey;
use swell_protocol::messages::{Hello, Phase};
use swell_protocol::{DeviceId, FleetId, ReleaseId, RolloutId};

/// A field of /proc/self/status in bytes (Linux; 0 elsewhere).
fn status_bytes(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

struct Run {
    store: DiskStore,
    base: u64,
    start: Instant,
    written: u64,
    peak: u64,
    rate: u64,
}

impl Run {
    fn wrote(&mut self) {
        self.written += 1;
        if self.written.is_multiple_of(512) {
            self.store.flush().unwrap();
            if self.rate > 0 {
                let due =
                    std::time::Duration::from_secs_f64(self.written as f64 / self.rate as f64);
                if let Some(ahead) = due.checked_sub(self.start.elapsed()) {
                    std::thread::sleep(ahead);
                }
            }
        }
        if self.written.is_multiple_of(100_000) {
            let rss = status_bytes("VmRSS:");
            self.peak = self.peak.max(rss);
            println!(
                "{:>8.1} s {:>10} records  rss {:>6} MiB (+{} MiB)",
                self.start.elapsed().as_secs_f64(),
                self.written,
                rss >> 20,
                rss.saturating_sub(self.base) >> 20
            );
        }
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let cache_mib: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(16);
    let fold_after: u64 = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(swell_coordinator::store::FOLD_AFTER_RECORDS);
    // Records per second, as the fleet benchmark's coordinator writes them
    // (0: as fast as the store takes them).
    let rate: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(0);
    let dir = tempfile::tempdir().unwrap();
    // As the coordinator does: freed heap pages go back to the kernel.
    let cancel = tokio_util::sync::CancellationToken::new();
    swell_coordinator::heap_trim::spawn_trimmer(
        swell_coordinator::heap_trim::TRIM_EVERY,
        cancel.clone(),
    );
    let base = status_bytes("VmRSS:");
    let store = DiskStore::open_tuned(
        dir.path(),
        Tuning {
            cache_bytes: cache_mib << 20,
            fold_after_records: fold_after,
            ..Tuning::default()
        },
    )
    .unwrap();
    let mut interner = Interner::default();
    let fleet = FleetId::new("bench").unwrap();
    let mut record = |i: u32, seq: u64| {
        let hello = Hello {
            device: DeviceId::new(format!("dev-{i:06}")).unwrap(),
            fleet: fleet.clone(),
            key: PublicKey([(i % 251) as u8; 32]),
            labels: vec![],
            hardware: "sim".into(),
            agent_version: "1.0.0".into(),
            proto_min: 3,
            proto_max: 3,
            boot: 1,
            running: Some(ReleaseId::of_body(b"fw-1.0.0")),
            counter_floor: 0,
            incarnation: 1,
            enrollment_proof: None,
            confirmed: false,
        };
        let mut rec = DeviceRecord::from_hello(
            &hello,
            1,
            1_800_000_000,
            Enrollment::Approved,
            &mut interner,
        );
        rec.last_seq = seq;
        rec
    };
    let mut run = Run {
        store,
        base,
        start: Instant::now(),
        written: 0,
        peak: base,
        rate,
    };
    println!(
        "{n} devices, sled cache {cache_mib} MiB, fold after {fold_after}, baseline rss {} MiB",
        base >> 20
    );
    for i in 0..n {
        run.store.put_device(&record(i, 0)).unwrap();
        run.wrote();
    }
    let enrolled = run.start.elapsed();
    let rollout = RolloutId::new("r-bench").unwrap();
    let release = ReleaseId::of_body(b"fw-2.0.0");
    let phases = [
        Phase::Downloading,
        Phase::Downloaded,
        Phase::Installing,
        Phase::Probation,
        Phase::Committed,
    ];
    // Waves of 1, 10, 50 and 100 % over a device order that is not key order,
    // as bucketing by hash gives.
    let order = |k: u32| (u64::from(k) * 2_654_435_761 % u64::from(n)) as u32;
    let mut from = 0;
    for pct in [1u32, 10, 50, 100] {
        let to = (u64::from(n) * u64::from(pct) / 100) as u32;
        for (p, phase) in phases.iter().enumerate() {
            for k in from..to {
                let i = order(k);
                let id = DeviceId::new(format!("dev-{i:06}")).unwrap();
                let report = StoredReport {
                    release,
                    phase: phase.clone(),
                    seq: p as u64 + 2,
                    epoch: 1,
                };
                run.store.put_report(&rollout, &id, &report).unwrap();
                run.wrote();
            }
        }
        for k in from..to {
            run.store.put_device(&record(order(k), 6)).unwrap();
            run.wrote();
        }
        from = to;
    }
    run.store.flush().unwrap();
    let total = run.start.elapsed();
    drop(run.store);
    let hwm = status_bytes("VmHWM:");
    println!(
        "enrollment {:.1} s, all {:.1} s, {} records; peak rss {} MiB (sampled {} MiB), \
         {} B per device over the baseline",
        enrolled.as_secs_f64(),
        total.as_secs_f64(),
        run.written,
        hwm >> 20,
        run.peak >> 20,
        hwm.saturating_sub(base) / u64::from(n.max(1))
    );
}
