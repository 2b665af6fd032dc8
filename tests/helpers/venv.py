"""A throw-away virtual environment with an example plugin pip-installed, as a user would have it.

It sees this environment's packages (torch, optkit) through a ``.pth`` file, so only the plugin is
installed; commands run with optkit's plugin switches cleared and one torch thread.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import site
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUBPROCESS_TIMEOUT = 600


@dataclass(frozen=True)
class PluginVenv:
    python: Path
    source: Path  # a copy of the example: building it leaves build/ and *.egg-info behind

    def run(self, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.python), *args], capture_output=True, text=True, cwd=cwd,
                              env=clean_env(env), timeout=SUBPROCESS_TIMEOUT)


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment without optkit's plugin switches (a caller sets the ones it means), one torch thread
    (the tensors are tiny; on a busy machine extra OpenMP threads only wait for each other)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPTKIT_")}
    env.update(PYTHONDONTWRITEBYTECODE="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", OMP_NUM_THREADS="1")
    env.update(extra or {})
    return env


def outer_site_dirs() -> list[str]:
    """Where this interpreter's packages live (a venv made with --system-site-packages sees only the base
    interpreter's, so when the tests run inside a venv these are added explicitly)."""
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        dirs.append(site.getusersitepackages())
    return dirs


def _build_isolation_flags() -> list[str]:
    """Build offline with this environment's setuptools when it can build wheels by itself."""
    if importlib.util.find_spec("setuptools") is None:
        return []
    from importlib.metadata import version

    major, minor = (int(part) for part in version("setuptools").split(".")[:2])
    if (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None:
        return ["--no-build-isolation", "--no-index"]
    return []


def _make_venv(root: Path) -> Path:
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
                   check=True, timeout=SUBPROCESS_TIMEOUT)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True, timeout=SUBPROCESS_TIMEOUT).stdout.strip()
    # `import` lines of a .pth file run: addsitedir also runs the outer .pth files (optkit's editable finder).
    lines = "".join(f"import site; site.addsitedir({d!r})\n" for d in outer_site_dirs())
    Path(purelib, "_outer_environment.pth").write_text(lines, encoding="utf-8")
    return python


def install_example(example: Path, root: Path) -> PluginVenv:
    """A new venv under ``root`` with a copy of the example project at ``example`` pip-installed into it."""
    source = Path(shutil.copytree(example, root / "src", ignore=shutil.ignore_patterns(
        "__pycache__", "*.egg-info", "build", ".hypothesis", ".benchmarks", ".pytest_cache")))
    venv = PluginVenv(_make_venv(root), source)
    done = venv.run("-m", "pip", "install", "--quiet", "--no-deps", *_build_isolation_flags(), str(source))
    if done.returncode != 0:
        raise AssertionError(f"pip install of {example.name} failed:\n{done.stdout}\n{done.stderr}")
    return venv


def last_json(done: subprocess.CompletedProcess[str]) -> Any:
    """The JSON a venv script printed last; a failed run shows its output."""
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Error processing line" not in done.stderr, done.stderr  # a broken .pth is only a warning
    return json.loads(done.stdout.strip().splitlines()[-1])
