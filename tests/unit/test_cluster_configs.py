"""cluster/: every manifest parses, names real entrypoints, configs and config keys.

Commands are collected from the KubeRay entrypoints and from the code blocks of
cluster/README.md: each ``python -m ray_jobs.<job>`` must be an existing module whose
parser knows every ``--flag`` used, its ``--config`` must resolve (a path in the repo or
a packaged name in ``ncd/configs``), and its ``--set a.b=v`` overrides must apply to
``ncd.config.ExperimentConfig``.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import io as _io
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from ncd.config import load_config
from ncd.data.catalog import LAYOUTS

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
CONFIG_DIR = REPO / "ncd" / "configs"
KUBERAY_KINDS = ("RayJob", "RayCluster")
_COMMAND_RE = re.compile(r"python -m ray_jobs\.(\w+)([^\"&;|\n]*)")
_NCD_RE = re.compile(r"(?<![\w/.-])ncd ((?:demo-data|catalog|preprocess|evaluate|train|demo)\b[^\"&;|\n]*)")


def _yaml_files() -> list[Path]:
    return sorted(CLUSTER.glob("*.yaml"))


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _is_kuberay(doc: dict[str, Any]) -> bool:
    return str(doc.get("apiVersion", "")).startswith("ray.io/")


def _is_launcher(doc: dict[str, Any]) -> bool:
    return "available_node_types" in doc and "provider" in doc


def _cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def _containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [spec["headGroupSpec"]] + list(spec.get("workerGroupSpecs") or [])
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def _gpus(container: dict[str, Any]) -> int:
    limits = (container.get("resources") or {}).get("limits") or {}
    return int(limits.get("nvidia.com/gpu", 0))


def _command_texts() -> list[tuple[str, str]]:
    """(source, text) of every place that holds commands: RayJob entrypoints, README code blocks."""
    out = []
    for path in _yaml_files():
        for doc in _docs(path):
            if _is_kuberay(doc) and doc.get("kind") == "RayJob":
                out.append((path.name, str(doc["spec"]["entrypoint"])))
    readme = CLUSTER / "README.md"
    for i, block in enumerate(re.findall(r"```(?:bash|sh)?\n(.*?)```", readme.read_text(), re.S)):
        out.append((f"README.md block {i}", block.replace("\\\n", " ")))
    return out


def _commands() -> list[tuple[str, str, list[str]]]:
    cmds = []
    for source, text in _command_texts():
        for m in _COMMAND_RE.finditer(text):
            cmds.append((source, m.group(1), shlex.split(m.group(2))))
    return cmds


def _command_params() -> list[Any]:
    params = []
    for source, module, args in _commands():
        params.append(pytest.param(source, module, args, id=f"{source}:{module}"))
    return params


def _options(args: list[str]) -> tuple[list[str], str | None, list[str]]:
    """(--flags used, --config value, --set values)."""
    flags, config, sets = [], None, []
    for i, a in enumerate(args):
        if a.startswith("--"):
            flags.append(a.split("=", 1)[0])
            value = a.split("=", 1)[1] if "=" in a else (args[i + 1] if i + 1 < len(args) else "")
            if a.startswith("--config"):
                config = value
            elif a.startswith("--set"):
                sets.append(value)
    return flags, config, sets


def _resolve_config(name: str) -> Path:
    """As ``ncd.cli.config_path``: a YAML path (relative to the repo root) or a packaged name."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml"):
        return p if p.is_absolute() else REPO / p
    return CONFIG_DIR / f"{name}.yaml"


@functools.lru_cache(maxsize=None)
def _module_flags(module: str) -> frozenset[str]:
    """The options ``python -m ray_jobs.<module> --help`` lists."""
    mod = importlib.import_module(f"ray_jobs.{module}")
    out = _io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        mod.main(["--help"])
    text = re.split(r"^(?:options|optional arguments):$", out.getvalue(), maxsplit=1, flags=re.M)[-1]
    return frozenset(re.findall(r"^\s+(?:-\w, )?(--[a-z0-9][a-z0-9-]*)", text, re.M))


