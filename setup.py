"""The two things pyproject.toml cannot say: the three top-level folders installed as one package,
`score`, and the native build of the sandbox launcher.

`kernels/` -> score.kernels, `model/` -> score.model, `rl/` -> score.rl. Nothing
named `model` or `rl` lands at the top of site-packages: `score` is a namespace package built
purely from this mapping.

Building also compiles the sandbox launcher (CMakeLists.txt, rl/rewards/sandbox/launcher.c) with the
system's cmake and C compiler into rl/rewards/sandbox/ (used in place by editable installs) and into
the wheel. Without cmake or a compiler the install fails.
"""

import os
import shutil
import subprocess

from setuptools import Command, find_packages, setup
from setuptools.command.build import build

HERE = os.path.dirname(os.path.abspath(__file__))

FOLDERS = {"kernels": "score.kernels", "model": "score.model", "rl": "score.rl"}


def mapped_packages():
    packages, package_dir = [], {}
    for folder, name in FOLDERS.items():
        packages.append(name)
        package_dir[name] = folder
        for sub in find_packages(where=folder):
            packages.append(f"{name}.{sub}")
            package_dir[f"{name}.{sub}"] = os.path.join(folder, *sub.split("."))
    return packages, package_dir


class build_native(Command):
    """Builds the sandbox launcher with CMake into rl/rewards/sandbox/ (where editable installs use
    it) and copies it, executable, into build_lib (for wheels). A `build` sub-command of its
    own, because setuptools silences errors of a customised build_py in editable mode and
    the install must fail when the launcher cannot be built."""

    description = "build the sandbox launcher (CMakeLists.txt) with the system's cmake"
    user_options = []

    def initialize_options(self):
        self.build_lib = None

    def finalize_options(self):
        self.set_undefined_options("build", ("build_lib", "build_lib"))

    def run(self):
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError(
                "score-rl: building the sandbox launcher needs CMake >= 3.16 and a C compiler on PATH "
                "(e.g. `apt-get install cmake gcc`); cmake was not found"
            )
        build_dir = os.path.join(HERE, "build", "native")
        out_dir = os.path.join(HERE, "rl", "rewards", "sandbox")
        for step in (
            [cmake, "-S", HERE, "-B", build_dir, f"-DSCORE_SANDBOX_OUTPUT_DIR={out_dir}"],
            [cmake, "--build", build_dir],
        ):
            result = subprocess.run(step, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(
                    f"score-rl: building the sandbox launcher failed at `{' '.join(step)}` "
                    f"(exit {result.returncode}):\n{result.stdout}\n{result.stderr}"
                )
        target_dir = os.path.join(self.build_lib, "score", "rl", "rewards", "sandbox")
        os.makedirs(target_dir, exist_ok=True)
        shutil.copy2(os.path.join(out_dir, "score-sandbox"), target_dir)  # copy2 keeps the exec bit


class build_with_native(build):
    sub_commands = [("build_native", None)] + build.sub_commands


packages, package_dir = mapped_packages()

# Metadata and dependencies live in pyproject.toml; this file only maps the folders onto `score`
# and adds the native build step.
setup(
    packages=packages,
    package_dir=package_dir,
    cmdclass={"build": build_with_native, "build_native": build_native},
)
