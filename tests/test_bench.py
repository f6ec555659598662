"""`vidprune bench`: method names, stacking with diffusers' caches, and the written report."""

from __future__ import annotations

import json
import math

import pytest
import torch

import vidprune
from vidprune.bench import MethodContext, attach, detach, fixed_lip_mask, parse_method, parse_methods
from vidprune.cli import main

from conftest import block_tokens, run

SMALL = ["--frames", "5", "--height", "64", "--width", "64", "--steps", "3", "--prompts", "1", "--seeds", "1"]


def test_bench_writes_json_table_and_plot(tmp_path):
    main(["bench", "--methods", "tape:0.5", "fbc-fixed:2", "--out", str(tmp_path), *SMALL])
    report = json.loads((tmp_path / "bench.json").read_text())
    methods = report["tasks"]["generate"]["methods"]
    assert list(methods) == ["unpruned", "tape:0.5", "fbc-fixed:2"]
    for name, entry in methods.items():
        assert entry["call_s_median"] > 0 and entry["forward_ms_median"] > 0 and math.isfinite(entry["speedup"])
        if name != "unpruned":
            assert 0 < entry["psnr"] < 100 and 0 < entry["ssim"] < 1
    assert methods["unpruned"]["psnr"] is None  # identical to itself: inf, written as null
    assert 0.5 <= methods["tape:0.5"]["mean_keep"] < 0.5 + 1 / 3  # the cycle rule: whole steps of 3, rounded up
    assert report["command"].startswith("vidprune bench --methods tape:0.5 fbc-fixed:2")
    assert len(report["runs"]) == 3 and report["info"]["torch"] == torch.__version__
    rows = [line for line in (tmp_path / "bench.md").read_text().splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0] for row in rows] == ["| method", "| unpruned", "| tape:0.5", "| fbc-fixed:2"]
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_on_random_weights_measures_speed_only(tmp_path):
    main(["bench", "--model", "wan-tiny-random", "--device", "cpu", "--methods", "tape-even:0.5+mag-fixed:1", "lip-noar:0.5",
          "--frames", "9", "--height", "32", "--width", "32", "--steps", "5", "--repeats", "1", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "bench.json").read_text())
    stacked = report["tasks"]["generate"]["methods"]["tape-even:0.5+mag-fixed:1"]
    assert stacked["family"] == "stack" and stacked["mean_keep"] == pytest.approx(0.5) and "psnr" not in stacked
    assert stacked["forwards_per_call"] == 10  # the timer sees every forward, skipped ones too
    assert report["tasks"]["edit"]["methods"]["lip-noar:0.5"]["mean_keep"] < 0.75
    assert any("fixed patterns" in note for note in report["notes"])


@pytest.mark.parametrize(
    "methods, message",
    [
        (["tape:0.5", "fastest"], "'fastest' is not a method name; accepted names: unpruned, tape,"),
        (["tape:1.5"], "keep=1.5 is not accepted"),
        (["pab:0"], "pab:N takes a whole number >= 1"),
        (["unpruned:2"], "unpruned takes no value"),
        (["tape:0.5+pab:2"], "a stack is one of tape"),
        (["fbc+tape"], "a stack is one of tape"),
        (["tape", "--repeats", "0"], "repeats=0 is not accepted"),
    ],
)
def test_bad_methods_are_reported(methods, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--methods", *methods, "--out", str(tmp_path), *SMALL])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "bench.json").exists()


def test_residual_driven_caches_are_refused_on_random_weights():
    with pytest.raises(ValueError, match="use fbc-fixed for speed"):
        parse_methods(["tape:0.5+fbc:0.1"], random_weights=True)
    assert [m.name for m in parse_methods(["tape", "tape:0.5", "fbc:0.1"], random_weights=False)] == [
        "unpruned", "tape:0.5", "fbc:0.1"]


def test_lip_tape_needs_a_real_source_video_and_a_valid_keep():
    with pytest.raises(ValueError, match="lip-tape.*random-weight"):
        parse_methods(["lip-tape:0.5"], random_weights=True)
    with pytest.raises(ValueError, match="keep"):
        parse_method("lip-tape:1.5")
    assert [m.name for m in parse_methods(["lip-tape"], random_weights=False)] == ["unpruned", "lip-tape:0.5"]


def test_tape_stacked_with_first_block_cache_prunes_and_skips(clean):
    """In the stack's order the cache's hooks wrap vidprune's: computed steps run the span on
    kept tokens, skipped steps run only the first block; detaching restores the model."""
    pipe = clean["t2v"]
    blocks = pipe.transformer.blocks
    with block_tokens(pipe.transformer) as tokens:  # (block, tokens it computed), in call order
        reference = run(pipe, "t2v", num_inference_steps=4)
        full = tokens[0][1]
        tokens.clear()
        attach(pipe, parse_method("naive:0.5+fbc-fixed:2"), MethodContext(steps=4))
        stacked = run(pipe, "t2v", num_inference_steps=4)
        assert vidprune.stats(pipe).mean_keep == pytest.approx(0.5)
        detach(pipe)
        stacked_tokens = list(tokens)
        restored = run(pipe, "t2v", num_inference_steps=4)
    computed = [(0, full), (1, full)] + [(layer, full // 2) for layer in range(2, len(blocks))]  # span 2-5 pruned
    skipped = [(0, full)]  # the first block only
    # steps 0 and 2 compute (both CFG branches), steps 1 and 3 skip
    assert stacked_tokens == (computed * 2 + skipped * 2) * 2
    assert not torch.equal(stacked, reference) and torch.equal(restored, reference)


def test_fixed_lip_mask_prunes_the_requested_share():
    mask = fixed_lip_mask(21, 30, 52, 0.4)
    assert mask[0].all() and 1 - mask.float().mean().item() == pytest.approx(0.4, abs=0.002)


def test_remove_refuses_to_break_a_cache_enabled_after_vidprune(clean):
    pipe = clean["t2v"]
    reference = run(pipe, "t2v", num_inference_steps=3)
    attach(pipe, parse_method("tape:0.5+fbc-fixed:2"), MethodContext(steps=3))
    with pytest.raises(ValueError, match="disable_cache"):
        vidprune.remove(pipe)
    detach(pipe)  # cache first, then vidprune
    assert torch.equal(run(pipe, "t2v", num_inference_steps=3), reference)
