"""Deployment files: schemas, the paths they name, the image's install step, and the documented submit command.

Kubernetes kinds (ServiceAccount, Role, RoleBinding, CronJob) and the Pod
templates and resource requirements inside the KubeRay objects are checked
against Kubernetes' own JSON schemas, as shipped by the kubernetes-validate
package (strict variant: unknown fields are errors). KubeRay publishes no
JSON schema that installs offline, so RAYJOB_SCHEMA below spells out the
required and known fields of RayJob and RayCronJob (ray.io/v1) from the
KubeRay v1.6 API reference. `ray up` files are checked by Ray's own
validation, which uses the ray-schema.json that Ray ships.
"""

from __future__ import annotations

import datetime as dt
import importlib.resources
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource

from distal import submission
from test_job_submit import JOB_TIMEOUT_S, pools, ray_head, tail, write_config  # noqa: F401 (fixtures)

try:
    import kubernetes_validate
except ImportError:  # the schema tests below are skipped with the install command as reason
    kubernetes_validate = None

needs_k8s_schemas = pytest.mark.skipif(
    kubernetes_validate is None, reason="Kubernetes schemas missing: pip install 'kubernetes-validate>=1.33'"
)

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
K8S = INFRA / "k8s"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
DEPLOY_DOC = REPO / "docs" / "deploy.md"
CLUSTER_YAML = INFRA / "aws" / "cluster.yaml"
NIGHTLY_SCRIPT = INFRA / "aws" / "submit-nightly.sh"
VENV_PYTHON = sys.executable

# Where the Dockerfile puts the repository inside the image.
IMAGE_ROOT = "/home/ray/distal"
RAY_VERSION = "2.60.0"
DISTAL_IMAGE = re.compile(r"^registry\.example\.com/distal:(?P<version>[0-9.]+)-(?P<variant>gpu|cpu)$")

# The oldest Kubernetes the manifests claim (CronJob timeZone is GA since
# 1.27) and the newest that kubernetes-validate has schemas for.
K8S_VERSIONS = ["1.30", ".".join(kubernetes_validate.utils.latest_version().split(".")[:2]) if kubernetes_validate else "1.33"]
K8S_DEFINITIONS_ID = "https://kubernetes.io/api/_definitions.json"
POD_TEMPLATE = {"$ref": f"{K8S_DEFINITIONS_ID}#/$defs/io.k8s.api.core.v1.PodTemplateSpec"}
RESOURCES = {"$ref": f"{K8S_DEFINITIONS_ID}#/$defs/io.k8s.api.core.v1.ResourceRequirements"}


def _object(required: list[str], properties: dict) -> dict:
    return {"type": "object", "required": required, "properties": properties, "additionalProperties": False}


STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
COUNT = {"type": "integer", "minimum": 0}

