"""Install the three top-level folders as one package, `score`.

`kernels/` -> score.kernels, `model/` -> score.model, `rl/` -> score.rl (DESIGN.md §2). Nothing
named `model` or `rl` lands at the top of site-packages: `score` is a namespace package built
purely from this mapping.
"""
import os

from setuptools import find_packages, setup

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
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "numpy>=1.24",
        "jinja2>=3.1",
        "tqdm>=4.60",
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
