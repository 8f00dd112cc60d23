"""llm-lab: a JAX research codebase for training and studying language models."""

import setuptools

INSTALL_REQUIRES = [
    "jax>=0.10",
    "flax>=0.12",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12",
    "ml-collections>=1.0",
    "tensorflow-datasets>=4.9.9",
    "tensorflow-cpu>=2.20",  # tfds builders
    "tensorboard>=2.20",  # training curves (flax.metrics.tensorboard)
    "sentencepiece>=0.2",
    "tokenizers>=0.20",  # Hugging Face tokenizer directories (data/hf_tokenizer.py)
    "absl-py>=2.1",
    "numpy>=2.0",
    "tqdm>=4.66",
    "safetensors>=0.4",  # Hugging Face checkpoint format (llm/hf.py)
    "matplotlib>=3.8",  # plots in notebooks and experiments
    "scipy>=1.11",  # L-BFGS fits of scaling laws (llm/scaling.py)
    "jinja2>=3.1",  # chat templates of Hugging Face tokenizers (data/sft.py)
]

EXTRAS_REQUIRE = {
    # Tests compare against Hugging Face transformers on the CPU build of torch, execute notebooks
    # and log an offline W&B run.
    "test": [
        "pytest>=8",
        "pytest-xdist>=3.6",  # test files on every core (pytest.ini)
        "filelock>=3.12",  # locks the test run's shared compilation cache (tests/conftest.py)
        "torch==2.13.0",
        # <5.25: transformers 5.25 requires Hugging Face's `kernels` package and imports it on
        # load, but this repo's own top-level `kernels` package has that import name and wins.
        "transformers>=4.50,<5.25",
        "nbclient>=0.10",
        "nbformat>=5.10",
        "ipykernel>=6.29",
        "wandb>=0.17",  # the offline run of --config.tracker=wandb (tests/llm/training/test_metrics.py)
        "peft>=0.17",  # LoRA adapters in PEFT's format, both ways (tests/llm/test_lora_peft.py)
        # llm.harness: its backend and the shipped tasks equal lm-eval's hf backend; [api]: its
        # OpenAI-style client (local-completions) scores through llm.serve (tests/llm/test_serve.py)
        "lm-eval[api]>=0.4.13",
        "aiohttp>=3.9",  # the llm.serve endpoint tests (tests/llm/test_serve.py)
    ],
    # lm-evaluation-harness on our models: python -m llm.evaluate --tasks=..., config.eval.harness_tasks.
    "eval": ["lm-eval>=0.4.13"],
    # python -m llm.serve: the OpenAI-compatible endpoint (async HTTP server and the load test).
    "serve": ["aiohttp>=3.9"],
    # --config.tracker=wandb: metrics to Weights & Biases too (WANDB_MODE=offline needs no network).
    "wandb": ["wandb>=0.17"],
    # One NVIDIA GPU or a GPU cluster: CUDA 12 wheels of jaxlib (Pallas Triton / Mosaic GPU kernels).
    "gpu": ["jax[cuda12]>=0.10"],
    # TPU VMs and pod slices: libtpu (Pallas Mosaic TPU kernels).
    "tpu": ["jax[tpu]>=0.10"],
}

setuptools.setup(
    name="llm-lab",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["llm*", "kernels*", "data*", "experiments*"]),
    include_package_data=True,
    package_data={
        "data": ["corpus/**/*", "tokenizer/*", "post_training/*"],
        "llm": ["harness/tasks/*.yaml", "harness/tasks/*.jsonl"],
    },
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
