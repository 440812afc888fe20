"""The package as it would be published: built with ``python -m build``, checked by twine,
installed into fresh virtual environments (from the wheel and from the sdist), where
``sitq --version`` and ``sitq demo`` run."""

import subprocess
import sys
import venv
import zipfile

import pytest
from conftest import PROJECT

import sitq

pytest.importorskip("build")
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(PROJECT)], check=True,
                   capture_output=True, text=True)
    return out


def test_twine_accepts_the_sdist_and_the_wheel(dist):
    files = sorted(dist.iterdir())
    assert sorted(f.suffix for f in files) == [".gz", ".whl"]
    check = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", *map(str, files)],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_the_wheel_carries_the_version_the_license_and_its_types(dist):
    (wheel,) = dist.glob("*.whl")
    assert wheel.name.startswith(f"sitq-{sitq.__version__}-")
    names = zipfile.ZipFile(wheel).namelist()
    assert "sitq/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


@pytest.mark.parametrize("kind", ["whl", "tar.gz"])
def test_the_built_package_installs_and_runs_the_demo_in_a_fresh_venv(dist, tmp_path, kind):
    (package,) = dist.glob(f"*.{kind}")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    pip = [str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q", str(package)]
    installed = subprocess.run(pip, capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr
    command = str(env_dir / "bin" / "sitq")
    version = subprocess.run([command, "--version"], capture_output=True, text=True)
    assert version.stdout.strip() == f"sitq {sitq.__version__}"
    demo = subprocess.run([command, "demo"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert demo.returncode == 0, demo.stderr
    assert "24 tasks ran in" in demo.stdout and (tmp_path / "sitq-demo.db").exists()
