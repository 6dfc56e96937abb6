from setuptools import find_packages, setup

setup(
    name="sd-trainer-toolkit",
    version="0.1.0",
    description="Stable Diffusion 1.x/2.x training toolkit (LoRA, DreamBooth, fine-tuning, textual inversion)",
    packages=find_packages(include=["library", "library.*", "networks", "networks.*", "finetune", "finetune.*", "tools", "tools.*"]),
    package_data={"library": ["clip_tokenizer/*.json", "clip_tokenizer/*.txt", "clip_tokenizer/*.md"]},
    include_package_data=True,
    python_requires=">=3.10",
)
