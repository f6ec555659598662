"""The core runs without the extras (demo, io, bench), and a command that needs one names it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from vidprune.extras import EXTRAS, MissingExtraError, missing, require

# Every package of every extra made unimportable, as on an install of the core alone.
HIDE = textwrap.dedent("""
    import importlib.machinery as machinery, sys
    HIDDEN = {hidden!r}
    class Hidden(machinery.PathFinder):
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            if name.partition(".")[0] in HIDDEN:
                return None
            return machinery.PathFinder.find_spec(name, path, target)
    sys.meta_path = [Hidden if finder is machinery.PathFinder else finder for finder in sys.meta_path]
    assert not HIDDEN & set(sys.modules), "an extra was imported before the test hid it"
""").format(hidden={module for _, modules in EXTRAS.values() for module in modules} | {"accelerate"})


def run_without_extras(code: str, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", HIDE + textwrap.dedent(code)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)


def test_the_core_prunes_without_the_extras(tmp_path):
    result = run_without_extras("""
        import torch
        from diffusers import WanTransformer3DModel
        import vidprune, vidprune.cli  # the command line imports too: extras are checked when used
        model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                      in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64,
                                      num_layers=3, cross_attn_norm=True, qk_norm="rms_norm_across_heads")
        inputs = dict(hidden_states=torch.randn(1, 4, 3, 8, 8), timestep=torch.tensor([500.0]),
                      encoder_hidden_states=torch.randn(1, 7, 32), return_dict=False)
        before = model(**inputs)[0]
        vidprune.apply(model, vidprune.TapeConfig.paper(keep=0.5, first_pruned_layer=1))
        pruned = model(**inputs)[0]
        vidprune.remove(model)
        assert not torch.equal(pruned, before) and torch.equal(model(**inputs)[0], before)
        for name in ("transformers", "imageio", "matplotlib"):
            assert name not in sys.modules, name
        print("ok")
    """, tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@pytest.mark.parametrize("command, extra", [
    (["generate", "a red circle", "-o", "x.mp4"], "io"),       # mp4 output: checked before the model loads
    (["generate", "a red circle", "-o", "x.gif"], "demo"),     # a gif needs no io; the demo model needs its extra
    (["bench", "--out", "b"], "bench"),
])
def test_a_command_names_the_extra_it_needs(tmp_path, command, extra):
    result = run_without_extras(f"""
        import vidprune.cli
        vidprune.cli.main({command!r})
    """, tmp_path)
    assert result.returncode == 2, result.stderr
    assert f"pip install 'vidprune[{extra}]'" in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.iterdir())  # refused: nothing written


def test_require_names_what_is_missing(monkeypatch):
    assert missing("io") == []  # the test environment installs every extra
    monkeypatch.setitem(EXTRAS, "io", ("video", {"imageio": "imageio", "no_such_module_here": "no-such-package"}))
    assert missing("io") == ["no-such-package"]
    with pytest.raises(MissingExtraError, match=r"reading x\.mp4 needs no-such-package \(video\): "
                                                r"pip install 'vidprune\[io\]'"):
        require("io", "reading x.mp4")
