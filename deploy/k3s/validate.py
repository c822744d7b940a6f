#!/usr/bin/env python3
"""Validates deploy/k3s offline: renders the kustomization with `kubectl
kustomize`, checks every object against the Kubernetes schemas with
`kubernetes-validate --strict`, and checks the example Rollout against the
CRD's own openAPIV3Schema (which kubernetes-validate does not know).

Usage: python3 deploy/k3s/validate.py [kubernetes version, default 1.33]
"""

import pathlib
import subprocess
import sys
import tempfile

import jsonschema
import yaml

HERE = pathlib.Path(__file__).resolve().parent


def k8s_schema(s):
    """OpenAPI v3 (as a CRD writes it) to JSON Schema: `nullable` becomes a
    null type; Kubernetes extensions are dropped."""
    if isinstance(s, list):
        return [k8s_schema(x) for x in s]
    if not isinstance(s, dict):
        return s
    out = {}
    for k, v in s.items():
        if k.startswith("x-kubernetes-") or k == "nullable":
            continue
        out[k] = k8s_schema(v)
    if s.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def main():
    version = sys.argv[1] if len(sys.argv) > 1 else "1.33"
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(HERE)], check=True, capture_output=True, text=True
    ).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs)
    print(f"rendered {len(docs)} objects: {', '.join(kinds)}")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(rendered)
    r = subprocess.run(
        ["kubernetes-validate", "--strict", "--quiet", "-k", version, f.name],
        capture_output=True,
        text=True,
    )
    sys.stdout.write(r.stdout + r.stderr)
    if r.returncode != 0 or "ERROR" in r.stdout + r.stderr:
        sys.exit(f"kubernetes-validate failed ({r.returncode})")
    for d in docs:
        if d["kind"] in ("Deployment",):
            for c in d["spec"]["template"]["spec"]["containers"]:
                sc = c.get("securityContext", {})
                assert sc.get("readOnlyRootFilesystem") is True, c["name"]
                assert sc.get("allowPrivilegeEscalation") is False, c["name"]
                assert "limits" in c.get("resources", {}), c["name"]
    crd = next(d for d in docs if d["kind"] == "CustomResourceDefinition")
    schema = k8s_schema(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    for example in sorted((HERE / "examples").glob("rollout*.yaml")):
        obj = yaml.safe_load(example.read_text())
        jsonschema.validate(obj, schema)
        print(f"{example.name}: valid Rollout")
    # A wrong field type must be caught, or this check proves nothing.
    bad = {"apiVersion": "swell.dev/v1alpha1", "kind": "Rollout",
           "metadata": {"name": "x"}, "spec": {"release": "00", "waves": "all"}}
    try:
        jsonschema.validate(bad, schema)
    except jsonschema.ValidationError:
        pass
    else:
        sys.exit("the CRD schema accepted waves as a string")
    print(f"deploy/k3s: all objects valid against Kubernetes {version}")


if __name__ == "__main__":
    main()
