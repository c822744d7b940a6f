#!/usr/bin/env python3
"""Seeds fuzz/corpus/* from the golden vectors (protocol/tests/golden/v1, v2, v3).

Envelope fixtures seed `envelope` and `pipeline`; their payloads (cut out of the
envelope per docs/protocol.md) seed `payloads` with the type byte in front;
threshold fixtures seed `threshold` and, as bodies, `payloads`.
Run after blessing new golden vectors; the output is committed."""
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent
GOLDEN = ROOT.parent / "protocol/tests/golden"
CORPUS = ROOT / "corpus"

# payload type byte used by fuzz_targets/payloads.rs
ENVELOPE_KINDS = {1: 0, 2: 1, 3: 2, 4: 3, 5: 4, 6: 5, 7: 8, 8: 9}


def varint(b, i):
    out, shift = 0, 0
    while True:
        byte = b[i]
        i += 1
        out |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return out, i


def envelope_payload(b):
    _, i = varint(b, 0)  # proto
    kind, i = varint(b, i)
    i += 8  # key id
    for _ in range(4):  # epoch, seq, issued_at, expires_at
        _, i = varint(b, i)
    tag, i = varint(b, i)
    if tag in (1, 2):
        n, i = varint(b, i)
        i += n
    n, i = varint(b, i)
    return kind, b[i:i + n]


def threshold_body(b):
    kind, i = varint(b, 0)
    n, i = varint(b, i)
    return kind, b[i:i + n]


def write(target, name, data):
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


for f in sorted(GOLDEN.glob("v*/*.bin")):
    b = f.read_bytes()
    # v1 keeps its names; later versions' fixtures of the same name differ.
    version = f.parent.name
    name = "golden-" + ("" if version == "v1" else version + "-") + f.stem
    if f.stem in ("release", "keylist"):
        write("threshold", name, b)
        kind, body = threshold_body(b)
        write("payloads", name, bytes([6 if kind == 16 else 7]) + body)
        continue
    write("envelope", name, b)
    if f.stem == "manifest":
        write("pipeline", name, b)
    kind, payload = envelope_payload(b)
    if kind in ENVELOPE_KINDS:
        write("payloads", name, bytes([ENVELOPE_KINDS[kind]]) + payload)

for name, text in [("eq", "hw=rev3"), ("in", "region in (eu,us),!beta"), ("mix", "a,b!=c,d notin (x)")]:
    write("selector", name, text.encode())
for name, text in [("report", "swell/v1/dev/rpi-0042/report"), ("manifest", "swell/v1/fleet/f/manifest/r"),
                   ("status", "swell/v1/ops/f/rollout/r/status")]:
    write("topics", name, text.encode())
# Operator commands (fuzz_targets/ops.rs): plain, a create, a signed one.
OPS_TOPIC = "swell/v1/ops/plant/cmd"
for name, text in [
    ("pause", '{"op":"pause","rollout":"fw-1","id":"7","reply_to":"swell-ops/ann/cli/replies"}'),
    ("devices", '{"op":"devices","selector":"region in (eu,us)","online":true,"limit":5}'),
    ("approve", '{"op":"approve","device":"rpi-0042","key":"c06988fc2e7a9448"}'),
    ("reject", '{"op":"reject","pending":true}'),
    ("create", '{"op":"create","spec":{"rollout":"fw-1","release":"00","waves":["5%","100%"],'
               '"selector":"hw=rpi4","bake":"1m","install_timeout":"10m","policy":"rollback",'
               '"maintenance":{"tz":"Europe/Berlin","windows":["02:00-04:00"]}}}'),
    ("signed", '{"signed":"{\\"op\\":\\"status\\",\\"issued_at\\":1795651201,\\"nonce\\":\\"n1\\",'
               '\\"to\\":\\"' + OPS_TOPIC + '\\"}","key_id":"0000000000000000","sig":"' + "00" * 64 + '"}'),
]:
    write("ops", name, text.encode())
print("seeded", sum(1 for _ in CORPUS.rglob("*") if _.is_file()), "files")
