"""The package as users install it: a wheel built from this checkout, installed into a fresh venv, run offline."""

import email
import os
import re
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from conftest import REPO_ROOT, make_tiny_unet
from diffusers import DDPMPipeline, DDPMScheduler
from packaging.requirements import Requirement

README = REPO_ROOT / "README.md"


def run(command, **kwargs):
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def wheel_requirements(wheel):
    """The Requires-Dist lines of a wheel that hold without extras."""
    with zipfile.ZipFile(wheel) as archive:
        (name,) = (n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        meta = email.message_from_bytes(archive.read(name))
    return [requirement for requirement in meta.get_all("Requires-Dist") if "extra ==" not in requirement]


def dependency_closure(requirements):
    """The installed distributions that `requirements` need, transitively, on this interpreter, without extras."""
    found, todo = {}, [Requirement(r) for r in requirements]
    while todo:
        requirement = todo.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        key = requirement.name.lower().replace("_", "-")
        if key in found:
            continue
        found[key] = metadata.distribution(requirement.name)
        todo += [Requirement(r) for r in found[key].requires or ()]
    return list(found.values())


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A venv with the wheel of this checkout and its base dependencies (no extras), offline."""
    pytest.importorskip("setuptools", minversion="77")  # the build backend pyproject.toml names (SPDX license)
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"  # a copy, so the build leaves nothing in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE"):
        shutil.copy(REPO_ROOT / name, source / name)
    shutil.copytree(REPO_ROOT / "ddim_plus", source / "ddim_plus", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip"]
    build = ["wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(work / "dist"), str(source)]
    run(pip + build)
    (wheel,) = (work / "dist").glob("ddim_plus-*.whl")

    venv = work / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).strip())
    # A base install: the wheel's own dependencies (no extras), taken from the test environment by links, after the
    # venv's own site-packages.
    base = work / "base_dependencies"
    base.mkdir()
    for distribution in dependency_closure(wheel_requirements(wheel)):
        for top in {Path(str(file)).parts[0] for file in distribution.files or ()} - {".."}:
            source_path = Path(distribution.locate_file(top))
            if source_path.exists() and not (base / top).exists():
                (base / top).symlink_to(source_path)
    (site / "base_dependencies.pth").write_text(f"{base}\n")
    run(pip + ["--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)])

    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HOME=str(work / "hf_home"), HF_HUB_OFFLINE="1")
    home = work / "user"  # run outside the checkout: nothing of it may be importable
    home.mkdir()
    DDPMPipeline(unet=make_tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(
        home / "ddpm"
    )
    return venv, env, home


METADATA_CHECK = """
import importlib.metadata as metadata, os, ddim_plus
meta = metadata.metadata("ddim-plus")
assert meta["Version"] == ddim_plus.__version__ and meta["License-Expression"] == "Apache-2.0", meta
assert meta["Requires-Python"] == ">=3.9"
assert set(meta.get_all("Provides-Extra")) >= {"train", "eval", "dinov2", "test"}
requirements = meta.get_all("Requires-Dist")
assert 'torchmetrics[image]>=1.0; extra == "eval"' in requirements
assert 'transformers>=4.55; extra == "dinov2"' in requirements
assert not any(r.startswith(("scikit-learn", "sklearn")) for r in requirements), requirements
assets = os.path.join(os.path.dirname(ddim_plus.__file__), "assets")
assert sorted(os.listdir(assets)) == ["README.md", "digits.npz", "digits_features.safetensors"], os.listdir(assets)
import importlib.util
for extra_module in ("datasets", "torchmetrics", "transformers", "matplotlib", "sklearn"):
    assert importlib.util.find_spec(extra_module) is None, extra_module + " is not a base dependency"
print(ddim_plus.__file__)
"""
README_CHECK = """
from diffusers import DiffusionPipeline
reloaded = DiffusionPipeline.from_pretrained("my-ddim")
assert type(reloaded).__name__ == "DDIMPlusPipeline" and len(images) == 4, (type(reloaded), len(images))
assert reloaded.scheduler.config.timestep_spacing == "logsnr" and reloaded.scheduler.config.ddim_solver_order == 2
"""


def test_readme_quick_start_runs_from_the_installed_wheel(installed):
    venv, env, home = installed
    code = re.search(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S).group(1)
    repo_id = re.search(r'from_pretrained\("([^"]+)"\)', code).group(1)
    (home / "quick_start.py").write_text(METADATA_CHECK + code.replace(repo_id, str(home / "ddpm")) + README_CHECK)
    location = run([str(venv / "bin" / "python"), "quick_start.py"], env=env, cwd=home)
    assert location.startswith(str(venv))  # the wheel's ddim_plus, not the checkout's


def test_command_line_of_a_base_install(installed):
    venv, env, home = installed
    command = [str(venv / "bin" / "ddim-plus")]
    run(command + ["sample", "ddpm", "--steps", "2", "--num", "2", "--out", "grid.png", "--quiet"], env=env, cwd=home)
    assert (home / "grid.png").is_file()
    evaluate = command + ["evaluate", "ddpm", "--steps", "2", "--num", "2", "--out", "results.md", "--quiet"]
    result = subprocess.run(evaluate, capture_output=True, text=True, env=env, cwd=home)
    assert result.returncode == 1
    assert "pip install 'ddim-plus[eval]'" in result.stderr and "Traceback" not in result.stderr
    # The trainer runs from the wheel, without a checkout (training needs the train extra; --help does not).
    assert "--pretrained_model_name_or_path" in run(
        [str(venv / "bin" / "python"), "-m", "ddim_plus.train", "--help"], env=env, cwd=home
    )