# Fields of the KubeRay v1.6 ray.io/v1 API reference that these manifests may
# use, with the ones the CRDs require. Fields not listed are rejected here even
# where KubeRay defines them, so a typo cannot pass as an unknown field.
WORKER_GROUP = _object(
    ["groupName", "template", "minReplicas", "maxReplicas", "rayStartParams"],
    {
        "groupName": {"type": "string", "pattern": "^[a-z0-9-]+$"},
        "replicas": COUNT,
        "minReplicas": COUNT,
        "maxReplicas": COUNT,
        "idleTimeoutSeconds": COUNT,
        "numOfHosts": {"type": "integer", "minimum": 1},
        "suspend": {"type": "boolean"},
        "rayStartParams": STRING_MAP,
        "template": POD_TEMPLATE,
    },
)
RAY_CLUSTER_SPEC = _object(
    ["headGroupSpec"],
    {
        "rayVersion": {"type": "string"},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "authOptions": _object([], {"mode": {"enum": ["disabled", "token"]}, "secretName": {"type": "string"}}),
        "autoscalerOptions": _object(
            [],
            {
                "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
                "idleTimeoutSeconds": COUNT,
                "resources": RESOURCES,
                "image": {"type": "string"},
                "imagePullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
            },
        ),
        "headGroupSpec": _object(
            ["template", "rayStartParams"],
            {
                "rayStartParams": STRING_MAP,
                "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                "enableIngress": {"type": "boolean"},
                "template": POD_TEMPLATE,
            },
        ),
        "workerGroupSpecs": {"type": "array", "items": WORKER_GROUP},
        "headServiceAnnotations": STRING_MAP,
        "suspend": {"type": "boolean"},
    },
)
RAYJOB_SPEC = _object(
    ["entrypoint", "rayClusterSpec"],
    {
        "entrypoint": {"type": "string", "minLength": 1},
        "jobId": {"type": "string", "maxLength": submission.MAX_SUBMISSION_ID_LENGTH},
        "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
        "shutdownAfterJobFinishes": {"type": "boolean"},
        "ttlSecondsAfterFinished": COUNT,
        "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
        "backoffLimit": COUNT,
        "runtimeEnvYAML": {"type": "string"},
        "metadata": STRING_MAP,
        "suspend": {"type": "boolean"},
        "submitterPodTemplate": POD_TEMPLATE,
        "submitterConfig": _object([], {"backoffLimit": COUNT}),
        "rayClusterSpec": RAY_CLUSTER_SPEC,
    },
)
OBJECT_META = {"$ref": f"{K8S_DEFINITIONS_ID}#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}
RAYJOB_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "urn:distal-test:kuberay-v1",
    "oneOf": [
        _object(
            ["apiVersion", "kind", "metadata", "spec"],
            {"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayJob"}, "metadata": OBJECT_META, "spec": RAYJOB_SPEC},
        ),
        _object(
            ["apiVersion", "kind", "metadata", "spec"],
            {
                "apiVersion": {"const": "ray.io/v1"},
                "kind": {"const": "RayCronJob"},
                "metadata": OBJECT_META,
                "spec": _object(
                    ["schedule", "jobTemplate"],
                    {"schedule": {"type": "string"}, "suspend": {"type": "boolean"}, "jobTemplate": RAYJOB_SPEC},
                ),
            },
        ),
    ],
}


def yaml_documents(path: Path) -> list[dict]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document is not None]


def k8s_documents() -> list[tuple[str, int, dict]]:
    found = []
    for path in sorted(K8S.glob("*.yaml")):
        for index, document in enumerate(yaml_documents(path)):
            found.append((path.name, index, document))
    return found


def document_id(entry: tuple[str, int, dict]) -> str:
    name, index, document = entry
    return f"{name}[{index}]-{document.get('kind')}"


def one_document(name: str, kind: str) -> dict:
    matches = [document for file, _, document in k8s_documents() if file == name and document.get("kind") == kind]
    assert len(matches) == 1, f"expected one {kind} in infra/k8s/{name}, found {len(matches)}"
    return matches[0]


def kuberay_validator(k8s_version: str) -> jsonschema.Draft202012Validator:
    """Build a validator of RAYJOB_SCHEMA whose Kubernetes references resolve to that version's strict schemas."""
    folder = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema" / f"v{k8s_version}.0-local-strict"
    definitions = json.loads((folder / "_definitions.json").read_text())
    registry = Resource.from_contents(definitions) @ Registry()
    return jsonschema.Draft202012Validator(RAYJOB_SCHEMA, registry=registry)


def schema_errors(validator: jsonschema.Validator, document: dict) -> list[str]:
    """Return each validation error as 'path: message', deepest causes included."""
    messages = []
    for error in validator.iter_errors(document):
        for cause in [error, *(error.context or [])]:
            messages.append(f"{'.'.join(str(part) for part in cause.absolute_path)}: {cause.message[:300]}")
    return messages


def pod_containers(rayjob_spec: dict) -> dict[str, dict]:
    """Return the Ray containers by group: head and each worker group."""
    cluster = rayjob_spec["rayClusterSpec"]
    containers = {"head": cluster["headGroupSpec"]["template"]["spec"]["containers"][0]}
    for group in cluster["workerGroupSpecs"]:
        containers[group["groupName"]] = group["template"]["spec"]["containers"][0]
    return containers


def all_pod_specs(rayjob_spec: dict) -> list[dict]:
    cluster = rayjob_spec["rayClusterSpec"]
    return [cluster["headGroupSpec"]["template"]["spec"]] + [group["template"]["spec"] for group in cluster["workerGroupSpecs"]]


