from setuptools import find_packages, setup

setup(
    name="ddim-plus",
    version="0.1.0",
    description="DDIM done exactly as the paper: a diffusers plugin with a correct scheduler, inversion and trainer",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["ddim_plus", "ddim_plus.*"]),
    package_data={"ddim_plus": ["assets/*"]},
    python_requires=">=3.9",
    # The floors of diffusers, huggingface_hub, accelerate, datasets and transformers are installed exactly and tested
    # by `make test-min` (Makefile). accelerate 1.15.0 is the first whose resume is bit-exact
    # (tests/test_training.py::test_resume_after_a_kill_is_bit_exact fails on 1.1.0, 1.6.0, 1.10.1, 1.13.0, 1.14.0).
    install_requires=[
        "torch>=2.1",
        "diffusers>=0.37",
        "huggingface_hub>=0.34",
        "safetensors>=0.4",
        "numpy>=1.24",
        "pillow>=9.0",
    ],
    extras_require={
        "train": [
            "accelerate>=1.15.0",
            "datasets>=4.0",
            "scikit-learn>=1.2",
            "tensorboard>=2.12",
            "torchmetrics>=1.0",
        ],
        "test": [
            "pytest>=7",
            "ruff==0.17.6",  # pinned: `make test` checks formatting, which changes between ruff releases
            "accelerate>=1.15.0",
            "datasets>=4.0",
            "scikit-learn>=1.2",
            "tensorboard>=2.12",
            "torchmetrics>=1.0",
            "matplotlib>=3.7",
            "transformers>=4.55",
        ],
        "eval": ["torchmetrics>=1.0", "scikit-learn>=1.2", "matplotlib>=3.7", "transformers>=4.55"],
        "docs": ["matplotlib>=3.7"],
    },
    entry_points={"console_scripts": ["ddim-plus=ddim_plus.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
