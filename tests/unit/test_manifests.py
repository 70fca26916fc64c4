"""The Kubernetes deployment (deploy/kubernetes/) and its image
(deploy/container/), checked without a cluster and without a container engine.

No kube-apiserver, kubectl or kustomize runs here, and no image can be built.
So the kustomize base is rendered by a small renderer below (it accepts only
what the base uses: ``resources:`` naming local files, and refuses anything
else rather than render it wrongly), every object is validated by
kubernetes-validate's strict schemas for each Kubernetes version from 1.28 to
1.37, and then checked for what a reviewer checks and a schema cannot: the
RBAC rules, the DaemonSet's node-level settings, capabilities, probes, mounts,
that its arguments parse with the agent's own CLI parser and that the
ConfigMap's policy passes the agent's own validation. The Containerfile is
parsed instruction by instruction; its apt packages are compared with
``run``'s ``apt_packages`` (read from the script, so the two cannot drift) and
its entrypoint is run against this checkout's agent.
"""

from __future__ import annotations

import argparse
import fnmatch
import functools
import json
import posixpath
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from egress_agent.agent.cli import _parser
from egress_agent.agent.handover import DRAIN_GRACE
from egress_agent.agent.status import parse_address
from egress_agent.bpf.cache import DEFAULT_CACHE_DIR
from egress_agent.policy.load import parse_policy
from egress_agent.rules.render import render_ruleset

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "deploy" / "kubernetes"
CONTAINERFILE = REPO / "deploy" / "container" / "Containerfile"
DOCKERIGNORE = CONTAINERFILE.with_name("Containerfile.dockerignore")
RUN_SCRIPT = REPO / "run"
UNIT = REPO / "deploy" / "systemd" / "egress-agent.service"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())

NAMESPACE = "egress-agent"
KUBERNETES_VERSIONS = [f"1.{minor}.0" for minor in range(28, 38)]
# NET_ADMIN for the nftables datapath; the rest for the BPF datapath (bcc).
CAPABILITIES = {"NET_ADMIN", "BPF", "PERFMON"}
STATUS = ("127.0.0.1", 15021)
# The image installs run's apt_packages and these besides.
IMAGE_EXTRA_PACKAGES = {"ca-certificates"}
IMAGE_VENV = "/opt/egress-agent/.venv"
IMAGE_AGENT = f"{IMAGE_VENV}/bin/egress-agent"
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding"}

Resource = dict[str, Any]


# --- rendering the kustomize base ------------------------------------------------