def repo_path_in_image(path: str) -> Path:
    """Map a path inside the image to the repository file the Dockerfile copies there."""
    assert path.startswith(IMAGE_ROOT + "/"), f"{path} is not under the image's repository copy {IMAGE_ROOT}"
    return REPO / path[len(IMAGE_ROOT) + 1 :]


def entrypoint_paths(entrypoint: str) -> tuple[str, str]:
    """Return the script and the --config file of ``python SCRIPT --config FILE ...``."""
    words = shlex.split(entrypoint)
    assert words[0] == "python", f"entrypoint does not start with python: {entrypoint}"
    assert words[1].endswith("jobs/cycle.py"), f"entrypoint does not run jobs/cycle.py: {entrypoint}"
    config = words[words.index("--config") + 1]
    return words[1], config


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "path",
    sorted([*INFRA.rglob("*.yaml"), *(REPO / "configs").glob("*.yaml")]),
    ids=lambda path: str(path.relative_to(REPO)),
)
def test_yaml_file_parses(path):
    documents = yaml_documents(path)
    assert documents, f"{path} holds no YAML document"
    for document in documents:
        assert isinstance(document, dict)


def test_nightly_config_loads():
    from distal import config as config_module

    loaded = config_module.load(str(REPO / "configs" / "nightly-example.yaml"))
    assert loaded.run_dir.startswith("s3://")
    assert loaded.pool.path.startswith("s3://")
    assert loaded.pool.eval_path.startswith("s3://")
    assert loaded.train.use_gpu is True
    assert loaded.score.use_gpu is True
    assert loaded.oracle is True


# ------------------------------------------------- Kubernetes and KubeRay schemas

BUILTIN_KINDS = {"ServiceAccount", "Role", "RoleBinding", "CronJob"}
KUBERAY_KINDS = {"RayJob", "RayCronJob"}


def test_k8s_files_hold_known_kinds():
    kinds = {document.get("kind") for _, _, document in k8s_documents()}
    assert kinds <= BUILTIN_KINDS | KUBERAY_KINDS, f"no schema check for kinds {kinds - BUILTIN_KINDS - KUBERAY_KINDS}"
    assert kinds == BUILTIN_KINDS | KUBERAY_KINDS


@needs_k8s_schemas
@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
@pytest.mark.parametrize(
    "entry",
    [entry for entry in k8s_documents() if entry[2].get("kind") in BUILTIN_KINDS],
    ids=document_id,
)
def test_builtin_kind_matches_k8s_schema(entry, k8s_version):
    name, index, document = entry
    try:
        kubernetes_validate.validate(document, k8s_version, strict=True)
    except kubernetes_validate.ValidationError as err:
        path = ".".join(str(part) for part in err.path)
        pytest.fail(f"infra/k8s/{name} document {index} is invalid for Kubernetes {k8s_version}: {path}: {err.message}")


@needs_k8s_schemas
@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
@pytest.mark.parametrize(
    "entry",
    [entry for entry in k8s_documents() if entry[2].get("kind") in KUBERAY_KINDS],
    ids=document_id,
)
def test_kuberay_kind_matches_schema(entry, k8s_version):
    name, index, document = entry
    errors = schema_errors(kuberay_validator(k8s_version), document)
    assert not errors, f"infra/k8s/{name} document {index}:\n" + "\n".join(errors)


@needs_k8s_schemas
@pytest.mark.parametrize(
    ("change", "expected"),
    [
        pytest.param(lambda job: job["spec"].update(shutdownAfterJobFinish=True), "shutdownAfterJobFinish", id="typo-in-spec"),
        pytest.param(lambda job: job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].pop("groupName"), "groupName", id="missing-group-name"),
        pytest.param(
            lambda job: job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(ports=[{"containerPort": "dashboard"}]),
            "'dashboard' is not of type",
            id="wrong-type-in-pod",
        ),
        pytest.param(
            lambda job: job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(resource={}),
            "resource",
            id="unknown-container-field",
        ),
    ],
)
def test_kuberay_schema_rejects_broken_rayjob(change, expected):
    document = one_document("rayjob.yaml", "RayJob")
    change(document)
    errors = schema_errors(kuberay_validator(K8S_VERSIONS[-1]), document)
    assert any(expected in error for error in errors), f"no error mentions {expected!r}: {errors}"


# ---------------------------------------------------------------- the RayJob


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return one_document("rayjob.yaml", "RayJob")


