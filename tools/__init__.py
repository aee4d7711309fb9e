"""The measuring tools, run from the repository root as modules: python -m tools.bench, python -m tools.gpu_check, ..."""
