"""The cluster path as written: every file in infra/ against the real schemas of what applies it
(KubeRay's CRDs, Kubernetes' OpenAPI, Ray's cluster-launcher validator, hadolint), the rules those
schemas cannot say (sizes, accounts, versions, pins), and the nightly CronJob's shell logic run by
bash against a fake `kubectl` that answers with recorded `kubectl get rayjobs -o json` lists."""
from __future__ import annotations

import copy
import functools
import json
import os
import re
import shlex
import subprocess
import sys
import zoneinfo
from importlib import metadata
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement

from pipeline.config import load_config

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
KUBERAY = REPO / "infra" / "kuberay"
LAUNCHER = REPO / "infra" / "cluster-launcher"
CRDS = REPO / "tests" / "data" / "kuberay-crds"
CRD_VERSIONS = sorted(p.name for p in CRDS.iterdir() if p.is_dir())
KUBERNETES_VERSIONS = ["1.27.0", "1.31.0", kubernetes_validate.latest_version()]
KUBERAY_FILES = sorted(p.name for p in KUBERAY.glob("*.yaml"))
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.load_all(path.read_text(), Loader=Loader) if doc]


def all_kuberay_documents() -> list[tuple[str, dict]]:
    return [(name, doc) for name in KUBERAY_FILES for doc in documents(KUBERAY / name)]


def the(name: str) -> dict:
    (doc,) = documents(KUBERAY / name)
    return doc


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def pod_specs(doc: dict) -> list[dict]:
    """Every pod spec a manifest creates pods from."""
    if doc["kind"] in ("RayJob", "RayCluster"):
        spec = cluster_spec(doc)
        return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    if doc["kind"] == "CronJob":
        return [doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]]
    return []


def constraint_pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonical(name)] = version
    return pins


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# ---------------------------------------------------------------------------------------------
# KubeRay custom resources against the CRDs' openAPIV3Schema


@functools.lru_cache(maxsize=None)
def crd_schema(version: str, kind: str) -> dict:
    crd = yaml.load((CRDS / version / f"ray.io_{kind.lower()}s.yaml").read_text(), Loader=Loader)
    assert crd["spec"]["names"]["kind"] == kind
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return served["schema"]["openAPIV3Schema"]


def unknown_fields(value, schema: dict, path: str = "") -> list[str]:
    """Fields the API server would prune (drop silently): a typo in a manifest loses a setting."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    if isinstance(value, dict):
        properties, additional = schema.get("properties"), schema.get("additionalProperties")
        found = []
        for key, item in value.items():
            if properties is not None and key in properties:
                found += unknown_fields(item, properties[key], f"{path}.{key}")
            elif isinstance(additional, dict):
                found += unknown_fields(item, additional, f"{path}.{key}")
            elif properties is not None:
                found.append(f"{path}.{key}")
        return found
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [f for i, item in enumerate(value) for f in unknown_fields(item, schema["items"], f"{path}[{i}]")]
    return []


def crd_errors(doc: dict, version: str) -> list[str]:
    schema = crd_schema(version, doc["kind"])
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
              for e in jsonschema.Draft7Validator(schema).iter_errors(doc)]
    return errors + [f"{field}: unknown field (pruned)" for field in unknown_fields(doc, schema)]


@pytest.mark.parametrize("version", CRD_VERSIONS)
@pytest.mark.parametrize("name", ["rayjob.yaml", "raycluster.yaml"])
def test_kuberay_manifests_match_the_crds(name, version):
    doc = the(name)
    assert doc["apiVersion"] == "ray.io/v1"
    assert crd_errors(doc, version) == []


def test_the_crd_check_catches_wrong_types_and_misspelled_fields():
    doc = copy.deepcopy(the("rayjob.yaml"))
    doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "eight"
    doc["spec"]["submiterConfig"] = {"backoffLimit": 2}
    errors = crd_errors(doc, CRD_VERSIONS[0])
    assert any("replicas" in e and "integer" in e for e in errors), errors
    assert ".spec.submiterConfig: unknown field (pruned)" in errors


# ---------------------------------------------------------------------------------------------
# Kubernetes' own kinds against its OpenAPI schemas (strict: unknown fields are errors)


def configmap_from_file(name: str, key: str, path: Path) -> dict:
    """What `kubectl create configmap NAME --from-file=KEY=PATH` creates."""
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {key: path.read_text()}}


def configmap_commands(text: str) -> list[tuple[str, str, Path]]:
    """(name, key, file) of each `kubectl create configmap NAME --from-file=KEY=FILE` in a text
    whose FILE is one of the repository's (not a placeholder such as MY.yaml)."""
    return [(name, key, REPO / file) for name, key, file in
            re.findall(r"kubectl create configmap (\S+) --from-file=([^=\s]+)=(\S+)", text) if (REPO / file).is_file()]


