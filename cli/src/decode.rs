//! `swell decode`: show what a message file holds. The payload is shown only
//! after its signature checks out (SIG-3); without keys only the header (or, for
//! threshold objects, the signer ids) is shown.

use anyhow::{Context as _, Result, bail};
use clap::Args;
use serde_json::{Value, json};
use std::path::PathBuf;
use swell_coordinator::keyfile::read_public;
use swell_protocol::envelope::{Message, MessageKind, UnverifiedEnvelope};
use swell_protocol::messages::*;
use swell_protocol::threshold::{ThresholdMessage, ThresholdSigned};
use swell_protocol::{PublicKey, version};

#[derive(Debug, Args)]
pub struct DecodeArgs {
    /// File with the message bytes (binary, or hex with --hex).
    file: PathBuf,
    /// The file holds hex text.
    #[arg(long)]
    hex: bool,
    /// Key file(s) to verify with: the signer for envelopes, the trusted keys for
    /// threshold objects.
    #[arg(long = "key", short)]
    keys: Vec<PathBuf>,
    /// Signatures needed for a threshold object.
    #[arg(long, default_value_t = 1)]
    threshold: u8,
    /// Verify as of this Unix time instead of now (for expired fixtures).
    #[arg(long)]
    now: Option<u64>,
}

pub fn run(args: DecodeArgs) -> Result<()> {
    let raw = std::fs::read(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let bytes = if args.hex {
        let text = String::from_utf8(raw).context("--hex file is not text")?;
        hex::decode(text.trim()).context("--hex file is not hex")?
    } else {
        raw
    };
    let keys: Vec<PublicKey> = args
        .keys
        .iter()
        .map(|p| read_public(p).map(|(_, k)| k))
        .collect::<Result<_, _>>()?;
    let now = match args.now {
        Some(n) => n,
        None => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .context("system clock is before 1970")?
            .as_secs(),
    };
    let out = match UnverifiedEnvelope::parse(&bytes) {
        Ok(env) => envelope(&env, &keys, now)?,
        Err(env_err) => match ThresholdSigned::decode(&bytes) {
            Ok(obj) => threshold(&obj, &keys, args.threshold)?,
            Err(t_err) => bail!("neither an envelope ({env_err}) nor a threshold object ({t_err})"),
        },
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

fn verify_as<T: Message + serde::Serialize>(
    env: &UnverifiedEnvelope<'_>,
    key: &PublicKey,
    now: u64,
) -> Result<Value> {
    let v = env
        .verify::<T>(key, now)
        .map_err(|e| anyhow::anyhow!("{} ({})", e, e.reason()))?;
    Ok(serde_json::to_value(&v.body)?)
}

pub fn envelope(env: &UnverifiedEnvelope<'_>, keys: &[PublicKey], now: u64) -> Result<Value> {
    let kind = env.kind();
    let mut out = json!({
        "format": "envelope",
        "kind": kind.map_or_else(|| format!("unknown ({})", env.header.kind), |k| k.name().to_string()),
        "header": env.header,
        "understood": version::understands(&env.header),
    });
    let Some(key) = keys.iter().find(|k| k.key_id() == env.header.key_id) else {
        out["verified"] = json!(false);
        if !keys.is_empty() {
            bail!(
                "signed by key {}, which is not among the keys given",
                env.header.key_id
            );
        }
        return Ok(out);
    };
    let payload = match kind {
        Some(MessageKind::Manifest) => verify_as::<Manifest>(env, key, now)?,
        Some(MessageKind::Beacon) => verify_as::<Beacon>(env, key, now)?,
        Some(MessageKind::Directive) => verify_as::<DeviceDirective>(env, key, now)?,
        Some(MessageKind::Hello) => verify_as::<Hello>(env, key, now)?,
        Some(MessageKind::Report) => verify_as::<Report>(env, key, now)?,
        Some(MessageKind::Unsupported) => verify_as::<Unsupported>(env, key, now)?,
        Some(MessageKind::SessionNote) => verify_as::<SessionNote>(env, key, now)?,
        Some(MessageKind::Enrolled) => verify_as::<Enrolled>(env, key, now)?,
        Some(k @ (MessageKind::Release | MessageKind::KeyList)) => {
            bail!(
                "a {} travels as a threshold object, not in an envelope",
                k.name()
            )
        }
        None => bail!(
            "message kind {} (protocol {}) is not known to this version",
            env.header.kind,
            env.header.proto
        ),
    };
    out["verified"] = json!(true);
    out["payload"] = payload;
    Ok(out)
}

fn verify_threshold<T: ThresholdMessage + serde::Serialize>(
    obj: &ThresholdSigned,
    keys: &[PublicKey],
    t: u8,
) -> Result<Value> {
    let body: T = obj
        .verify(keys, t)
        .map_err(|e| anyhow::anyhow!("{} ({})", e, e.reason()))?;
    Ok(serde_json::to_value(&body)?)
}

pub fn threshold(obj: &ThresholdSigned, keys: &[PublicKey], t: u8) -> Result<Value> {
    let kind = MessageKind::from_raw(obj.kind);
    let mut out = json!({
        "format": "threshold",
        "kind": kind.map_or_else(|| format!("unknown ({})", obj.kind), |k| k.name().to_string()),
        "id": obj.id().to_string(),
        "signed_by": obj.sigs.iter().map(|s| s.key_id.to_string()).collect::<Vec<_>>(),
    });
    if keys.is_empty() {
        out["verified"] = json!(false);
        return Ok(out);
    }
    let body = match kind {
        Some(MessageKind::Release) => verify_threshold::<Release>(obj, keys, t)?,
        Some(MessageKind::KeyList) => verify_threshold::<KeyList>(obj, keys, t)?,
        _ => bail!("kind {} is not a threshold object", obj.kind),
    };
    out["verified"] = json!(true);
    out["body"] = body;
    Ok(out)
}
