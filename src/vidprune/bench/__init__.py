"""`vidprune bench`: pruning methods, their ablations and diffusers' caches side by side, in one
process, on one pipeline, with the same prompts, source clips and seeds.

Speed is the wall time of whole pipeline calls after warm-up (medians, as a ratio to the
unpruned calls of the same process) and the median transformer forward; fidelity is each
method's decoded video against the unpruned video of the same input
(`vidprune.metrics.fidelity_summary`). Random-weight models (`wan-1.3b-random`, ...) give real
speeds and no fidelity, so there the caches run at fixed skip patterns.

How vidprune composes with diffusers' caches (checked on Wan by counting the tokens that each
block computes):
- FirstBlockCache and MagCache skip the blocks after the first for a whole forward. They
  compose when vidprune is applied first and the cache enabled after: the cache's hooks then
  wrap vidprune's, see full-length tensors at the first and the last block, and a skipped
  forward never opens a pruned span. The other order fails (the cache's last-block residual
  meets the kept tokens only). Removal must be in the reverse order: diffusers' hook registry
  does not unwind a hook that is not the last one correctly.
- PyramidAttentionBroadcast, FasterCache and TaylorSeer reuse attention or FFN outputs per
  token across calls; TAPE's kept set changes from call to call, so the reused outputs belong
  to other tokens (and their count differs under a budget schedule). They do not compose.
"""

# The package, one concern a module: models (random-weight models of each family), timing
# (ForwardTimer, time_ms), block_times (the ideal pruned forward), methods (the registry of
# method names -> configurations and caches, parsing, attach/detach), caches (diffusers' cache
# glue), inputs, run (tasks, timed calls, summaries), report (bench.json, markdown, plot).
from .caches import MethodContext, cache_config, calibrate_mag_ratios, enable_first_block_cache
from .inputs import edit_sources, fixed_lip_mask, generation_inputs
from .methods import (REGISTRY, UNPRUNED, Method, MethodSpec, accepted_names, attach, check_family, default_methods,
                      detach, parse_method, parse_methods, tape_config)
from .models import RANDOM_MODELS, benchmark_shape, build_random_pipeline, build_transformer, transformers_of
from .run import Options, environment, run_bench
from .timing import ForwardTimer, time_ms

__all__ = [
    "REGISTRY", "RANDOM_MODELS", "UNPRUNED", "ForwardTimer", "Method", "MethodContext", "MethodSpec", "Options",
    "accepted_names", "attach", "benchmark_shape", "build_random_pipeline", "build_transformer", "cache_config",
    "calibrate_mag_ratios", "check_family", "default_methods", "detach", "edit_sources", "enable_first_block_cache",
    "environment", "fixed_lip_mask", "generation_inputs", "parse_method", "parse_methods", "run_bench", "tape_config",
    "time_ms", "transformers_of",
]
