"""XPSR."""
__version__ = "0.1.0"


def __getattr__(name: str):
    # ``from xpsr import XPSRPipeline`` without importing diffusers on every ``import xpsr``
    if name == "XPSRPipeline":
        from xpsr.inference.diffusers_pipeline import XPSRPipeline

        return XPSRPipeline
    raise AttributeError(f"module 'xpsr' has no attribute {name!r}")
