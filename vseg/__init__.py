"""vseg: fine-tuning Sa2VA (MLLM + SAM-2) for blood-vessel segmentation.

`vseg.Predictor` (`vseg.inference.predictor`) loads a model once and predicts from Python.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["Predictor", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy: `import vseg` (the CLI, config checks) should not pay for torch + transformers.
    if name == "Predictor":
        from vseg.inference.predictor import Predictor

        return Predictor
    raise AttributeError(f"module 'vseg' has no attribute {name!r}")