def native_objects() -> list[tuple[str, dict]]:
    objects = [(f"{name}:{doc['kind']}", doc) for name, doc in all_kuberay_documents() if doc["apiVersion"] != "ray.io/v1"]
    for name in KUBERAY_FILES:
        for cm_name, key, path in configmap_commands((KUBERAY / name).read_text()):
            objects.append((f"{name}:ConfigMap {cm_name}", configmap_from_file(cm_name, key, path)))
    for name, doc in all_kuberay_documents():  # the pods inside the custom resources, as pod templates
        if doc["kind"] in ("RayJob", "RayCluster"):
            spec = cluster_spec(doc)
            for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
                objects.append((f"{name}:{group.get('groupName', 'head')} pods", {
                    "apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "gemlabel"},
                    "template": group["template"]}))
    return objects


@pytest.mark.parametrize("k8s_version", KUBERNETES_VERSIONS)
def test_kubernetes_objects_pass_the_strict_openapi_schemas(k8s_version):
    objects = native_objects()
    kinds = {doc["kind"] for _, doc in objects}
    assert {"ServiceAccount", "Role", "RoleBinding", "CronJob", "ConfigMap", "PodTemplate"} <= kinds
    for label, doc in objects:
        try:
            kubernetes_validate.validate(doc, k8s_version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{label} on Kubernetes {k8s_version}: {error.message} at {list(error.path)}")


def test_the_strict_kubernetes_check_catches_a_misplaced_field():
    cronjob = copy.deepcopy(next(doc for _, doc in all_kuberay_documents() if doc["kind"] == "CronJob"))
    cronjob["spec"]["timezone"] = cronjob["spec"].pop("timeZone")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(cronjob, KUBERNETES_VERSIONS[-1], strict=True)


# ---------------------------------------------------------------------------------------------
# What the schemas cannot say


def change_marked(text: str, field: str) -> list[bool]:
    return [("CHANGE" in line) for line in text.splitlines() if re.match(rf"\s*{field}:", line)]


@pytest.mark.parametrize("name", ["rayjob.yaml", "raycluster.yaml"])
def test_worker_groups_are_sized_for_their_job_and_marked_consistently(name):
    text = (KUBERAY / name).read_text()
    spec = cluster_spec(the(name))
    autoscaled = spec.get("enableInTreeAutoscaling", False)
    capacity = 0
    for group in spec["workerGroupSpecs"]:
        low, replicas, high = group["minReplicas"], group["replicas"], group["maxReplicas"]
        assert low <= replicas <= high, f"KubeRay clamps replicas {replicas} into [{low}, {high}]"
        if not autoscaled:  # nothing moves replicas: the three are one number, changed together
            assert low == replicas == high
        gpus = sum(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) for c in group["template"]["spec"]["containers"])
        capacity += (high if autoscaled else replicas) * gpus
    if autoscaled:
        assert change_marked(text, "maxReplicas") == [True] * len(spec["workerGroupSpecs"])
    else:
        for field in ("replicas", "minReplicas", "maxReplicas"):
            assert change_marked(text, field) == [True] * len(spec["workerGroupSpecs"]), field
    ((_, key, config_file),) = [c for c in configmap_commands(text) if c[0] == "gemlabel-job"]
    config = load_config(str(config_file))
    assert config.device == "cuda" and config.num_workers * config.gpus_per_worker <= capacity, (
        f"{config_file.name} asks for {config.num_workers} GPU workers; {name} can give {capacity} GPUs")


