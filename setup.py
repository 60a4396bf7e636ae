"""Miles packaging.

Install ranges are wide on purpose: an HPC site keeps its own torch and MPI builds, and pip must
not replace them. The dev/CI environment pins exact versions in requirements/constraints-dev.txt.

The repository folders `kernels/` and `launchers/` are mapped into the `miles` namespace as
`miles.kernels` and `miles.launchers`: PyPI has an unrelated package named `kernels` (SGLang
depends on it), so a top-level importable `kernels` would collide.
"""

from setuptools import find_packages, setup

packages = [p for p in find_packages(include=["miles", "miles.*"])]
packages += ["miles.kernels", "miles.launchers"]

setup(
    name="miles",
    version="0.1.0",
    description="Slurm-native RL post-training: SGLang rollout, Megatron-core training, no Ray",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"miles.kernels": "kernels", "miles.launchers": "launchers"},
    install_requires=[
        "torch>=2.6",
        "megatron-core>=0.16,<0.20",
        "transformers>=5.0,<6",
        "tokenizers>=0.21",
        "safetensors>=0.4",
        "numpy>=1.26",
        "pyyaml>=6.0",
        "aiohttp>=3.9",
        "requests>=2.31",
        "h5py>=3.10",
        "tensorboard>=2.15",
        "submitit>=1.5",
        "mpi4py>=3.1",
        "tqdm>=4.66",
        "psutil>=5.9",
    ],
    extras_require={
        # The PyPI MPICH wheel for laptops and CI; clusters use the site MPI that mpi4py was built against.
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "hypothesis>=6.100,<7", "mpich>=4.2"],
        # Real SGLang for GPU machines (see docs/gpu.md); version pinned to what we verified.
        "gpu": ["sglang==0.5.17"],
    },
    entry_points={
        "console_scripts": [
            "miles-engine=miles.engines.embedded.__main__:main",
            "miles-router=miles.engines.router:main",
            "miles-submit=miles.launchers.submit:main",
        ]
    },
)
