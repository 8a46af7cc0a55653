"""A light core: loading an exported model, the models, the tokenizer, the losses and the metrics import and run
in a fresh interpreter where DeepSpeed, submitit, sentence-transformers, TensorBoard and OpenCLIP cannot be
imported (the core's dependencies of pyproject.toml: no ``train`` extra, no OpenCLIP); a training command there
says in one line which extra to install."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import alignclip

BLOCKED = ("deepspeed", "submitit", "sentence_transformers", "tensorboard", "open_clip", "open_clip_train")

CHILD = textwrap.dedent("""
    import importlib.abc, sys

    BLOCKED = {blocked!r}

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
            return None

    sys.meta_path.insert(0, Block())
    for name in BLOCKED:
        try:
            __import__(name)
        except ImportError:
            pass
        else:
            raise SystemExit(f"{{name}} imported despite the block")

    import torch
    import alignclip
    from alignclip.analysis.metrics import alignment_score
    from alignclip.losses import build_objective  # noqa: F401  (the objective's module and its terms import)
    from alignclip.losses.dense import alignment_loss
    from alignclip.models import build_model  # noqa: F401
    from alignclip.tokenizer import get_tokenizer
    from PIL import Image

    model, tokenize, transform = alignclip.load({exported!r})
    images = transform([Image.new("RGB", (40, 24), "red"), Image.new("RGBA", (9, 31))])
    with torch.no_grad():
        img = model.encode_image(images, normalize=True)
        txt = model.encode_text(tokenize(["a red square", "ein durchsichtiges Bild"]), normalize=True)
    assert img.shape == txt.shape and img.shape[0] == 2, (img.shape, txt.shape)
    assert abs(float(alignment_loss(img, txt)) - (2 - 2 * alignment_score(img, txt))) < 1e-4
    assert get_tokenizer(77)("a cat")[0, :4].tolist() == [49406, 320, 2368, 49407]
    # a training command without the train extra: one line naming the extra, exit 2
    import contextlib, io
    from alignclip.train import main
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["--config", "experiment/embedded_default"])
    assert code == 2 and err.getvalue().count("\\n") == 1, err.getvalue()
    assert "pip install 'alignclip[train]'" in err.getvalue(), err.getvalue()
    print("ok", sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED))
""")


def test_load_models_tokenizer_losses_metrics_without_the_training_stack(tmp_path):
    from alignclip.config import load_config
    from alignclip.export import save_exported
    from alignclip.models import build_model

    config = load_config("experiment/embedded_default", ["model.vision.layers=1", "model.text.layers=1"])
    exported = save_exported(build_model(config.model), config, tmp_path / "tiny.safetensors")
    code = CHILD.format(blocked=BLOCKED, exported=str(exported))
    env = {**os.environ, "PYTHONPATH": str(Path(alignclip.__file__).parent.parent)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "ok []"