def test_cluster_files_present():
    names = {p.name for p in CLUSTER.iterdir()}
    for required in ("rayjob.yaml", "rayjob_smoke.yaml", "raycluster.yaml", "raycluster_smoke.yaml",
                     "cluster.yaml", "cluster_smoke.yaml", "runtime_env.yaml", "Dockerfile", "install_ncd.sh",
                     "README.md"):
        assert required in names, f"cluster/{required} is missing"


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: p.name)
def test_yaml_parses_and_has_a_known_shape(path):
    docs = _docs(path)
    assert docs, f"{path.name} is empty"
    for doc in docs:
        assert isinstance(doc, dict)
        if path.name == "runtime_env.yaml":
            continue
        assert _is_kuberay(doc) or _is_launcher(doc), f"{path.name}: neither a KubeRay manifest nor a launcher config"
        if _is_kuberay(doc):
            assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in KUBERAY_KINDS
            assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])


def test_every_config_has_a_cpu_smoke_twin():
    def kinds(p: Path) -> list[str]:
        return sorted(d.get("kind") or "launcher" for d in _docs(p))

    mains = [p for p in _yaml_files() if not p.stem.endswith("_smoke") and p.name != "runtime_env.yaml"]
    assert mains
    for p in mains:
        twin = p.with_name(f"{p.stem}_smoke.yaml")
        assert twin.is_file(), f"{p.name} has no smoke twin {twin.name}"
        assert kinds(twin) == kinds(p)


@pytest.mark.parametrize("path", [p for p in _yaml_files() if any(_is_kuberay(d) for d in _docs(p))],
                         ids=lambda p: p.name)
def test_kuberay_manifest(path):
    import ray

    smoke = path.stem.endswith("_smoke")
    for doc in _docs(path):
        spec = _cluster_spec(doc)
        assert spec["rayVersion"] == ray.__version__, "rayVersion must match the Ray that ncd is tested with"
        head = spec["headGroupSpec"]
        assert head["rayStartParams"].get("dashboard-host") == "0.0.0.0"
        for group in spec.get("workerGroupSpecs") or []:
            assert group["groupName"] and group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        containers = _containers(spec)
        for c in containers:
            assert c["image"] and ":" in c["image"], f"{c['name']}: pin the image tag"
            tag = c["image"].rsplit(":", 1)[1]
            assert ("cpu" in tag) == smoke and ("gpu" in tag) == (not smoke)
        gpus = sum(_gpus(c) for c in containers)
        assert (gpus == 0) if smoke else (gpus > 0), "GPU manifests need GPU workers, smoke twins none"
        if not smoke:
            assert any(_gpus(c) > 0 for g in spec["workerGroupSpecs"] for c in g["template"]["spec"]["containers"])
        if doc["kind"] == "RayJob":
            job = doc["spec"]
            assert job["shutdownAfterJobFinishes"] is True
            assert isinstance(job["ttlSecondsAfterFinished"], int) and job["ttlSecondsAfterFinished"] >= 0
            assert "python -m ray_jobs." in job["entrypoint"]
            _check_runtime_env(yaml.safe_load(job["runtimeEnvYAML"]))


def _check_runtime_env(env: Any) -> None:
    from ray.runtime_env import RuntimeEnv

    assert isinstance(env, dict)
    unknown = set(env) - set(RuntimeEnv.known_fields)
    assert not unknown, f"unknown runtime_env field(s) {unknown}"
    RuntimeEnv(**env)  # type checks (env_vars: str -> str, ...)


def test_runtime_env_file():
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    _check_runtime_env(env)
    assert {".venv", ".git", "outputs"} <= set(env["excludes"]), "never upload the venv, git or outputs"


@pytest.mark.parametrize("path", [p for p in _yaml_files() if any(_is_launcher(d) for d in _docs(p))],
                         ids=lambda p: p.name)