def render_kustomization(folder: Path) -> list[Resource]:
    """What ``kubectl kustomize FOLDER`` prints, for the subset of kustomize
    this base uses: ``resources:`` naming files in the folder, each holding one
    or more objects. Generators, patches and namespace, label or image
    transformers would change the output: they are refused, not ignored."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert kustomization.get("apiVersion") == "kustomize.config.k8s.io/v1beta1"
    assert kustomization.get("kind") == "Kustomization"
    unsupported = sorted(set(kustomization) - {"apiVersion", "kind", "resources"})
    assert not unsupported, f"the test's renderer does not implement {unsupported}"
    objects: list[Resource] = []
    for entry in kustomization["resources"]:
        path = folder / entry
        assert path.parent == folder and path.is_file(), f"{entry}: not a file of the base"
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            assert isinstance(doc, dict), f"{entry}: a document that is not a mapping"
            objects.append(doc)
    # kustomize refuses two objects with the same id.
    ids = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objects]
    assert len(ids) == len(set(ids)), f"duplicate objects: {ids}"
    return objects


@functools.cache
def rendered() -> tuple[Resource, ...]:
    return tuple(render_kustomization(BASE))


def the(kind: str) -> Resource:
    found = [o for o in rendered() if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pod_spec() -> Resource:
    spec: Resource = the("DaemonSet")["spec"]["template"]["spec"]
    return spec


def container() -> Resource:
    containers = pod_spec()["containers"]
    assert len(containers) == 1
    c: Resource = containers[0]
    return c


def agent_args() -> argparse.Namespace:
    return _parser().parse_args(container()["args"])


def mount_at(path: str) -> Resource:
    found = [m for m in container()["volumeMounts"] if m["mountPath"] == path]
    assert len(found) == 1, f"expected one volume mount at {path}, found {found}"
    return found[0]


def volume(name: str) -> Resource:
    found = [v for v in pod_spec()["volumes"] if v["name"] == name]
    assert len(found) == 1, f"expected one volume {name}"
    return found[0]


def test_kustomization_lists_every_manifest() -> None:
    listed = yaml.safe_load((BASE / "kustomization.yaml").read_text())["resources"]
    assert len(listed) == len(set(listed))
    on_disk = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(listed) == on_disk
    assert {o["kind"] for o in rendered()} == {
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "DaemonSet",
    }


# --- schemas ---------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_objects_pass_kubernetes_validate_strict(version: str) -> None:
    """Strict: unknown fields are errors. A kind without a schema is an error
    here too (the CLI only warns about it)."""
    errors = []
    for obj in rendered():
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        try:
            validated = kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            errors.append(f"{name}: {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            errors.append(f"{name}: {exc.message}")
        else:
            # Validated against this version's own schemas, not an older fallback.
            assert validated == version.rsplit(".", 1)[0], (name, validated)
    assert errors == []


def test_kubernetes_validate_cli_accepts_the_rendered_base(tmp_path: Path) -> None:
    """The command a reviewer would run on `kubectl kustomize` output."""
    out = tmp_path / "rendered.yaml"
    out.write_text(yaml.safe_dump_all(rendered(), sort_keys=False))
    versions = [arg for v in KUBERNETES_VERSIONS for arg in ("-k", v)]
    result = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", *versions, str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # --quiet prints only problems, including WARN for a kind it has no schema for.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


# --- objects and references ------------------------------------------------------


def test_objects_live_in_the_agents_namespace_and_refer_to_each_other() -> None:
    assert the("Namespace")["metadata"]["name"] == NAMESPACE
    for obj in rendered():
        if obj["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in obj["metadata"], obj["kind"]
        else:
            assert obj["metadata"]["namespace"] == NAMESPACE, obj["kind"]

    account = the("ServiceAccount")["metadata"]["name"]
    assert pod_spec()["serviceAccountName"] == account
    assert pod_spec().get("automountServiceAccountToken", True) is True

    binding = the("ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": the("ClusterRole")["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}
    ]

    config_map = the("ConfigMap")
    assert config_map["metadata"]["name"] == "egress-agent-policy"
    policy_volume = volume(mount_at(posixpath.dirname(agent_args().policy))["name"])
    assert policy_volume["configMap"]["name"] == config_map["metadata"]["name"]


def test_cluster_role_reads_pods_and_namespaces_and_nothing_else() -> None:
    role = the("ClusterRole")
    assert "aggregationRule" not in role
    granted = set()
    for rule in role["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, rule  # no names, no URLs
        granted |= {
            (group, resource, verb)
            for group in rule["apiGroups"]
            for resource in rule["resources"]
            for verb in rule["verbs"]
        }
    assert granted == {
        ("", resource, verb)
        for resource in ("pods", "namespaces")
        for verb in ("get", "list", "watch")
    }


# --- the DaemonSet ---------------------------------------------------------------


def test_daemonset_runs_on_every_node_in_the_nodes_network() -> None:
    ds = the("DaemonSet")
    spec = pod_spec()
    assert ds["spec"]["selector"]["matchLabels"].items() <= (
        ds["spec"]["template"]["metadata"]["labels"].items()
    )
    assert spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["tolerations"] == [{"operator": "Exists"}]
    assert not spec.get("hostPID") and not spec.get("hostIPC")
    assert "initContainers" not in spec
    # Teardown is well under a second; at least the systemd unit's TimeoutStopSec.
    unit_timeout = int(re.search(r"^TimeoutStopSec=(\d+)$", UNIT.read_text(), re.M)[1])
    assert spec["terminationGracePeriodSeconds"] >= unit_timeout


def test_rolling_update_surges_and_hands_over() -> None:
    """The new agent starts next to the old one and takes its listening
    sockets over (agent.handover): maxUnavailable 0, so a node is never
    without an agent; no declared host port, so the surge pod is scheduled;
    the old one waits for its deletion instead of being restarted; and its
    drain grace fits in the termination grace period."""
    strategy = the("DaemonSet")["spec"]["updateStrategy"]
    assert strategy == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }
    assert pod_spec()["hostNetwork"] is True
    assert "ports" not in container()
    args = agent_args()
    assert args.handover is True and args.after_handover == "wait"
    assert pod_spec()["terminationGracePeriodSeconds"] > DRAIN_GRACE
    readme = (BASE / "README.md").read_text()
    assert "maxUnavailable: 0, maxSurge: 1" in readme


def test_container_holds_exactly_the_chosen_capabilities() -> None:
    sc = container()["securityContext"]
    assert sc["privileged"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    added = sc["capabilities"]["add"]
    assert len(added) == len(set(added)) and set(added) == CAPABILITIES
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    # Root (`egress-agent run` requires uid 0), limited to the capabilities above.
    assert sc["runAsUser"] == 0
    # Whatever the VM's systemd unit allows, the pod allows too.
    unit_caps = re.search(r"^CapabilityBoundingSet=(.*)$", UNIT.read_text(), re.M)[1].split()
    assert {c.removeprefix("CAP_") for c in unit_caps} <= CAPABILITIES
    for obj in (pod_spec().get("securityContext", {}), sc):
        assert "privileged" not in obj or obj["privileged"] is False


def test_probes_reach_the_status_endpoint_on_loopback() -> None:
    c = container()
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        http_get = c[probe]["httpGet"]
        assert http_get.get("scheme", "HTTP") == "HTTP"
        assert (http_get["host"], http_get["port"], http_get["path"]) == (*STATUS, path)
    assert parse_address(agent_args().status_address) == STATUS


def test_args_parse_with_the_agents_cli() -> None:
    c = container()
    assert "command" not in c, "the image's entrypoint is egress-agent; only args are given"
    args = agent_args()
    assert args.command == "run"
    assert args.policy == "/etc/egress-agent/policy.yaml"
    assert args.audit_log == "/var/log/egress-agent/audit.jsonl"


def test_node_name_comes_from_the_downward_api() -> None:
    env = {e["name"]: e for e in container()["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert "value" not in env["NODE_NAME"]


def test_policy_is_mounted_as_a_directory_for_live_reload() -> None:
    """A subPath mount freezes the file at pod start; the directory mount sees
    the kubelet's ..data symlink swap, which the agent's folder watch reloads on."""
    folder, name = posixpath.split(agent_args().policy)
    mount = mount_at(folder)
    assert "subPath" not in mount and "subPathExpr" not in mount
    assert mount.get("readOnly") is True
    config_map = volume(mount["name"])["configMap"]
    assert name in the("ConfigMap")["data"]
    items = config_map.get("items")
    assert items is None or {"key": name, "path": name} in items


def test_every_path_the_agent_writes_is_a_writable_mount() -> None:
    """The root file system is read-only: the audit log's folder, bpffs,
    /tmp and the BPF compile cache's folder must be mounts."""
    audit = mount_at(posixpath.dirname(agent_args().audit_log))
    assert not audit.get("readOnly")
    assert volume(audit["name"])["hostPath"] == {
        "path": "/var/log/egress-agent",
        "type": "DirectoryOrCreate",
    }
    tmp = mount_at("/tmp")
    assert not tmp.get("readOnly") and "emptyDir" in volume(tmp["name"])
    assert agent_args().bpf_cache_dir is None  # the default, below:
    cache = mount_at(posixpath.dirname(DEFAULT_CACHE_DIR))
    assert not cache.get("readOnly") and "emptyDir" in volume(cache["name"])


