"""Package layout that pyproject.toml cannot express: the top-level ``configs/``, ``sweeps/`` and
``slurm/profiles/`` folders ship inside the wheel as ``ickd/_shipped/{configs,sweeps,profiles}``
(package data; ickd.resources.shipped_path finds them). Everything else is in pyproject.toml."""
from setuptools import find_packages, setup

# Keep in step with ickd.resources.SHIPPED.
SHIPPED = {"ickd._shipped.configs": "configs", "ickd._shipped.sweeps": "sweeps", "ickd._shipped.profiles": "slurm/profiles"}

setup(
    packages=find_packages(include=["ickd", "ickd.*"]) + sorted(SHIPPED),
    package_dir=SHIPPED,
    package_data={name: ["**/*.yaml", "*.md"] for name in SHIPPED},
    include_package_data=False,
)