def test_every_service_account_the_pods_use_is_created():
    created = {doc["metadata"]["name"] for _, doc in all_kuberay_documents() if doc["kind"] == "ServiceAccount"}
    used = {spec["serviceAccountName"] for _, doc in all_kuberay_documents() for spec in pod_specs(doc)}
    bound = {s["name"] for _, doc in all_kuberay_documents() if doc["kind"] == "RoleBinding" for s in doc["subjects"]}
    assert used and used <= created and bound <= created, (used, bound, created)
    account = next(doc for _, doc in all_kuberay_documents() if doc["kind"] == "ServiceAccount"
                   and doc["metadata"]["name"] == "gemlabel")
    assert "eks.amazonaws.com/role-arn" in account["metadata"]["annotations"]
    assert "iam.gke.io/gcp-service-account" in (KUBERAY / "serviceaccount.yaml").read_text()  # the GKE variant


@pytest.mark.parametrize("name", ["rayjob.yaml", "raycluster.yaml"])
def test_the_job_config_is_a_configmap_not_baked_into_the_image(name):
    text = (KUBERAY / name).read_text()
    head = cluster_spec(the(name))["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v for v in head.get("volumes", [])}
    (mount,) = [m for m in head["containers"][0]["volumeMounts"] if "configMap" in volumes[m["name"]]]
    configmap = volumes[mount["name"]]["configMap"]["name"]
    ((_, key, config_file),) = [c for c in configmap_commands(text) if c[0] == configmap]
    assert load_config(str(config_file)).output.startswith("s3://")
    config_path = f"{mount['mountPath']}/{key}"
    submitted = [the(name)["spec"]["entrypoint"]] if name == "rayjob.yaml" else re.findall(r"-- (python -m .+)", text)
    for entrypoint in submitted:
        argv = shlex.split(entrypoint)
        assert argv[:3] == ["python", "-m", "jobs.label"] and argv[argv.index("--config") + 1] == config_path
    assert "/app/" not in text


def cronjob() -> dict:
    return next(doc for _, doc in all_kuberay_documents() if doc["kind"] == "CronJob")


def test_the_cronjob_is_pinned_scheduled_and_allowed_what_it_does():
    spec = cronjob()["spec"]
    zoneinfo.ZoneInfo(spec["timeZone"])
    assert spec["concurrencyPolicy"] == "Forbid"
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    # bitnami/kubectl is no longer published; a maintained kubectl image, pinned to a patch release
    assert re.fullmatch(r"(registry\.k8s\.io/kubectl:v|alpine/k8s:)1\.\d+\.\d+", container["image"]), container["image"]
    assert container["command"] == ["/bin/bash", "-c"]
    assert container["args"][0].startswith("set -euo pipefail\n")
    assert int({e["name"]: e["value"] for e in container["env"]}["KEEP_FINISHED"]) > 0
    (role,) = [doc for _, doc in all_kuberay_documents() if doc["kind"] == "Role"]
    verbs = {v for rule in role["rules"] if "rayjobs" in rule["resources"] for v in rule["verbs"]}
    assert {"list", "create", "delete"} <= verbs
    volume = pod["volumes"][0]["configMap"]["name"]
    ((_, key, manifest),) = [c for c in configmap_commands((KUBERAY / "cronjob.yaml").read_text()) if c[0] == volume]
    assert manifest == KUBERAY / "rayjob.yaml"
    assert f"kubectl create -f {container['volumeMounts'][0]['mountPath']}/{key}" in container["args"][0]


# ---------------------------------------------------------------------------------------------
# The CronJob's script, run by bash against a fake kubectl

FAKE_KUBECTL = '''\
#!{python}
"""kubectl as the CronJob's script uses it: `get rayjobs` answers from a recorded
`kubectl get rayjobs -o json` list (label selector, --sort-by and custom-columns applied as kubectl
does, `<none>` for a missing field); every call is logged."""
import json, os, sys

args = sys.argv[1:]
with open(os.environ["FAKE_KUBECTL_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")
if os.environ.get("FAKE_KUBECTL_FAIL"):
    sys.exit("error: You must be logged in to the server (Unauthorized)")


def field(item, path):
    for part in path.strip(".").split("."):
        if not isinstance(item, dict) or part not in item:
            return None
        item = item[part]
    return item


def option(name):
    for i, arg in enumerate(args):
        if arg == name:
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


if args[:2] == ["get", "rayjobs"]:
    items = json.load(open(os.environ["FAKE_KUBECTL_RAYJOBS"]))["items"]
    if option("-l"):
        key, value = option("-l").split("=")
        items = [i for i in items if i["metadata"].get("labels", {{}}).get(key) == value]
    if option("--sort-by"):
        items.sort(key=lambda i: field(i, option("--sort-by")) or "")
    output = option("-o")
    assert output.startswith("custom-columns="), output
    columns = [c.split(":", 1) for c in output.split("=", 1)[1].split(",")]
    rows = [] if "--no-headers" in args else [[name for name, _ in columns]]
    rows += [[str(field(i, path)) if field(i, path) not in (None, "") else "<none>" for _, path in columns] for i in items]
    for row in rows:
        print("   ".join(row))
elif args[:2] == ["create", "-f"] or args[:2] == ["delete", "rayjob"]:
    print(" ".join(args[:2]) + " ok")
else:
    sys.exit(f"fake kubectl: unexpected call {{args}}")
'''


def rayjob_item(name: str, created: str, deployment: str | None, job: str | None = None, app: str = "gemlabel") -> dict:
    item = {"apiVersion": "ray.io/v1", "kind": "RayJob",
            "metadata": {"name": name, "creationTimestamp": created, "labels": {"app": app}}}
    status = {k: v for k, v in (("jobDeploymentStatus", deployment), ("jobStatus", job)) if v is not None}
    if status:  # a RayJob KubeRay has not picked up yet has no status at all
        item["status"] = status
    return item


def run_cron_script(tmp_path: Path, items: list[dict], fail: bool = False) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    (container,) = cronjob()["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    kubectl = bin_dir / "kubectl"
    kubectl.write_text(FAKE_KUBECTL.format(python=sys.executable))
    kubectl.chmod(0o755)
    recorded = tmp_path / "rayjobs.json"
    recorded.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
    log = tmp_path / "kubectl.log"
    log.write_text("")
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_KUBECTL_LOG": str(log),
           "FAKE_KUBECTL_RAYJOBS": str(recorded), **{e["name"]: e["value"] for e in container.get("env", [])}}
    if fail:
        env["FAKE_KUBECTL_FAIL"] = "1"
    result = subprocess.run([*container["command"], container["args"][0]], env=env, capture_output=True, text=True,
                            timeout=60)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    return result, calls


def created(calls: list[list[str]]) -> bool:
    return ["create", "-f", "/manifests/rayjob.yaml"] in calls


def test_cron_script_creates_a_run_when_there_is_none(tmp_path):
    result, calls = run_cron_script(tmp_path, [])
    assert result.returncode == 0, result.stderr
    assert calls[0][:2] == ["get", "rayjobs"] and created(calls) and len(calls) == 2


@pytest.mark.parametrize("deployment, job", [
    (None, None), ("", None), ("Initializing", None), ("Running", "RUNNING"), ("Running", "SUCCEEDED"),
    ("Retrying", "FAILED"), ("Waiting", None), ("Suspending", "STOPPED"), ("Suspended", "STOPPED"),
    ("ValidationFailed", None)])
def test_cron_script_skips_while_an_earlier_run_is_not_finished(tmp_path, deployment, job):
    items = [rayjob_item("gemlabel-old1", "2026-11-20T02:00:00Z", "Complete", "SUCCEEDED"),
             rayjob_item("gemlabel-busy", "2026-11-21T02:00:00Z", deployment, job),
             rayjob_item("gemlabel-old2", "2026-11-19T02:00:00Z", "Failed", "FAILED")]
    result, calls = run_cron_script(tmp_path, items)
    assert result.returncode == 0, result.stderr
    assert not created(calls) and "gemlabel-busy" in result.stdout and "skipping" in result.stdout


@pytest.mark.parametrize("states", [[("Complete", "SUCCEEDED")], [("Failed", "FAILED")],
                                    [("Complete", "SUCCEEDED"), ("Failed", "STOPPED"), ("Failed", None)]])
def test_cron_script_creates_a_run_when_every_earlier_one_finished(tmp_path, states):
    items = [rayjob_item(f"gemlabel-{i}", f"2026-11-{10 + i}T02:00:00Z", d, j) for i, (d, j) in enumerate(states)]
    items.append(rayjob_item("someone-else", "2026-11-24T02:00:00Z", "Running", app="other"))  # not ours
    result, calls = run_cron_script(tmp_path, items)
    assert result.returncode == 0, result.stderr
    assert created(calls) and not any(c[0] == "delete" for c in calls)


def test_cron_script_keeps_the_newest_finished_runs_and_deletes_older_ones(tmp_path):
    keep = int({e["name"]: e["value"] for e in cronjob()["spec"]["jobTemplate"]["spec"]["template"]["spec"]
                ["containers"][0]["env"]}["KEEP_FINISHED"])
    days = list(range(1, keep + 4))  # keep + 3 finished runs, listed out of order
    items = [rayjob_item(f"gemlabel-day{d:02d}", f"2026-11-{d:02d}T02:00:00Z", "Complete" if d % 2 else "Failed")
             for d in reversed(days)]
    result, calls = run_cron_script(tmp_path, items)
    assert result.returncode == 0, result.stderr
    assert ["delete", "rayjob", "gemlabel-day01", "gemlabel-day02", "gemlabel-day03"] in calls
    assert created(calls) and calls.index(["delete", "rayjob", "gemlabel-day01", "gemlabel-day02",
                                           "gemlabel-day03"]) < len(calls) - 1

    items.append(rayjob_item("gemlabel-tonight", "2026-11-25T02:00:00Z", "Running", "RUNNING"))
    result, calls = run_cron_script(tmp_path, items)  # pruning goes on while a run is still going
    assert result.returncode == 0 and not created(calls)
    assert ["delete", "rayjob", "gemlabel-day01", "gemlabel-day02", "gemlabel-day03"] in calls


def test_cron_script_fails_when_kubectl_fails(tmp_path):
    result, calls = run_cron_script(tmp_path, [], fail=True)
    assert result.returncode != 0 and "Unauthorized" in result.stderr
    assert calls == [calls[0]] and calls[0][:2] == ["get", "rayjobs"]  # no second call: nothing created


# ---------------------------------------------------------------------------------------------
# The Ray cluster launcher


def launcher_config() -> dict:
    return yaml.safe_load((LAUNCHER / "aws.yaml").read_text())


def test_aws_launcher_config_passes_rays_validator():
    from ray.autoscaler._private.commands import prepare_config
    from ray.autoscaler._private.util import validate_config
    validate_config(prepare_config(launcher_config()))  # what `ray up` checks before touching AWS
    wrong = launcher_config()
    wrong["available_node_types"]["gpu_worker"]["max_worker"] = 4
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(wrong))


