"""deploy/kubernetes/ holds manifests a cluster accepts: checked without a cluster.

The built-in kinds (Deployment, Service, PersistentVolumeClaim) against the Kubernetes API's
own schemas (``kubernetes-validate``, strict: an unknown field is an error); the inference
pool's kinds against the fields their CRDs require.  And what the Deployment must say for
quantad: its probes on ``/health``, a grace period above the drain's, the journal on a volume.
"""

from __future__ import annotations

import jsonschema
import pytest
import yaml

from tests.conftest import REPO

K8S = "1.33.0"
DIR = REPO / "deploy" / "kubernetes"
PORT = {"type": "object", "required": ["number"], "properties": {"number": {"type": "integer", "minimum": 1}}}
# the fields the InferencePool v1 and InferenceObjective v1alpha2 CRDs require (gateway-api-inference-extension)
CRDS = {
    ("inference.networking.k8s.io/v1", "InferencePool"): {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "spec": {
                "type": "object",
                "required": ["selector", "targetPorts", "endpointPickerRef"],
                "additionalProperties": False,
                "properties": {
                    "selector": {"type": "object", "required": ["matchLabels"]},
                    "targetPorts": {"type": "array", "minItems": 1, "maxItems": 8, "items": PORT},
                    "endpointPickerRef": {
                        "type": "object",
                        "required": ["name"],
                        "properties": {"name": {"type": "string"}, "port": PORT, "failureMode": {"type": "string"}},
                    },
                },
            }
        },
    },
    ("inference.networking.x-k8s.io/v1alpha2", "InferenceObjective"): {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "spec": {
                "type": "object",
                "required": ["poolRef"],
                "additionalProperties": False,
                "properties": {
                    "priority": {"type": "integer"},
                    "poolRef": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}},
                },
            }
        },
    },
}


def _docs() -> list[dict]:
    out = []
    for path in sorted(DIR.glob("*.yaml")):
        out += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return out


def test_every_manifest_is_valid():
    kv = pytest.importorskip("kubernetes_validate")
    kinds = []
    for doc in _docs():
        kinds.append(doc["kind"])
        schema = CRDS.get((doc["apiVersion"], doc["kind"]))
        if schema is not None:
            jsonschema.validate(doc, schema)
        else:
            kv.validate(doc, K8S, strict=True)
    assert sorted(kinds) == ["Deployment", "InferenceObjective", "InferenceObjective", "InferencePool",
                             "PersistentVolumeClaim", "Service"]  # fmt: skip


def test_the_deployment_says_what_quantad_needs():
    docs = {d["kind"]: d for d in _docs()}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (box,) = pod["containers"]
    args = box["args"]
    assert args[:3] == ["serve", "--http", "0.0.0.0:8000"] and "--http-token-file" in args
    grace = float(args[args.index("--grace-s") + 1])
    assert pod["terminationGracePeriodSeconds"] > grace  # the drain ends before the kubelet's SIGKILL
    for probe in ("readinessProbe", "livenessProbe"):
        assert box[probe]["httpGet"]["path"] == "/health"
    state = args[args.index("--state-dir") + 1]
    mounts = {m["mountPath"]: m["name"] for m in box["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "persistentVolumeClaim" in volumes[mounts[state]]  # the journal outlives the pod
    assert "secret" in volumes[mounts["/etc/quantad"]]
    pool = docs["InferencePool"]["spec"]
    assert pool["selector"]["matchLabels"] == docs["Service"]["spec"]["selector"]
    assert pool["targetPorts"][0]["number"] == box["ports"][0]["containerPort"]


def test_each_objective_has_its_nice_in_the_pod():
    """The pool orders objectives by priority, a pod by nice: each objective's is mapped, higher priority lower nice."""
    docs = _docs()
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    nice = dict(args[i + 1].split("=") for i, a in enumerate(args) if a == "--objective-nice")
    objectives = {d["metadata"]["name"]: d["spec"]["priority"] for d in docs if d["kind"] == "InferenceObjective"}
    assert {name: int(n) for name, n in nice.items()} == {name: max(-20, min(19, -p)) for name, p in objectives.items()}