def test_launcher_config(path):
    import ray

    util = pytest.importorskip("ray.autoscaler._private.util")
    pytest.importorskip("jsonschema")
    smoke = path.stem.endswith("_smoke")
    (raw,) = _docs(path)
    util.validate_config(util.prepare_config(raw))  # Ray's own schema, with its defaults filled in
    assert raw["head_node_type"] in raw["available_node_types"]
    image = raw["docker"]["image"]
    assert image.startswith("rayproject/ray:") and image.split(":", 1)[1].startswith(ray.__version__)
    assert image.endswith("-cpu") == smoke and image.endswith("-gpu") == (not smoke)
    families = {t["node_config"]["InstanceType"].split(".")[0] for t in raw["available_node_types"].values()}
    gpu_families = {"g4dn", "g5", "g6", "g6e", "p3", "p4d", "p4de", "p5"}
    if smoke:
        assert not families & gpu_families
    else:
        assert {"g5", "p4d"} <= families
    assert raw["file_mounts"] == {"/home/ray/ncd": "."}
    (setup,) = [shlex.split(c) for c in raw["setup_commands"] if "install_ncd.sh" in c]
    assert setup[:3] == ["bash", "/home/ray/ncd/cluster/install_ncd.sh", "/home/ray/ncd"]
    assert ("gpu" in setup[3:4]) == (not smoke)


def test_dockerfile():
    import ray

    text = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^ARG RAY_IMAGE=(\S+)", text, re.M)
    assert base and base.group(1) == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert re.search(r"^FROM \$\{RAY_IMAGE\}", text, re.M)
    assert re.search(r"^ARG NCD_EXTRAS=gpu$", text, re.M)
    for path in ("pyproject.toml", "ncd", "ray_jobs", "cluster/install_ncd.sh"):
        assert (REPO / path).exists() and re.search(rf"^COPY .*\b{re.escape(path)}\b", text, re.M)
    assert re.search(r'^RUN bash cluster/install_ncd.sh /home/ray/ncd "\$\{NCD_EXTRAS\}"', text, re.M)


def test_install_script():
    import shutil
    import subprocess

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11, as in the cluster images
    script = CLUSTER / "install_ncd.sh"
    if shutil.which("bash"):
        subprocess.run(["bash", "-n", str(script)], check=True)
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras.get("gpu"), "install_ncd.sh reinstalls the gpu extra's packages: pyproject needs one"


def test_commands_were_found():
    modules = {m for _, m, _ in _commands()}
    assert {"preprocess", "train", "tune", "discover"} <= modules


@pytest.mark.parametrize(("source", "module", "args"), _command_params())
def test_command(source, module, args):
    assert (REPO / "ray_jobs" / f"{module}.py").is_file(), f"{source}: ray_jobs/{module}.py does not exist"
    flags, config, sets = _options(args)
    unknown = sorted(set(flags) - _module_flags(module))
    assert not unknown, f"{source}: python -m ray_jobs.{module} has no option(s) {unknown}"
    path = _resolve_config(config) if config else None
    if path is not None:
        assert path.is_file(), f"{source}: config {config!r} not found ({path})"
    cfg = load_config(path, sets)  # unknown keys or bad values raise ConfigError
    for s in sets:
        if s.startswith("data.layout="):
            assert cfg.data.layout in LAYOUTS, f"{source}: unknown layout {cfg.data.layout!r}"


@pytest.mark.parametrize(("source", "module", "args"),
                         [pytest.param(*c, id=f"{c[0]}:{c[1]}") for c in _commands() if "--config" in c[2]])
def test_bare_config_names_resolve(source, module, args):
    _, config, _ = _options(args)
    if config is None or Path(config).suffix in (".yaml", ".yml"):
        return
    module_file = REPO / "ray_jobs" / f"{module}.py"
    if not module_file.is_file():
        pytest.skip(f"ray_jobs/{module}.py does not exist (test_command reports it)")
    src = module_file.read_text()
    resolves = any(f"{name}(" in src for name in ("config_path", "discover_config", "detect_config", "start_job"))
    assert resolves, f"{source}: ray_jobs/{module}.py must resolve --config {config!r} with ncd.cli.config_path"


def test_ncd_cli_commands_parse():
    from ray_jobs.cli import build_parser

    found = 0
    for source, text in _command_texts():
        for m in _NCD_RE.finditer(text):
            found += 1
            try:
                build_parser().parse_args(shlex.split(m.group(1)))
            except SystemExit:
                pytest.fail(f"{source}: `ncd {m.group(1).strip()}` does not parse")
    assert found
