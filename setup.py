"""jaxspec: a JAX/Flax research framework for fast, exact LLM decoding."""

from setuptools import find_packages, setup

RUNTIME = [
    "jax>=0.6",
    "flax>=0.10",
    "optax",
    "orbax-checkpoint",
    "einops",
    "absl-py",
    "ml_collections",
    "numpy",
    "tqdm",
    "matplotlib",  # sweep and quickstart plots
    # Real checkpoints: GGUF files (the zoo), Hugging Face tokenizers and their chat templates.
    "gguf",
    "tokenizers",
    "jinja2",
]

EXTRAS = {
    "test": ["pytest", "pytest-xdist", "ruff", "nbclient", "nbformat", "ipykernel", "matplotlib", "scipy",
             "tokenizers"],
    # torch pinned to the CPU wheel: an unpinned torch pulls several GB of CUDA packages.
    # accelerate: transformers loads GGUF files only with it (the GGUF tests compare against that loader).
    "hf": ["torch==2.13.0", "transformers", "safetensors", "tokenizers", "accelerate"],
    "gpu": ["jax[cuda12]", "jax-triton"],
    "notebooks": ["jupyter", "matplotlib", "nbclient", "nbformat", "ipykernel"],
}

setup(
    name="jaxspec",
    version="0.1.0",
    description="Speculative and efficient decoding research in JAX/Flax",
    packages=find_packages(include=["jaxspec", "jaxspec.*", "pallas_kernels", "pallas_kernels.*",
                                    "configs", "configs.*", "launch", "launch.*"]),
    package_data={"jaxspec.eval": ["suite_data/*.jsonl"], "jaxspec.ops": ["*.cc", "*.h"]},
    python_requires=">=3.10",
    install_requires=RUNTIME,
    extras_require=EXTRAS,
)
