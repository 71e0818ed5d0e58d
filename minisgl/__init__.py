"""Mini-SGL: a small, fast Mixture-of-Experts inference engine for Qwen3-30B-A3B with tensor and expert parallelism.

Every module is generated from a chapter of the book in notebooks/; edit the notebook, then run `python scripts/export.py`."""

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name):
    if name == "LLM":
        from minisgl.llm import LLM
        return LLM
    if name == "SamplingParams":
        from minisgl.sampling import SamplingParams
        return SamplingParams
    raise AttributeError(f"module 'minisgl' has no attribute {name!r}")
