from pathlib import Path

from setuptools import find_packages, setup


def requirements() -> list[str]:
    lines = Path(__file__).with_name("requirements.txt").read_text().splitlines()
    specs = [line.split("#", 1)[0].strip() for line in lines]  # inline comments are no part of a requirement
    return [spec for spec in specs if spec]


setup(
    name="sdtune",
    version="0.1.0",
    description="kohya-compatible training of Stable Diffusion LoRAs, embeddings and fine-tunes",
    packages=find_packages(include=["library", "library.*", "networks", "networks.*", "tools", "tools.*"]),
    py_modules=["train_network", "train_textual_inversion", "fine_tune", "sdxl_train_network",
                "sdxl_train_textual_inversion", "sdxl_train"],
    package_data={"library": ["models/configs/**/*.json", "models/configs/**/*.txt"]},
    python_requires=">=3.10",
    install_requires=requirements(),
    extras_require={"xformers": ["xformers"], "dev": ["pytest", "pytest-xdist"]},
)
