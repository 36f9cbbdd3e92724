"""The package works installed, not only in this checkout (issue 15): a wheel built from a copy of the checkout and
`pip install .` both give an `orchestrator` that reads its configs (hydra_conf/ → orchestrator.hydra_conf) and its
KubeRay templates (k8s/ → orchestrator.k8s) from where it was installed. Each copy is installed with
`pip install --no-deps --target DIR` and run with PYTHONPATH=DIR from a directory outside the checkout, so the
editable install of scripts/setup.sh cannot shadow it (the test checks which files are imported). No index is
asked: the build uses the setuptools of this venv (--no-build-isolation)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

SOURCES = ("pyproject.toml", "README.md", "orchestrator", "launch", "hydra_plugins", "hydra_conf", "k8s")
IN_PACKAGE = {"hydra_conf": "orchestrator/hydra_conf", "k8s": "orchestrator/k8s"}  # checkout dir → wheel dir
SIZED = ["cluster.gpus=1", "cluster.gpu_memory_gb=80"]
# an experiment that exists only in the installed copy: a run that finds it read the installed configs
MARKER = "packaged_smoke"


def sh(args, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode == 0, f"{args}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def pip(*args) -> subprocess.CompletedProcess:
    return sh([sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", *args])


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A copy of what the package is built from (a build writes build/ and *.egg-info next to its sources)."""
    src = tmp_path_factory.mktemp("source") / "orchestrator-src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        else:
            shutil.copy2(path, src / name)
    return src


@pytest.fixture(scope="module")
def wheel(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheels")
    pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", out, source)
    (found,) = out.glob("orchestrator-*.whl")
    return found


def install(what, target: Path, *options) -> Path:
    pip("install", "--no-deps", "--no-index", "-q", *options, "--target", target, what)
    (target / "orchestrator" / "hydra_conf" / "experiment" / f"{MARKER}.yaml").write_text(
        f"# @package _global_\n# Only in the installed copy.\nname: {MARKER}\n", encoding="utf-8")
    return target


@pytest.fixture(scope="module")
def from_wheel(wheel, tmp_path_factory) -> Path:
    return install(wheel, tmp_path_factory.mktemp("site-wheel"))


@pytest.fixture(scope="module")
def from_source(source, tmp_path_factory) -> Path:
    return install(source, tmp_path_factory.mktemp("site-pip-install"), "--no-build-isolation")


def run_installed(site: Path, cwd: Path, *args) -> subprocess.CompletedProcess:
    """`args` with PYTHONPATH=site, in cwd (outside the checkout)."""
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("PYTHONSTARTUP", None)
    assert not cwd.resolve().is_relative_to(ROOT)
    return sh(args, cwd=cwd, env=env)


def test_the_wheel_holds_every_file_of_the_packages_configs_and_templates(source, wheel):
    expected = set()
    for name in SOURCES[2:]:
        for path in (source / name).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                relative = path.relative_to(source / name).as_posix()
                expected.add(f"{IN_PACKAGE.get(name, name)}/{relative}")
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if ".dist-info/" not in n}
    assert expected - shipped == set(), "files of the checkout missing from the wheel (pyproject.toml: packages)"
    assert "orchestrator/hydra_conf/config.yaml" in shipped and "orchestrator/k8s/base/rayjob.yaml" in shipped
    entry_points = next(n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".dist-info/entry_points.txt"))
    assert "orchestrator = orchestrator.__main__:cli" in zipfile.ZipFile(wheel).read(entry_points).decode()


@pytest.mark.parametrize("how", ["wheel", "pip install ."])
def test_the_installed_copy_is_what_runs(how, from_wheel, from_source, tmp_path):
    site = from_wheel if how == "wheel" else from_source
    probe = ("import orchestrator, orchestrator.hydra_conf, orchestrator.k8s, launch.rayjob, "
             "hydra_plugins.orchestrator_launcher as p\n"
             "for f in (orchestrator.__file__, orchestrator.hydra_conf.__file__, orchestrator.k8s.__file__, "
             "launch.rayjob.__file__, launch.rayjob.BASE, p.__file__): print(f)")
    files = run_installed(site, tmp_path, sys.executable, "-c", probe).stdout.split()
    assert len(files) == 6
    for path in files:
        assert Path(path).resolve().is_relative_to(site.resolve()), f"{path} is not from the installed copy"

    console_help = run_installed(site, tmp_path, site / "bin" / "orchestrator", "--help").stdout
    module_help = run_installed(site, tmp_path, sys.executable, "-m", "orchestrator", "--help").stdout
    assert console_help == module_help
    assert re.search(rf"\n  {MARKER} +Only in the installed copy\.\n", console_help)  # the installed configs
    assert "legal_demo" in console_help and "minilm" in console_help
    # no checkout next to it: the help says how to read the README installed as the package's description
    assert "README: the project's README.md; installed" in console_help
    command = console_help.split("package description:\n", 1)[1].split("\n")[0]
    readme = run_installed(site, tmp_path, "bash", "-c", command).stdout
    assert readme.startswith("# orchestrator") and "## Running" in readme