def test_launcher_profiles_carry_what_rays_autoscaler_and_gemlabel_need():
    config = launcher_config()
    profiles = {name: node["node_config"]["IamInstanceProfile"]["Arn"].rsplit("/", 1)[1]
                for name, node in config["available_node_types"].items()}
    head = json.loads((LAUNCHER / "head-iam-policy.json").read_text())
    worker = json.loads((LAUNCHER / "worker-iam-policy.json").read_text())

    def allowed(policy: dict) -> dict[str, list[str]]:
        actions = {}
        for statement in policy["Statement"]:
            assert statement["Effect"] == "Allow"
            resources = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
            for action in ([statement["Action"]] if isinstance(statement["Action"], str) else statement["Action"]):
                actions.setdefault(action, []).extend(resources)
        return actions

    head_actions, worker_actions = allowed(head), allowed(worker)
    assert head["Version"] == worker["Version"] == "2012-10-17"
    for action in ("ec2:RunInstances", "ec2:TerminateInstances", "ec2:CreateTags", "ec2:Describe*", "iam:PassRole"):
        assert action in head_actions, action
    # the head hands the workers their profile: PassRole on the workers' role
    assert [r.rsplit("/", 1)[1] for r in head_actions["iam:PassRole"]] == [profiles[
        next(n for n in config["available_node_types"] if n != config["head_node_type"])]]
    for actions in (head_actions, worker_actions):
        assert {"s3:ListBucket", "s3:GetObject", "s3:PutObject"} <= set(actions)
    text = (LAUNCHER / "aws.yaml").read_text()
    assert "head-iam-policy.json" in text and "worker-iam-policy.json" in text
    assert "ray down infra/cluster-launcher/aws.yaml" in text
    assert ".venv/bin/ray down infra/cluster-launcher/aws.yaml" in (REPO / "docs" / "cluster.md").read_text()