def test_host_mounts_for_bcc() -> None:
    """bpffs with HostToContainer (Bidirectional is refused for non-privileged
    containers), kernel headers read-only at the node's own paths: the
    /lib/modules/$(uname -r)/build symlink points into /usr/src by absolute path.
    The node's bpffs appears outside /sys/fs (default AppArmor profiles deny
    writes there) and the agent pins below it."""
    expect = {
        "/run/egress-agent/bpffs": ("/sys/fs/bpf", "Directory", False, "HostToContainer"),
        "/lib/modules": ("/lib/modules", "Directory", True, None),
        "/usr/src": ("/usr/src", "Directory", True, None),
    }
    for path, (host_path, kind, read_only, propagation) in expect.items():
        mount = mount_at(path)
        assert volume(mount["name"])["hostPath"] == {"path": host_path, "type": kind}
        assert bool(mount.get("readOnly")) is read_only, path
        assert mount.get("mountPropagation") == propagation, path
    for mount in container()["volumeMounts"]:
        assert mount.get("mountPropagation") != "Bidirectional"
    args = agent_args()
    assert args.datapath == "auto"
    assert posixpath.dirname(args.bpf_pin_dir) == "/run/egress-agent/bpffs"


def test_every_mount_names_a_volume_and_every_volume_is_mounted() -> None:
    mounts = [m["name"] for m in container()["volumeMounts"]]
    volumes = [v["name"] for v in pod_spec()["volumes"]]
    assert len(volumes) == len(set(volumes))
    assert sorted(mounts) == sorted(volumes)