def test_rayjob_runs_cycle_with_repository_config(rayjob):
    script, config = entrypoint_paths(rayjob["spec"]["entrypoint"])
    assert repo_path_in_image(script) == REPO / "jobs" / "cycle.py"
    assert repo_path_in_image(config).is_file(), f"{config} is not a file of the repository"
    assert "--cycles" not in rayjob["spec"]["entrypoint"]


def test_rayjob_lifecycle_limits(rayjob):
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["activeDeadlineSeconds"] > 0
    assert 0 < spec["backoffLimit"] <= 5
    assert spec["rayClusterSpec"]["rayVersion"] == RAY_VERSION


def test_rayjob_uses_token_authentication(rayjob):
    assert rayjob["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}


def test_rayjob_head_has_no_gpu(rayjob):
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]
    container = pod_containers(rayjob["spec"])["head"]
    assert "nvidia.com/gpu" not in container["resources"]["requests"]
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert head["rayStartParams"].get("num-gpus", "0") == "0"


def test_rayjob_gpu_group_autoscales(rayjob):
    cluster = rayjob["spec"]["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    gpu_groups = [
        group
        for group in cluster["workerGroupSpecs"]
        if "nvidia.com/gpu" in group["template"]["spec"]["containers"][0]["resources"]["limits"]
    ]
    assert len(gpu_groups) == 1
    assert gpu_groups[0]["minReplicas"] < gpu_groups[0]["maxReplicas"]


def test_rayjob_containers_request_and_limit(rayjob):
    containers = pod_containers(rayjob["spec"])
    for group, container in containers.items():
        resources = container["resources"]
        for resource in ("cpu", "memory"):
            assert resource in resources["requests"], f"{group}: no {resource} request"
            assert resource in resources["limits"], f"{group}: no {resource} limit"
    autoscaler = rayjob["spec"]["rayClusterSpec"]["autoscalerOptions"]["resources"]
    assert set(autoscaler["requests"]) == {"cpu", "memory"}
    assert set(autoscaler["limits"]) == {"cpu", "memory"}


def test_rayjob_images_are_pinned_distal_images(rayjob):
    version = _pyproject_version()
    for group, container in pod_containers(rayjob["spec"]).items():
        match = DISTAL_IMAGE.match(container["image"])
        assert match, f"{group}: image {container['image']} is not registry.example.com/distal:VERSION-VARIANT"
        assert match["version"] == version
        assert match["variant"] == "gpu"


def test_rayjob_pods_run_as_distal_user(rayjob):
    for pod in all_pod_specs(rayjob["spec"]):
        assert pod["serviceAccountName"] == "distal"
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 1000


def test_rayjob_reads_s3_credentials_from_secret_only(rayjob):
    for group, container in pod_containers(rayjob["spec"]).items():
        assert container["envFrom"] == [{"secretRef": {"name": "distal-s3", "optional": True}}], group


def test_service_account_names_iam_role():
    account = one_document("serviceaccount.yaml", "ServiceAccount")
    assert account["metadata"]["name"] == "distal"
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")


CREDENTIAL_NAMES = re.compile(r"(SECRET|PASSWORD|ACCESS_KEY|SESSION_TOKEN|AUTH_TOKEN)", re.IGNORECASE)


