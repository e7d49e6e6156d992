"""cluster/: every YAML parses; KubeRay manifests and the cluster launcher config would run this project."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from packaging.requirements import Requirement

from raysft.pipeline.config import Config

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
DEPENDENCIES = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
RAY_VERSION = next(str(r.specifier).lstrip("=") for r in DEPENDENCIES if r.name == "ray")


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def all_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in sorted(CLUSTER.rglob("*.yaml")) for d in docs(p)]


def test_every_yaml_parses():
    paths = sorted(CLUSTER.rglob("*.yaml")) + sorted(CLUSTER.rglob("*.yml"))
    assert len(paths) >= 4
    for p in paths:
        assert docs(p), f"{p} is empty"


# ---------------------------------------------------------------- KubeRay


def kuberay() -> list[tuple[Path, dict]]:
    found = [(p, d) for p, d in all_docs() if str(d.get("apiVersion", "")).startswith("ray.io")]
    assert {d["kind"] for _, d in found} >= {"RayCluster", "RayJob"}
    return found


def cluster_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def pod_specs(spec: dict) -> list[tuple[str, dict]]:
    return [("head", spec["headGroupSpec"]["template"]["spec"])] + [
        (g["groupName"], g["template"]["spec"]) for g in spec["workerGroupSpecs"]
    ]


def shared_claims() -> dict[str, str]:
    """PersistentVolumeClaims shipped in cluster/ that every pod can write at once (RWX): name -> file."""
    return {
        d["metadata"]["name"]: p.name
        for p, d in all_docs()
        if d.get("kind") == "PersistentVolumeClaim" and "ReadWriteMany" in d["spec"]["accessModes"]
    }


def test_kuberay_required_fields():
    for path, doc in kuberay():
        where = f"{path.name} {doc['kind']}"
        assert doc["apiVersion"] == "ray.io/v1", where
        assert doc["metadata"]["name"], where
        spec = cluster_spec(doc)
        assert spec["rayVersion"] == RAY_VERSION, where
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0", where
        assert head["rayStartParams"].get("num-gpus") == "0", f"{where}: the head should not take training workers"
        gpu_groups = 0
        for group in spec["workerGroupSpecs"]:
            assert group["groupName"] and "rayStartParams" in group, where
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], where
            for c in group["template"]["spec"]["containers"]:
                limits, requests = c["resources"]["limits"], c["resources"].get("requests", {})
                if int(limits.get("nvidia.com/gpu", 0)) >= 1:
                    gpu_groups += 1
                    assert requests.get("nvidia.com/gpu", limits["nvidia.com/gpu"]) == limits["nvidia.com/gpu"], where
        assert gpu_groups >= 1, f"{where}: no worker group with nvidia.com/gpu limits"
        for name, pod in pod_specs(spec):
            for c in pod["containers"]:
                assert c["image"].endswith("raysft:0.1.0") and c["resources"]["limits"]["memory"], (where, name)


def test_kuberay_checkpoints_go_to_storage_every_pod_shares():
    claims = shared_claims()
    assert claims, "no ReadWriteMany PersistentVolumeClaim in cluster/"
    for path, doc in kuberay():
        for name, pod in pod_specs(cluster_spec(doc)):
            volumes = {v["name"]: v for v in pod["volumes"]}
            mounts = {m["mountPath"]: m["name"] for c in pod["containers"] for m in c["volumeMounts"]}
            shared = [
                mp for mp, v in mounts.items() if volumes[v].get("persistentVolumeClaim", {}).get("claimName") in claims
            ]
            assert shared == ["/mnt/shared"], f"{path.name} {doc['kind']} {name}: shared volume not mounted"


def test_rayjob_runs_raysft_on_a_valid_config():
    configmaps = {d["metadata"]["name"]: d for _, d in all_docs() if d.get("kind") == "ConfigMap"}
    for path, job in [(p, d) for p, d in kuberay() if d["kind"] == "RayJob"]:
        spec = job["spec"]
        m = re.fullmatch(r"raysft (train|tune) (\S+\.yaml)( .*)?", spec["entrypoint"])
        assert m, f"{path.name}: entrypoint {spec['entrypoint']!r} does not run raysft"
        assert spec["shutdownAfterJobFinishes"] is True
        # the config file the entrypoint names is mounted from a ConfigMap on the head, where the job's driver runs
        head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
        config_path = Path(m.group(2))
        mount = next(
            mt for c in head["containers"] for mt in c["volumeMounts"] if mt["mountPath"] == str(config_path.parent)
        )
        volume = next(v for v in head["volumes"] if v["name"] == mount["name"])
        text = configmaps[volume["configMap"]["name"]]["data"][config_path.name]
        cfg = Config.from_dict(yaml.safe_load(text), source=f"{path.name}:{config_path.name}")
        assert cfg.run.storage_path.startswith(("/mnt/shared/", "s3://", "gs://")), cfg.run.storage_path
        assert cfg.scaling.use_gpu and cfg.run.max_failures >= 1
        assert not cfg.train.kernels, f"{path.name}: train.kernels stays off until a recorded GPU run verifies them"
        gpus = sum(
            g["maxReplicas"]
            * int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
            for g in spec["rayClusterSpec"]["workerGroupSpecs"]
        )
        assert cfg.scaling.num_workers * cfg.scaling.gpus_per_worker <= gpus, "the job cannot fit the cluster"


def test_example_files_named_in_cluster_recipes_and_docs_exist():
    named = {}
    docs = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    for path in [*sorted(p for p in CLUSTER.rglob("*") if p.is_file()), *docs]:
        for name in re.findall(r"examples/[\w.-]+\.(?:yaml|py)", path.read_text(errors="replace")):
            named.setdefault(name, path.relative_to(REPO).as_posix())
    assert named, "no example named in cluster/, README.md or docs/"
    missing = {name: where for name, where in named.items() if not (REPO / name).is_file()}
    assert not missing, f"files named but not in the repository (name: where): {missing}"


# ---------------------------------------------------------------- cluster launcher


def launcher() -> tuple[Path, dict]:
    found = [(p, d) for p, d in all_docs() if "available_node_types" in d]
    assert len(found) == 1
    return found[0]


def test_launcher_has_head_and_gpu_worker_types():
    path, cfg = launcher()
    assert cfg["provider"]["type"] in ("aws", "gcp", "azure")
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert types[cfg["head_node_type"]]["resources"].get("GPU", 0) == 0
    gpu_workers = [n for n, t in types.items() if n != cfg["head_node_type"] and t["resources"].get("GPU", 0) >= 1]
    assert gpu_workers and all(types[n]["max_workers"] >= types[n]["min_workers"] >= 1 for n in gpu_workers)
    assert cfg["max_workers"] >= sum(types[n]["min_workers"] for n in gpu_workers)
    assert re.fullmatch(rf"rayproject/ray:{re.escape(RAY_VERSION)}-py3\d+-gpu", cfg["docker"]["image"])


def test_launcher_setup_installs_and_runs_this_project():
    path, cfg = launcher()
    # the repository is synced to the nodes, then its pinned deps and raysft are installed, then raysft runs
    remote_repo = next(dst for dst, src in cfg["file_mounts"].items() if src == ".")
    cmds = cfg["setup_commands"]
    assert f"pip install -r {remote_repo}/cluster/requirements-gpu.txt" in cmds
    assert any(re.fullmatch(rf"pip install (--no-deps )?(-e )?{re.escape(remote_repo)}", c) for c in cmds)
    assert any(c.startswith("raysft ") for c in cmds)
    assert (REPO / "cluster" / "requirements-gpu.txt").is_file()
    assert any(".venv" in e for e in cfg["rsync_exclude"]) and any(".env" in e for e in cfg["rsync_exclude"])
    # run.storage_path: one shared filesystem on every node, visible inside the containers
    assert any("mount" in c and "/mnt/shared" in c for c in cfg["initialization_commands"])
    assert "-v /mnt/shared:/mnt/shared" in cfg["docker"]["run_options"]
    head = " ".join(cfg["head_start_ray_commands"])
    assert "ray start --head" in head and "--dashboard-host=0.0.0.0" in head and "--port=6379" in head
    assert "ray start --address=$RAY_HEAD_IP:6379" in " ".join(cfg["worker_start_ray_commands"])


# ---------------------------------------------------------------- container recipe and pins


def pins() -> dict[str, str]:
    out = {}
    for line in (CLUSTER / "requirements-gpu.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            out[name.lower()] = version
    return out


def test_pins_cover_and_satisfy_the_project_dependencies():
    pinned = pins()
    for req in DEPENDENCIES:
        if req.name == "ray":
            continue  # the base image provides it
        assert req.name.lower() in pinned, f"{req.name} is not pinned in cluster/requirements-gpu.txt"
        assert req.specifier.contains(pinned[req.name.lower()], prereleases=True), (req, pinned[req.name.lower()])


def test_dockerfile_builds_on_ray_gpu_image_with_pinned_deps_and_raysft():
    text = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    assert re.fullmatch(rf"rayproject/ray:{re.escape(RAY_VERSION)}-py3\d+-gpu", base), base
    assert "pip install -r cluster/requirements-gpu.txt" in text
    for src in ("pipeline/", "kernels/", "pyproject.toml"):
        assert re.search(rf"^COPY .*{re.escape(src)}", text, re.M), src
    assert re.search(r"pip install --no-deps \.", text) and "raysft --help" in text


def test_recipes_name_examples_that_exist():
    """Every examples/*.yaml a cluster recipe or its README tells users to run is in the repository."""
    named = set()
    for path in [*CLUSTER.rglob("*.yaml"), CLUSTER / "README.md"]:
        named |= set(re.findall(r"examples/[\w.-]+\.yaml", path.read_text()))
    assert named, "the recipes name no example"
    missing = sorted(n for n in named if not (REPO / n).is_file())
    assert not missing, missing