_QUANTITY_UNITS = {"m": Fraction(1, 1000), "": Fraction(1), "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


def _quantity(value: str | int) -> Fraction:
    match = re.fullmatch(r"(\d+)(m|Ki|Mi|Gi|)", str(value))
    assert match, f"unexpected quantity {value!r}"
    return int(match[1]) * Fraction(_QUANTITY_UNITS[match[2]])


def test_resources_have_requests_and_limits() -> None:
    resources = container()["resources"]
    for name in ("cpu", "memory"):
        request = _quantity(resources["requests"][name])
        limit = _quantity(resources["limits"][name])
        assert 0 < request <= limit, name


def test_image_is_this_packages_version() -> None:
    c = container()
    assert c["image"] == f"egress-agent:{PYPROJECT['project']['version']}"
    assert c["imagePullPolicy"] == "IfNotPresent"


# --- the policy in the ConfigMap -------------------------------------------------


def _configmap_policy() -> str:
    text: str = the("ConfigMap")["data"][posixpath.basename(agent_args().policy)]
    return text


def test_configmap_policy_passes_the_agents_validation() -> None:
    policy = parse_policy(_configmap_policy(), source_name="policy.yaml")
    render_ruleset(policy)  # what `egress-agent check` does besides
    assert policy.workloads and policy.intercept and policy.egress
    assert policy.default.value == "deny"


def test_configmap_policy_passes_check_through_the_images_entrypoint(tmp_path: Path) -> None:
    """The image's ENTRYPOINT with this checkout's agent in place of the
    image's: the DaemonSet's args reach egress-agent as they are."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(_configmap_policy())
    agent = Path(sys.executable).with_name("egress-agent")
    assert agent.is_file(), f"no {agent}: run ./run setup"
    entrypoint = _exec_form(_only("ENTRYPOINT").value)
    assert entrypoint[:2] == ["/bin/sh", "-c"] and entrypoint[3:] == ["egress-agent"]
    script = entrypoint[2]
    assert script.count(IMAGE_AGENT) == 1
    result = subprocess.run(
        [
            "/bin/sh",
            "-c",
            script.replace(IMAGE_AGENT, str(agent)),
            "egress-agent",
            "check",
            str(policy),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert f"{policy}: ok" in result.stderr


# --- the Containerfile -----------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    value: str
    line: int


KEYWORDS = {
    "FROM", "RUN", "COPY", "ADD", "ENV", "ARG", "LABEL", "WORKDIR", "USER",
    "ENTRYPOINT", "CMD", "EXPOSE", "VOLUME", "SHELL", "STOPSIGNAL", "HEALTHCHECK", "ONBUILD",
}  # fmt: skip


def parse_containerfile(text: str) -> list[Instruction]:
    """Dockerfile syntax: comments (also inside a continued instruction) are
    dropped, a trailing backslash continues the instruction on the next line."""
    instructions: list[Instruction] = []
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not parts:
            start = number
        continued = line.endswith("\\")
        parts.append(line.removesuffix("\\").strip())
        if continued:
            continue
        keyword, _, value = " ".join(parts).partition(" ")
        parts = []
        assert keyword in KEYWORDS, f"line {start}: unknown instruction {keyword!r}"
        assert value.strip(), f"line {start}: {keyword} without arguments"
        instructions.append(Instruction(keyword, value.strip(), start))
    assert not parts, "the last instruction ends with a line continuation"
    return instructions


@functools.cache
def containerfile() -> tuple[Instruction, ...]:
    return tuple(parse_containerfile(CONTAINERFILE.read_text()))


def _all(keyword: str) -> list[Instruction]:
    return [i for i in containerfile() if i.keyword == keyword]


def _only(keyword: str) -> Instruction:
    found = _all(keyword)
    assert len(found) == 1, f"expected one {keyword}, found {len(found)}"
    return found[0]


def _exec_form(value: str) -> list[str]:
    parsed = json.loads(value)
    assert isinstance(parsed, list) and parsed and all(isinstance(s, str) for s in parsed)
    return parsed


def _copies() -> list[tuple[list[str], str]]:
    copies = []
    for ins in _all("COPY"):
        words = shlex.split(ins.value)
        assert not any(w.startswith("--") for w in words), f"line {ins.line}: COPY flags"
        assert len(words) >= 2, f"line {ins.line}: COPY needs a source and a destination"
        copies.append((words[:-1], words[-1]))
    return copies


def _commands(shell: str) -> list[list[str]]:
    """A RUN's `a && b && c` as word lists."""
    commands: list[list[str]] = [[]]
    for word in shlex.split(shell):
        if word == "&&":
            commands.append([])
        else:
            commands[-1].append(word)
    return commands


def run_apt_packages() -> list[str]:
    """run's apt_packages, as bash reads the array."""
    match = re.search(r"^apt_packages=\(.*?^\)$", RUN_SCRIPT.read_text(), re.M | re.S)
    assert match, "no apt_packages=( ... ) in run"
    result = subprocess.run(
        ["bash", "-c", match[0] + '\nprintf "%s\\n" "${apt_packages[@]}"'],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    packages = result.stdout.split()
    assert "nftables" in packages and "python3-bpfcc" in packages
    return packages


def test_containerfile_is_well_formed() -> None:
    instructions = containerfile()
    assert instructions[0].keyword == "FROM"
    assert _only("FROM").value.split() == ["debian:12-slim"]
    assert not _all("USER"), "the agent runs as root (see the Containerfile's comment)"
    for ins in _all("RUN"):
        if ins.value.startswith("["):
            _exec_form(ins.value)
            continue
        # Docker runs shell-form RUN with /bin/sh -c: the shell must accept it.
        check = subprocess.run(
            ["sh", "-n", "-c", ins.value], capture_output=True, text=True, timeout=10, check=False
        )
        assert check.returncode == 0, f"line {ins.line}: {check.stderr}"
    for ins in _all("ENV"):
        for word in shlex.split(ins.value):
            assert re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", word), f"line {ins.line}: {word}"
    _exec_form(_only("ENTRYPOINT").value)
    _exec_form(_only("CMD").value)


def test_containerfile_installs_runs_apt_packages() -> None:
    installs = [
        (ins, cmd)
        for ins in _all("RUN")
        for cmd in _commands(ins.value)
        if cmd[:2] == ["apt-get", "install"]
    ]
    assert len(installs) == 1
    ins, cmd = installs[0]
    packages = [w for w in cmd[2:] if not w.startswith("-")]
    assert len(packages) == len(set(packages))
    assert set(packages) == set(run_apt_packages()) | IMAGE_EXTRA_PACKAGES
    # In the same layer as the index it installs from, which it then removes.
    commands = _commands(ins.value)
    assert commands[0] == ["apt-get", "update"]
    assert ["rm", "-rf", "/var/lib/apt/lists/*"] in commands


def test_every_package_below_a_part_is_in_the_distribution() -> None:
    # The wheel holds only the packages pyproject lists: a subpackage left
    # out imports from a checkout and fails once installed.
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    for package in sorted(p for p in listed if p.count(".") == 1):
        folder = REPO / package.replace(".", "/")
        for init in sorted(folder.resolve().rglob("__init__.py")):
            sub = init.parent.relative_to(folder.resolve())
            name = ".".join((package, *sub.parts))
            assert name in listed, f"{name} is not in [tool.setuptools] packages"


def test_containerfile_copies_and_installs_the_whole_package() -> None:
    needed = {"pyproject.toml", PYPROJECT["project"]["readme"], "egress_agent"}
    # A part is a symlink egress_agent/<part> -> ../<part>; COPY egress_agent/
    # copies the links alone, so each part's own folder is copied too (and
    # with it the part's subpackages, egress_agent/<part>/<sub>).
    for package in PYPROJECT["tool"]["setuptools"]["packages"]:
        path = REPO / package.replace(".", "/")
        if package.count(".") == 1:
            assert path.is_symlink(), f"{package}: not a symlink to a part's folder"
            needed.add(str(path.resolve().relative_to(REPO)))
    copied = {}
    for sources, dest in _copies():
        assert dest.startswith("/src/"), dest
        for source in sources:
            path = REPO / source
            assert not Path(source).is_absolute() and ".." not in Path(source).parts
            assert path.exists(), f"COPY {source}: not in the build context"
            if path.is_dir():
                # COPY with several folders merges their contents into one.
                assert len(sources) == 1, f"COPY {sources}: one folder per COPY"
                assert dest == f"/src/{source.rstrip('/')}/", (source, dest)
            else:
                assert dest.endswith("/"), dest
            copied[source.rstrip("/")] = dest
    assert needed <= set(copied), f"not copied: {sorted(needed - set(copied))}"

    steps = [cmd for ins in _all("RUN") for cmd in _commands(ins.value)]
    venv = ["/usr/bin/python3", "-m", "venv", "--system-site-packages", IMAGE_VENV]
    assert venv in steps
    pip = f"{IMAGE_VENV}/bin/pip"
    assert any(cmd[:2] == [pip, "install"] and cmd[-1] == "/src" for cmd in steps)
    assert "-e" not in [w for cmd in steps if cmd[:2] == [pip, "install"] for w in cmd]


def test_entrypoint_is_the_agent_and_on_path() -> None:
    assert PYPROJECT["project"]["scripts"]["egress-agent"] == "egress_agent.agent.cli:main"
    script = _exec_form(_only("ENTRYPOINT").value)[2]
    # exec: egress-agent is PID 1 and receives SIGTERM itself.
    assert f'exec {IMAGE_AGENT} "$@"' in script
    env = dict(word.split("=", 1) for ins in _all("ENV") for word in shlex.split(ins.value))
    # `kubectl exec ... -- egress-agent status` finds the command.
    assert env["PATH"].split(":")[0] == f"{IMAGE_VENV}/bin"
    # The audit log is created 0640, as under the systemd unit's UMask=0027.
    umask = subprocess.run(
        ["/bin/sh", "-c", script.replace(IMAGE_AGENT, "/bin/sh"), "egress-agent", "-c", "umask"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    assert umask.stdout.strip() == "0027"


def test_build_context_ignores_local_state() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert {".git", ".venv", "**/__pycache__"} <= set(patterns)
    assert not any(p.startswith("!") for p in patterns)
    for sources, _ in _copies():
        for source in sources:
            name = source.rstrip("/")
            hits = [p for p in patterns if fnmatch.fnmatch(name, p.removeprefix("**/"))]
            assert not hits, f"COPY {source} is excluded by {hits}"


def test_readme_says_how_to_apply() -> None:
    readme = (BASE / "README.md").read_text()
    assert "kubectl apply -k deploy/kubernetes" in readme
    assert "kubectl -n egress-agent exec ds/egress-agent -- egress-agent status" in readme


def test_cgroup_root_is_the_nodes_cgroup_hierarchy_read_only() -> None:
    """Cgroup workloads resolve paths under --cgroup-root: it must be the
    node's /sys/fs/cgroup (the container's own shows only its namespace)."""
    mount = mount_at(agent_args().cgroup_root)
    assert mount.get("readOnly") is True
    assert volume(mount["name"])["hostPath"] == {"path": "/sys/fs/cgroup", "type": "Directory"}
