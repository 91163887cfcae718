"""vseg: fine-tuning Sa2VA (MLLM + SAM-2) for blood-vessel segmentation."""

__version__ = "0.1.0"
