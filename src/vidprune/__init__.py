"""vidprune: training-free token pruning for diffusers video transformers.

    import vidprune
    vidprune.apply(pipe, vidprune.TapeConfig(keep=0.5))   # prune the pipeline's transformer
    video = pipe(prompt).frames[0]
    print(vidprune.stats(pipe))                          # tokens kept per step and span
    vidprune.remove(pipe)                                # back to bit-identical behaviour

On a GPU, vidprune.compile_blocks(pipe) before apply compiles the blocks that pruning wraps
(graphs=True: and runs the pruned spans as CUDA graphs).
"""

from .adapters import UnsupportedModelError, supported_classes
from .config import LipConfig, TapeConfig
from .interframe import LipDetection
from .patch import apply, compile_blocks, remove, stats
from .stats import PruneStats

__version__ = "0.1.0"

__all__ = [
    "TapeConfig",
    "LipConfig",
    "LipDetection",
    "PruneStats",
    "UnsupportedModelError",
    "apply",
    "compile_blocks",
    "remove",
    "stats",
    "supported_classes",
]