# ---------------------------------------------------------------------------------------------
# The image


DOCKERFILE = REPO / "infra" / "Dockerfile"


def test_dockerfile_passes_hadolint():
    result = subprocess.run([str(BIN / "hadolint"), "--no-color", str(DOCKERFILE)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


def test_ray_is_one_version_across_image_constraints_manifests_and_docs():
    import ray
    pinned = constraint_pins()["ray"]
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG RAY_VERSION=(\S+)$", text, re.M).group(1) == pinned
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py\d+-gpu$", text, re.M)
    for name in ("rayjob.yaml", "raycluster.yaml"):
        assert cluster_spec(the(name))["rayVersion"] == pinned, name
    assert ray.__version__ == pinned  # the `ray` that submits jobs and runs `ray up`
    readme = (REPO / "docs" / "cluster.md").read_text()
    assert f"**Ray {pinned}**" in readme
    low, high = CRD_VERSIONS[0].rsplit(".", 1)[0], CRD_VERSIONS[-1].rsplit(".", 1)[0]
    assert f"**KubeRay\n{low} to {high}**" in readme or f"**KubeRay {low} to {high}**" in readme
    images = {c["image"] for name in ("rayjob.yaml", "raycluster.yaml") for spec in pod_specs(the(name))
              for c in spec["containers"]}
    assert images == {launcher_config()["docker"]["image"]}  # one image, built from infra/Dockerfile


# torch/torchvision are pinned on the install lines (checked above); setuptools comes with the
# image's Python and is the build backend, which a constraint could not pin without breaking builds.
PINNED_ELSEWHERE = {"torch", "torchvision", "setuptools"}


def test_image_installs_only_pinned_packages():
    text = DOCKERFILE.read_text()
    ci = (REPO / ".ci" / "run").read_text()
    index = re.search(r"--index-url https://download\.pytorch\.org/whl/(cu\d+)", text).group(1)
    for package in ("torch", "torchvision"):
        cpu = re.search(rf"\b{package}==(\S+)", ci).group(1)
        assert re.search(rf"\b{package}=={re.escape(cpu)}\+{index}\b", text), f"{package} {cpu}+{index}"
    assert re.search(r"pip install --no-cache-dir -c constraints\.txt -e '\.\[gcs\]'", text)
    # the [gcs] and [test] extras, with everything they pull in, are pinned by constraints.txt
    pins = constraint_pins()
    pyproject = (REPO / "pyproject.toml").read_text()
    for extra in ("gcs", "test"):
        block = re.search(rf"^{extra} = \[(.*?)\]$", pyproject, re.M | re.S).group(1)
        for requirement in re.findall(r'"([^"]+)"', block):
            missing = [name for name in closure(Requirement(requirement).name)
                       if name not in pins and name not in PINNED_ELSEWHERE]
            assert not missing, f"[{extra}] {requirement}: not in constraints.txt: {missing}"


def closure(name: str, seen: set[str] | None = None) -> set[str]:
    """The installed distribution and every distribution it requires (without extras' ones)."""
    seen = set() if seen is None else seen
    name = canonical(name)
    if name in seen:
        return seen
    seen.add(name)
    for line in metadata.requires(name) or []:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            closure(requirement.name, seen)
    return seen


def test_dockerfile_gives_the_workdir_to_the_user_before_using_it():
    instructions = [line.split(None, 1) for line in DOCKERFILE.read_text().splitlines()
                    if line.strip() and not line.startswith("#") and not line.startswith(" ")]
    keywords = [i[0] for i in instructions]
    workdir = keywords.index("WORKDIR")
    path = instructions[workdir][1]
    prepare = [args for word, args in instructions[:workdir] if word == "RUN"]
    assert any(f"mkdir -p {path}" in run and "chown 1000" in run for run in prepare)
    users = [args for word, args in instructions if word == "USER"]
    assert users[-1] not in ("0", "root") and keywords.index("USER") < workdir
    for word, args in instructions:
        if word == "COPY":
            for source in shlex.split(args)[:-1]:
                assert source.startswith("--") or (REPO / source).exists(), source


# ---------------------------------------------------------------------------------------------
# docs/cluster.md: every file with CHANGE marks is listed


def test_cluster_docs_list_every_file_with_fields_to_change():
    readme = (REPO / "docs" / "cluster.md").read_text()
    table = readme[readme.index("Fields you must change are marked `CHANGE`"):]
    table = table[:table.index("\n\n", table.index("| file |"))]
    marked = [p for p in [*REPO.glob("infra/**/*"), *REPO.glob("jobs/configs/*.yaml")]
              if p.is_file() and "CHANGE" in p.read_text()]
    assert marked
    for path in marked:
        relative = path.relative_to(REPO).as_posix()
        assert f"`{relative}`" in table or f"`{path.name}`" in table, relative


def test_the_gcs_example_is_the_s3_example_on_google_cloud_storage():
    s3 = vars(load_config(str(REPO / "jobs/configs/s3-large.yaml")))
    gcs = vars(load_config(str(REPO / "jobs/configs/gcs-large.yaml")))
    urls = ("input", "output", "vocab_file", "storage_options")
    assert {k: v for k, v in s3.items() if k not in urls} == {k: v for k, v in gcs.items() if k not in urls}
    assert all(u.startswith("gs://") for u in [*gcs["input"], gcs["output"], gcs["vocab_file"]])
    assert list(gcs["storage_options"]) == ["gs"]


def test_the_image_copies_every_package_the_distribution_installs():
    """An installed package left out of the image fails only there (``import gemlabel`` in a pod)."""
    import tomllib
    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {pattern.rstrip("*").rstrip(".") for pattern in include}
    copied = {words[-1] for words in (line.split() for line in DOCKERFILE.read_text().splitlines())
              if words and words[0] == "COPY"}
    assert packages <= copied, f"infra/Dockerfile copies no {sorted(packages - copied)}"
    assert all((REPO / package / "__init__.py").is_file() for package in packages)