def test_a_dry_run_of_the_installed_wheel_plans_from_its_own_configs(from_wheel, tmp_path):
    """This machine's resources, the bundled sample data, the installed configs; no Ray (tests/unit/test_dry_run.py)."""
    result = run_installed(from_wheel, tmp_path, from_wheel / "bin" / "orchestrator", f"+experiment={MARKER}",
                           "dry_run=true")
    output = result.stdout + result.stderr
    assert "plan:" in output and "strategy=" in output and "323 train rows" in output
    (run_dir,) = (tmp_path / "runs" / MARKER).iterdir()  # named by the installed-only experiment
    assert (run_dir / "plan.json").is_file()
    sources = yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]["runtime"]["config_sources"]
    assert {"path": "orchestrator.hydra_conf", "schema": "pkg", "provider": "main"} in sources


def test_a_rayjob_dry_run_renders_from_the_installed_templates(from_wheel, tmp_path):
    run_dir = tmp_path / "job"
    result = run_installed(from_wheel, tmp_path, from_wheel / "bin" / "orchestrator", "launcher=rayjob",
                           "dry_run=true", *SIZED, f"hydra.run.dir={run_dir}")
    printed = [d for d in yaml.safe_load_all(result.stdout) if d]  # the claim, the job's ConfigMap, the RayJob
    assert [d["kind"] for d in printed] == ["PersistentVolumeClaim", "ConfigMap", "RayJob"]
    assert printed == [d for d in yaml.safe_load_all((run_dir / "rayjob.yaml").read_text()) if d]


def test_a_source_tree_without_the_package_mapping_reads_its_configs_beside_the_package(source, tmp_path):
    """`python -m orchestrator` at the root of a clone whose orchestrator is installed elsewhere (or not at all):
    orchestrator/ comes from the clone, which has no orchestrator/hydra_conf; its hydra_conf/ and k8s/ beside it
    are used (orchestrator/package_files.py). The venv's editable finder, which would map them, is taken out."""
    clone = tmp_path / "clone"
    shutil.copytree(source, clone)
    (clone / "hydra_conf" / "experiment" / f"{MARKER}.yaml").write_text(
        f"# @package _global_\n# Only in the clone.\nname: {MARKER}\n", encoding="utf-8")
    runner = ("import runpy, sys\n"
              "sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
              "sys.argv = ['orchestrator', *sys.argv[1:]]\n"
              "import orchestrator, orchestrator.package_files as files\n"
              "assert orchestrator.__file__.startswith(sys.path[0] or '.') or 'clone' in orchestrator.__file__\n"
              "print('package:', orchestrator.__file__, files.shipped('hydra_conf'), flush=True)\n"
              "runpy.run_module('orchestrator', run_name='__main__')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    helped = sh([sys.executable, "-c", runner, "--help"], cwd=clone, env=env).stdout
    assert f"package: {clone / 'orchestrator' / '__init__.py'} False" in helped
    assert re.search(rf"\n  {MARKER} +Only in the clone\.\n", helped)
    job = tmp_path / "job"
    result = sh([sys.executable, "-c", runner, f"+experiment={MARKER}", "launcher=rayjob", "dry_run=true", *SIZED,
                 f"hydra.run.dir={job}"], cwd=clone, env=env)
    printed = [d for d in yaml.safe_load_all(result.stdout.split("\n", 1)[1]) if d]  # after the package: line
    assert [d["kind"] for d in printed][-1] == "RayJob"
    assert (job / "rayjob.yaml").is_file()


def test_the_image_copies_every_directory_the_package_is_built_from():
    """k8s/Dockerfile installs the package from the directories it copies: each one pyproject.toml builds from
    (a package's top directory, or a mapped one: hydra_conf, k8s) must be copied, or the build fails."""
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = setuptools.get("package-dir", {})
    needed = {mapped.get(p, p.split(".")[0]).split("/")[0] for p in setuptools["packages"]
              if p in mapped or not any(p.startswith(f"{m}.") for m in mapped)}
    copied = set(re.findall(r"^COPY\s+(?:--\S+\s+)*(.+?)\s+\S+$", (ROOT / "k8s" / "Dockerfile").read_text(), re.M))
    sources = {name for line in copied for name in line.split()}
    assert needed == {"orchestrator", "launch", "hydra_plugins", "hydra_conf", "k8s"}
    assert needed <= sources, f"k8s/Dockerfile does not copy {sorted(needed - sources)}"
