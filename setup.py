"""gkd: on-policy knowledge distillation of language models in JAX/Flax."""
import setuptools

CORE = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "seqio==0.0.20",
    "tensorflow==2.21.0",
    "tensorflow-text==2.21.1",
    "gin-config==0.5.0",
    "tensorflow-datasets==4.9.10",
    "sentencepiece==0.2.3",
    "safetensors",
    "tokenizers",
    "absl-py",
    "tqdm",
    "tensorboardX",
    "matplotlib",
    "rouge-score",
    "sacrebleu",
]

TEST = [
    "pytest",
    "pytest-xdist",
    "hypothesis",
    # The CPU build lies on this machine's disk; an unpinned torch pulls CUDA.
    "torch==2.13.0",
    "transformers",
    "trl==1.16.*",
    "nbformat",
    "nbclient",
    "ipykernel",
]

setuptools.setup(
    name="gkd",
    version="0.1.0",
    description="Generalized (on-policy) knowledge distillation for LMs in JAX/Flax",
    packages=setuptools.find_packages(include=["gkd", "gkd.*"]),
    python_requires=">=3.11",
    install_requires=CORE,
    extras_require={"test": TEST},
)
