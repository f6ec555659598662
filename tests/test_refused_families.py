"""Transformers vidprune refuses with a reason of their own (Wan2.2-Animate): `apply` and
`compile_blocks` raise, naming the model, why, and what runs instead, before changing anything."""

from __future__ import annotations

import re

import pytest
import torch
from diffusers import WanAnimateTransformer3DModel

import vidprune
from vidprune.adapters import UnsupportedModelError
from vidprune.runtime import pruner_of


def wan_animate() -> WanAnimateTransformer3DModel:
    with torch.device("meta"):  # its motion encoder is large at any width: the class is what counts here
        return WanAnimateTransformer3DModel(num_attention_heads=2, attention_head_dim=16, ffn_dim=32, num_layers=5,
                                            text_dim=16, image_dim=16, added_kv_proj_dim=32)


CASES = {
    "wan-animate": (wan_animate, [r"WanAnimateTransformer3DModel \(Wan2.2-Animate, WanAnimatePipeline\)",
                                  "face adapter", "one equal run per latent frame",
                                  r"WanVACETransformer3DModel \(WanVACEPipeline\)"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_apply_and_compile_blocks_refuse_naming_why_and_what_runs(case):
    build, phrases = CASES[case]
    model = build()
    for call in (lambda: vidprune.apply(model, vidprune.TapeConfig.paper(keep=0.5)),
                 lambda: vidprune.apply(model, vidprune.LipConfig(mask=torch.ones(2, 2, 2, dtype=torch.bool))),
                 lambda: vidprune.compile_blocks(model)):
        with pytest.raises(UnsupportedModelError) as refused:
            call()
        message = str(refused.value)
        assert message.startswith(f"vidprune does not support {type(model).__name__} (")
        for phrase in [*phrases, "supported transformer classes: WanTransformer3DModel"]:
            assert re.search(phrase, message), phrase
    assert pruner_of(model) is None and getattr(model, "_diffusers_hook", None) is None
