use super::*;

const ROOT: &str = "0101010101010101010101010101010101010101010101010101010101010101";

fn parse(s: &str) -> Result<AgentConfig, ConfigError> {
    AgentConfig::from_parts(toml::from_str(s).unwrap(), &Overrides::default())
}

#[test]
fn config_minimal_file_and_defaults() {
    let c = parse(&format!(
        "device_id = \"dev-1\"\nhardware = \"rpi4\"\n[trust]\nroots = [\"{ROOT}\"]\n[labels]\nregion = \"eu\"\n"
    ))
    .unwrap();
    assert_eq!(c.device.as_str(), "dev-1");
    assert_eq!(c.fleet.as_str(), "default");
    assert_eq!(c.broker.port, 1883);
    assert_eq!(c.labels.len(), 1);
    assert!(matches!(c.backend, BackendConfig::Slots { .. }));
    assert_eq!(c.probation, Duration::from_secs(60));
}

// MQTT-8: a device's broker user is its id; a password file is enough.
#[test]
fn config_broker_login_defaults_to_the_device_id() {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "device-password-000\n").unwrap();
    let f = || -> FileConfig {
        toml::from_str(&format!(
            "device_id = \"dev-1\"\nhardware = \"rpi4\"\n[trust]\nroots = [\"{ROOT}\"]\n"
        ))
        .unwrap()
    };
    let over = Overrides {
        password_file: Some(pw.clone()),
        ..Overrides::default()
    };
    let c = AgentConfig::from_parts(f(), &over).unwrap();
    assert_eq!(
        c.credentials.as_ref(),
        Some(&("dev-1".to_string(), "device-password-000".to_string()))
    );
    let over = Overrides {
        password_file: Some(pw),
        username: Some("other".into()),
        ..Overrides::default()
    };
    let c = AgentConfig::from_parts(f(), &over).unwrap();
    assert_eq!(c.credentials.as_ref().map(|c| c.0.as_str()), Some("other"));
    assert_eq!(
        AgentConfig::from_parts(f(), &Overrides::default())
            .unwrap()
            .credentials,
        None
    );
}

#[test]
fn config_overrides_win_and_presets_fill_commands() {
    let over = Overrides {
        device_id: Some("dev-2".into()),
        broker: Some("mqtt://[::1]:1999".into()),
        ..Overrides::default()
    };
    let f: FileConfig = toml::from_str(&format!(
        "device_id = \"dev-1\"\nhardware = \"rpi4\"\n[trust]\nroots = [\"{ROOT}\"]\n\
         [install]\nbackend = \"command\"\n[install.command]\npreset = \"rauc\"\ncommit = [\"true\"]\n"
    ))
    .unwrap();
    let c = AgentConfig::from_parts(f, &over).unwrap();
    assert_eq!(c.device.as_str(), "dev-2");
    assert_eq!(c.broker.port, 1999);
    let BackendConfig::Command {
        install,
        commit,
        rollback,
        ..
    } = c.backend
    else {
        panic!("command backend");
    };
    assert_eq!(install, ["rauc", "install", "{artifact}"]);
    assert_eq!(commit, ["true"]);
    assert_eq!(rollback, ["rauc", "status", "mark-bad"]);
}

#[test]
fn config_errors_name_the_field() {
    let base = format!("hardware = \"rpi4\"\n[trust]\nroots = [\"{ROOT}\"]\n");
    let cases = [
        (base.clone(), "device_id"),
        (format!("device_id = \"Bad/Id\"\n{base}"), "device_id"),
        (
            "device_id = \"d\"\nhardware = \"rpi4\"\n".to_string(),
            "trust.roots",
        ),
        (
            format!("device_id = \"d\"\n{base}threshold = 2\n"),
            "trust.threshold",
        ),
        (
            format!("device_id = \"d\"\nbroker = \"http://x\"\n{base}"),
            "broker",
        ),
        (
            format!("device_id = \"d\"\nheartbeat = \"soon\"\n{base}"),
            "heartbeat",
        ),
        (
            format!("device_id = \"d\"\n{base}[install]\nbackend = \"floppy\"\n"),
            "install.backend",
        ),
        (
            format!("device_id = \"d\"\n{base}[[probes]]\nkind = \"process\"\n"),
            "probes",
        ),
        (
            format!(
                "device_id = \"d\"\n{base}[install]\nbackend = \"command\"\n[install.command]\npreset = \"x\"\n"
            ),
            "install.command.preset",
        ),
    ];
    for (text, field) in cases {
        match parse(&text) {
            Err(ConfigError::Invalid { field: f, .. }) => assert_eq!(f, field, "{text}"),
            other => panic!("{text}: {other:?}"),
        }
    }
    assert!(
        toml::from_str::<FileConfig>("nonsense = 1").is_err(),
        "unknown keys are refused"
    );
}