def _env_entries(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "env" and isinstance(value, list):
                yield from value
            else:
                yield from _env_entries(value)
    elif isinstance(node, list):
        for item in node:
            yield from _env_entries(item)


@pytest.mark.parametrize("entry", k8s_documents(), ids=document_id)
def test_manifest_holds_no_inline_credentials(entry):
    name, _, document = entry
    assert document.get("kind") != "Secret", f"infra/k8s/{name} defines a Secret; create it with kubectl instead"
    for variable in _env_entries(document):
        if CREDENTIAL_NAMES.search(variable["name"]):
            assert "value" not in variable, f"infra/k8s/{name} sets {variable['name']} inline"


# ------------------------------------------------------- the nightly CronJob


@pytest.fixture(scope="module")
def cronjob() -> dict:
    return one_document("cronjob.yaml", "CronJob")


def _container(pod: dict, name: str) -> dict:
    for container in pod.get("initContainers", []) + pod["containers"]:
        if container["name"] == name:
            return container
    raise AssertionError(f"no container {name} in the CronJob's Pod")


def _option(command: list[str], name: str) -> str:
    for word in command:
        if word.startswith(f"--{name}="):
            return word.split("=", 1)[1]
    raise AssertionError(f"--{name}= missing from {command}")


def test_cronjob_forbids_overlap(cronjob):
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    assert cronjob["spec"]["timeZone"] == "Etc/UTC"
    assert cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["restartPolicy"] == "Never"


def test_cronjob_renders_rayjob_template(cronjob, rayjob):
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    render = _container(pod, "render")
    assert render["command"][:4] == ["python", "-m", "distal.submission", "rayjob"]
    assert DISTAL_IMAGE.match(render["image"])["variant"] == "cpu"
    template_volume = next(volume for volume in pod["volumes"] if volume["name"] == "template")
    assert template_volume["configMap"]["name"] == "distal-rayjob"
    assert _option(render["command"], "template") == "/etc/distal/rayjob.yaml"
    _, job_config = entrypoint_paths(rayjob["spec"]["entrypoint"])
    assert _option(render["command"], "config") == job_config
    dt.date.fromisoformat(_option(render["command"], "start-date"))


def test_cronjob_kubectl_steps_use_rendered_file(cronjob):
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    rendered = _option(_container(pod, "render")["command"], "out")
    for name in ("apply", "wait"):
        container = _container(pod, name)
        assert re.fullmatch(r"registry\.k8s\.io/kubectl:v1\.\d+\.\d+", container["image"]), container["image"]
        assert _option(container["command"], "filename") == rendered
    assert _container(pod, "apply")["command"][:2] == ["kubectl", "apply"]
    wait = _container(pod, "wait")["command"]
    assert wait[:2] == ["kubectl", "wait"]
    assert _option(wait, "for") == "jsonpath={.status.jobStatus}=SUCCEEDED"


def test_cronjob_wait_outlasts_rayjob_deadline(cronjob, rayjob):
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    wait_seconds = int(_option(_container(pod, "wait")["command"], "timeout").rstrip("s"))
    assert wait_seconds > rayjob["spec"]["activeDeadlineSeconds"]
    assert cronjob["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"] > wait_seconds


@needs_k8s_schemas
def test_cronjob_render_step_writes_valid_rayjob(cronjob, tmp_path):
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    command = _container(pod, "render")["command"]
    config = repo_path_in_image(_option(command, "config"))
    out = tmp_path / "rayjob.yaml"
    night = "2030-02-03"
    local = [
        VENV_PYTHON, "-m", "distal.submission", "rayjob",
        f"--template={K8S / 'rayjob.yaml'}",
        f"--config={config}",
        f"--start-date={_option(command, 'start-date')}",
        f"--date={night}",
        f"--out={out}",
    ]
    result = subprocess.run(local, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr

    rendered = yaml.safe_load(out.read_text())
    errors = schema_errors(kuberay_validator(K8S_VERSIONS[-1]), rendered)
    assert not errors, "\n".join(errors)
    expected_id = f"distal-nightly-cifar10-{night.replace('-', '')}"
    assert rendered["metadata"]["name"] == expected_id
    assert rendered["spec"]["jobId"] == expected_id
    start = dt.date.fromisoformat(_option(command, "start-date"))
    cycles = (dt.date.fromisoformat(night) - start).days + 1
    assert rendered["spec"]["entrypoint"].endswith(f" --cycles {cycles}")


def test_raycronjob_template_matches_rayjob(rayjob):
    cron = one_document("raycronjob.yaml", "RayCronJob")
    template = dict(cron["spec"]["jobTemplate"])
    expected = dict(rayjob["spec"])
    entrypoint = template.pop("entrypoint")
    assert template == {key: value for key, value in expected.items() if key != "entrypoint"}
    assert entrypoint.startswith(expected["entrypoint"] + " --cycles ")


def test_raycronjob_entrypoint_computes_cycles():
    cron = one_document("raycronjob.yaml", "RayCronJob")
    entrypoint = cron["spec"]["jobTemplate"]["entrypoint"]
    substitution = re.search(r"\$\((python -m distal\.submission cycles [^)]*)\)", entrypoint)
    assert substitution, entrypoint
    env = {"PATH": f"{Path(VENV_PYTHON).parent}:/usr/bin:/bin"}
    result = subprocess.run(["bash", "-c", substitution.group(1)], capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
    # The example start date may lie in the future, so either a count or the start-date error is valid.
    assert result.returncode in (0, 2), result.stderr
    if result.returncode == 0:
        assert int(result.stdout) >= 1
    else:
        assert "before the schedule's start date" in result.stderr


# ---------------------------------------------------------------- ray up


@pytest.fixture(scope="module")
def cluster_config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_passes_ray_validation(cluster_config):
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        validate_config(prepare_config(cluster_config))
    except (jsonschema.ValidationError, ValueError) as err:
        pytest.fail(f"infra/aws/cluster.yaml fails Ray's cluster config validation: {err}")


def test_cluster_yaml_node_types(cluster_config):
    types = cluster_config["available_node_types"]
    head = types[cluster_config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    gpu = [node for node in types.values() if node["resources"].get("GPU", 0) > 0]
    assert len(gpu) == 1
    assert gpu[0]["min_workers"] < gpu[0]["max_workers"]
    assert sum(node.get("max_workers", 0) for node in types.values()) <= cluster_config["max_workers"]


def test_cluster_yaml_runs_rayjob_image(cluster_config, rayjob):
    assert cluster_config["docker"]["image"] == pod_containers(rayjob["spec"])["head"]["image"]


def test_cluster_yaml_enables_token_auth(cluster_config):
    assert "~/.ray/auth_token" in cluster_config["file_mounts"]
    for command in cluster_config["head_start_ray_commands"] + cluster_config["worker_start_ray_commands"]:
        if "ray start" in command:
            assert "RAY_AUTH_MODE=token ray start" in command


# ---------------------------------------------------------------- Dockerfile


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """Return (INSTRUCTION, arguments) pairs, with continuations joined and heredoc bodies appended."""
    instructions = []
    lines = iter(text.splitlines())
    for line in lines:
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        while stripped.endswith("\\"):
            stripped = stripped[:-1].rstrip() + " " + next(lines).strip()
        keyword, _, arguments = stripped.partition(" ")
        heredoc = re.search(r"<<-?'?(\w+)'?", arguments)
        if heredoc:
            body = []
            for body_line in lines:
                if body_line.strip() == heredoc.group(1):
                    break
                body.append(body_line)
            arguments += "\n" + "\n".join(body)
        instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def pip_arguments(command: str) -> list[list[str]]:
    """Return the arguments after ``pip`` of every pip call in a shell command joined by &&."""
    calls = []
    for part in command.split("&&"):
        words = shlex.split(part)
        for index, word in enumerate(words):
            if word == "pip" or word.endswith("/pip"):
                calls.append(words[index + 1 :])
                break
    return calls


def readme_install_arguments() -> list[str]:
    """Return the pip arguments of the README's quick start install command."""
    readme = (REPO / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", quick_start, re.DOTALL).group(1)
    installs = [arguments for arguments in pip_arguments(block.replace("\\\n", " ")) if arguments[:1] == ["install"]]
    assert len(installs) == 1, f"expected one pip install in the README's quick start, found {installs}"
    return installs[0]


def _pyproject_version() -> str:
    return re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.MULTILINE).group(1)


@pytest.fixture(scope="module")
def docker_instructions() -> list[tuple[str, str]]:
    return dockerfile_instructions(DOCKERFILE.read_text())


def test_dockerfile_install_step_is_readme_command(docker_instructions):
    """The package is installed with the README's pip arguments, run in a copy of the repository root."""
    installs = []
    for keyword, arguments in docker_instructions:
        if keyword == "RUN":
            installs += [call for call in pip_arguments(arguments.split("\n")[0]) if call[:1] == ["install"]]
    package_installs = [call for call in installs if "." in call]
    assert package_installs == [readme_install_arguments()], f"Dockerfile pip installs: {installs}"

    workdirs = [arguments for keyword, arguments in docker_instructions if keyword == "WORKDIR"]
    assert workdirs == [IMAGE_ROOT]
    install_at = next(
        index
        for index, (keyword, arguments) in enumerate(docker_instructions)
        if keyword == "RUN" and readme_install_arguments() in pip_arguments(arguments.split("\n")[0])
    )
    copied_before = [
        [word for word in arguments.split() if not word.startswith("--")]
        for keyword, arguments in docker_instructions[:install_at]
        if keyword == "COPY"
    ]
    assert ["pyproject.toml", "README.md", "./"] in copied_before
    assert ["distal", "./distal"] in copied_before


def test_dockerfile_copies_existing_paths(docker_instructions):
    for keyword, arguments in docker_instructions:
        if keyword == "COPY":
            sources = [word for word in arguments.split() if not word.startswith("--")][:-1]
            for source in sources:
                assert (REPO / source).exists(), f"COPY source {source} does not exist in the repository"


def test_dockerfile_base_images_are_pinned(docker_instructions):
    text = DOCKERFILE.read_text()
    assert "latest" not in text.lower()
    args = dict(arguments.split("=", 1) for keyword, arguments in docker_instructions if keyword == "ARG" and "=" in arguments)
    assert args["RAY_IMAGE"] == f"rayproject/ray:{RAY_VERSION}-py311-gpu"
    froms = [arguments for keyword, arguments in docker_instructions if keyword == "FROM"]
    assert froms == ["${RAY_IMAGE}"]
    # The CPU variant's build command in the header names a pinned tag too.
    assert f"RAY_IMAGE=rayproject/ray:{RAY_VERSION}-py311-cpu" in text
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text


def test_dockerfile_runs_as_non_root(docker_instructions):
    users = [arguments for keyword, arguments in docker_instructions if keyword == "USER"]
    assert users, "the Dockerfile sets no USER"
    assert users[-1] not in ("root", "0")


def test_constraints_pin_ray_of_base_image():
    pins = {}
    for line in (INFRA / "docker" / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower()] = version
    assert pins["ray"] == RAY_VERSION
    assert {"torch", "torchvision"} <= set(pins)


# ---------------------------------------------------------- docs/deploy.md


def documented_submit_command() -> str:
    doc = DEPLOY_DOC.read_text()
    after = doc.split("<!-- submit-command", 1)[1]
    return re.search(r"```bash\n(.*?)```", after, re.DOTALL).group(1)


def test_nightly_script_runs_documented_command():
    assert documented_submit_command() in NIGHTLY_SCRIPT.read_text()
    result = subprocess.run(["bash", "-n", str(NIGHTLY_SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_deploy_doc_names_existing_files():
    doc = DEPLOY_DOC.read_text()
    named = set(re.findall(r"\b((?:infra|configs|jobs)/[\w./-]+\.(?:yaml|py|sh|txt)|infra/docker/Dockerfile)\b", doc))
    assert named, "docs/deploy.md names no deployment file"
    missing = sorted(path for path in named if not (REPO / path).exists())
    assert not missing, f"docs/deploy.md names files that do not exist: {missing}"
    for path in INFRA.rglob("*"):
        if path.is_file() and path.name != "Dockerfile.dockerignore":
            assert str(path.relative_to(REPO)) in doc, f"docs/deploy.md does not mention {path.relative_to(REPO)}"


# ---------------------------------------------------------- distal.submission


def test_submission_id_from_run_and_date():
    assert submission.submission_id("s3://bucket/runs/Nightly_CIFAR10/", dt.date(2027, 1, 5)) == "distal-nightly-cifar10-20270105"
    assert submission.submission_id("/abs/runs/demo", dt.date(2027, 12, 31)) == "distal-demo-20271231"


@pytest.mark.parametrize("run_dir", ["/", "runs/___", "s3://bucket/--/"])
def test_submission_id_rejects_unnamed_run(run_dir):
    with pytest.raises(submission.SubmissionError, match="Invalid run_dir"):
        submission.submission_id(run_dir, dt.date(2027, 1, 5))


def test_submission_id_rejects_long_name():
    with pytest.raises(submission.SubmissionError, match="more than the 47"):
        submission.submission_id("s3://bucket/" + "a" * 40, dt.date(2027, 1, 5))


def test_nightly_cycles_count_nights():
    start = dt.date(2027, 1, 4)
    assert submission.nightly_cycles(start, start) == 1
    assert submission.nightly_cycles(start, dt.date(2027, 1, 5)) == 2
    assert submission.nightly_cycles(start, dt.date(2027, 2, 3)) == 31
    with pytest.raises(submission.SubmissionError, match="before the schedule's start date"):
        submission.nightly_cycles(start, dt.date(2027, 1, 3))


def test_render_rayjob_rejects_preset_cycles(rayjob):
    template = json.loads(json.dumps(rayjob))
    template["spec"]["entrypoint"] += " --cycles 3"
    with pytest.raises(submission.SubmissionError, match="already sets the cycle target"):
        submission.render_rayjob(template, "s3://b/runs/x", dt.date(2027, 1, 5), 2)


def test_render_rayjob_keeps_template(rayjob):
    before = json.dumps(rayjob, sort_keys=True)
    rendered = submission.render_rayjob(rayjob, "s3://b/runs/x", dt.date(2027, 1, 5), 2)
    assert json.dumps(rayjob, sort_keys=True) == before
    assert rendered["metadata"]["name"] == "distal-x-20270105"
    assert rendered["metadata"]["namespace"] == rayjob["metadata"]["namespace"]


def test_submission_cli_prints_id_and_cycles():
    id_run = subprocess.run(
        [VENV_PYTHON, "-m", "distal.submission", "id", "--config", "configs/nightly-example.yaml", "--date", "2027-03-01"],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )
    assert id_run.returncode == 0, id_run.stderr
    assert id_run.stdout.strip() == "distal-nightly-cifar10-20270301"
    cycles_run = subprocess.run(
        [VENV_PYTHON, "-m", "distal.submission", "cycles", "--start-date", "2027-02-27", "--date", "2027-03-01"],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )
    assert cycles_run.returncode == 0, cycles_run.stderr
    assert cycles_run.stdout.strip() == "3"


def test_submission_cli_reports_bad_config():
    result = subprocess.run(
        [VENV_PYTHON, "-m", "distal.submission", "id", "--config", "/nonexistent/distal.yaml"],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )
    assert result.returncode == 2
    assert "distal: error: Cannot read configuration file /nonexistent/distal.yaml" in result.stderr


# ------------------------------------------ the documented submit command, for real


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the head node fixture finds its processes through /proc")
def test_documented_submit_command_completes_cycle(ray_head, pools, tmp_path):
    """Run docs/deploy.md's submit command verbatim twice: one cycle, then a rejected resubmission."""
    pool, eval_pool = pools
    run_dir = tmp_path / "runs" / "nightly-test"
    config = write_config(tmp_path / "nightly.yaml", run_dir, pool, eval_pool)
    # As in docs/deploy.md: the client reads the token from a file, not from RAY_AUTH_TOKEN.
    env = dict(ray_head.env)
    token_file = tmp_path / "auth-token"
    token_file.write_text(env.pop("RAY_AUTH_TOKEN") + "\n")
    env.update(
        RAY_ADDRESS=ray_head.dashboard_url,
        RAY_AUTH_TOKEN_PATH=str(token_file),
        DISTAL_CONFIG=str(config),
        DISTAL_START_DATE=submission.today_utc().isoformat(),
    )
    command = documented_submit_command()
    expected_id = f"distal-nightly-test-{submission.today_utc():%Y%m%d}"

    first_log = tmp_path / "first.log"
    started = time.monotonic()
    with open(first_log, "wb") as output:
        first = subprocess.run(["bash", "-c", command], cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT, timeout=JOB_TIMEOUT_S)
    print(f"documented submit: exit={first.returncode} seconds={time.monotonic() - started:.1f}")
    assert first.returncode == 0, f"the documented command failed:\n{tail(first_log)}"
    assert expected_id in first_log.read_text(errors="replace")
    cycle_dir = run_dir / "cycles" / "0001"
    assert (cycle_dir / "_COMPLETE").is_file(), tail(first_log)
    assert json.loads((cycle_dir / "manifest.json").read_text())["cycle"] == 1

    second_log = tmp_path / "second.log"
    with open(second_log, "wb") as output:
        second = subprocess.run(["bash", "-c", command], cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT, timeout=JOB_TIMEOUT_S)
    assert second.returncode != 0, f"a resubmission of the same night was accepted:\n{tail(second_log)}"
    rejection = f"Job with submission_id {expected_id} already exists"
    assert rejection in second_log.read_text(errors="replace"), tail(second_log)
    assert sorted(path.name for path in (run_dir / "cycles").iterdir()) == ["0001"]
