"""Installs card_jax: Compact, Accurate and Robust Deep networks (CARDs) in JAX."""

from setuptools import find_packages, setup

setup(
    name="card_jax",
    version="0.1.0",
    description="Compressing deep networks for out-of-distribution robustness, in JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["card_jax", "card_jax.*", "launch", "launch.*"]),
    install_requires=[
        "jax>=0.10.2,<0.13",
        "jaxlib>=0.10.2,<0.13",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "ml-collections>=1.1.0,<1.2",
        "absl-py>=2.1",
        "numpy>=1.26",
        "scipy>=1.13",
        "pillow>=10",
        "matplotlib>=3.8",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        # Only its frost texture images are read (the "frost" corruption, SPEC §7).
        "corrupt-tta>=0.1.7",
    ],
    extras_require={
        # The launcher's backends are tested for real (tests/test_slurm.py, tests/test_ray.py).
        "test": ["pytest>=8", "pytest-xdist>=3.5", "submitit>=1.5", "ray>=2.40"],
        "tfds": ["tensorflow-datasets>=4.9.10,<5"],
        "launch": ["submitit>=1.5", "ray>=2.40"],
    },
)
