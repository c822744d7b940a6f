use super::*;

fn p(instance: &str, state: State, since: u64) -> Presence {
    Presence {
        state,
        fleet: "plant".into(),
        instance: instance.into(),
        epoch: 3,
        since,
        at: since,
    }
}

fn heard(presence: Presence, retained: bool) -> Heard {
    Heard { presence, retained }
}

const WINDOW: Duration = Duration::from_secs(25);

#[test]
fn presence_claim_goes_at_once_when_nobody_or_only_itself_is_there() {
    let me = p("aaaa", State::Starting, 100);
    // Nobody: our own starting comes back first.
    let mut c = Claim::new(me.clone(), WINDOW);
    assert_eq!(
        c.on_heard(heard(me.clone(), false), 0),
        Verdict::Go { stale: None }
    );
    // An offline presence of another instance.
    let mut c = Claim::new(me.clone(), WINDOW);
    let v = c.on_heard(heard(p("bbbb", State::Offline, 50), true), 0);
    assert_eq!(v, Verdict::Wait { until_ms: None });
    assert_eq!(
        c.on_heard(heard(me.clone(), false), 0),
        Verdict::Go { stale: None }
    );
    // Our own online of the run before (a restart of the same state dir).
    let mut c = Claim::new(me.clone(), WINDOW);
    c.on_heard(heard(p("aaaa", State::Online, 50), true), 0);
    assert_eq!(c.on_heard(heard(me, false), 0), Verdict::Go { stale: None });
}

#[test]
fn presence_claim_refuses_when_another_instance_answers() {
    let me = p("aaaa", State::Starting, 100);
    let other = p("bbbb", State::Online, 50);
    let mut c = Claim::new(me.clone(), WINDOW);
    c.on_heard(heard(other.clone(), true), 0);
    assert_eq!(
        c.on_heard(heard(me, false), 10),
        Verdict::Wait {
            until_ms: Some(25_010)
        }
    );
    // Its answer to our starting: alive.
    let fresh = other.with(State::Online, 101);
    assert_eq!(
        c.on_heard(heard(fresh.clone(), false), 20),
        Verdict::Taken(fresh)
    );
}

#[test]
fn presence_claim_takes_over_from_an_instance_that_is_gone() {
    let me = p("aaaa", State::Starting, 100);
    let other = p("bbbb", State::Online, 50);
    // Silent for the whole window: stale, taken over, and said so.
    let mut c = Claim::new(me.clone(), WINDOW);
    c.on_heard(heard(other.clone(), true), 0);
    c.on_heard(heard(me.clone(), false), 0);
    assert_eq!(
        c.on_deadline(24_999),
        Verdict::Wait {
            until_ms: Some(25_000)
        }
    );
    assert_eq!(
        c.on_deadline(25_000),
        Verdict::Go {
            stale: Some(other.clone())
        }
    );
    // Its Last Will arrives while we watch: at once.
    let mut c = Claim::new(me.clone(), WINDOW);
    c.on_heard(heard(other.clone(), true), 0);
    c.on_heard(heard(me, false), 0);
    let will = other.with(State::Offline, 60);
    assert_eq!(
        c.on_heard(heard(will, false), 5),
        Verdict::Go { stale: None }
    );
}

#[test]
fn presence_claim_ignores_other_starters() {
    let me = p("aaaa", State::Starting, 100);
    let mut c = Claim::new(me.clone(), WINDOW);
    c.on_heard(heard(p("cccc", State::Starting, 100), false), 0);
    assert_eq!(c.on_heard(heard(me, false), 0), Verdict::Go { stale: None });
}

#[test]
fn presence_guard_answers_starters_and_keeps_the_first_active() {
    let g = Guard::new(p("aaaa", State::Online, 100));
    assert_eq!(
        g.on_heard(&heard(p("aaaa", State::Online, 100), false)),
        Guarded::Nothing
    );
    for state in [State::Starting, State::Offline] {
        assert_eq!(
            g.on_heard(&heard(p("bbbb", state, 200), false)),
            Guarded::Republish
        );
        // Our own will of an earlier connection overwrote the retained presence.
        assert_eq!(
            g.on_heard(&heard(p("aaaa", state, 100), false)),
            Guarded::Republish
        );
    }
    // The stale presence the claim took over from, as the session subscribes.
    assert_eq!(
        g.on_heard(&heard(p("bbbb", State::Online, 1), true)),
        Guarded::Republish
    );
    // Two active at once: the later one yields, the earlier says it again.
    let later = p("bbbb", State::Online, 200);
    assert_eq!(g.on_heard(&heard(later, false)), Guarded::Republish);
    let earlier = p("bbbb", State::Online, 99);
    assert_eq!(
        g.on_heard(&heard(earlier.clone(), false)),
        Guarded::Yield(earlier)
    );
    // Same second: the instance id decides, the same way on both sides.
    let b = Guard::new(p("bbbb", State::Online, 100));
    assert_eq!(
        g.on_heard(&heard(b.me().clone(), false)),
        Guarded::Republish
    );
    assert!(matches!(
        b.on_heard(&heard(g.me().clone(), false)),
        Guarded::Yield(_)
    ));
}

#[test]
fn presence_instance_id_is_kept_in_the_state_dir() {
    let dir = tempfile::tempdir().unwrap();
    let a = instance_id(dir.path()).unwrap();
    assert_eq!(a.len(), 16);
    assert_eq!(instance_id(dir.path()).unwrap(), a);
    let other = tempfile::tempdir().unwrap();
    assert_ne!(instance_id(other.path()).unwrap(), a);
    std::fs::write(dir.path().join("instance"), "zz\n").unwrap();
    assert!(instance_id(dir.path()).is_err());
}

#[test]
fn presence_json_shape() {
    let json = String::from_utf8(p("aaaa", State::Online, 100).to_json()).unwrap();
    assert_eq!(
        json,
        r#"{"state":"online","fleet":"plant","instance":"aaaa","epoch":3,"since":100,"at":100}"#
    );
    assert!(parse(b"online").is_none());
    assert_eq!(parse(json.as_bytes()), Some(p("aaaa", State::Online, 100)));
}
