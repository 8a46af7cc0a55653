"""Build any variant from its ModelConfig alone; print their sizes with ``python -m alignclip.models``."""

from __future__ import annotations

from ..config import CONFIG_DIR, ModelConfig, load_config
from ..errors import run_command
from .contrastive import ContrastiveModel, count_parameters
from .layers import ImageStem, TextStem, Trunk


# Checkpoints written before ``model.norm_eps`` existed (their saved config lacks the key, which
# config.from_yaml_text reads as None) used timm's 1e-6 inside the blocks and torch's 1e-5 in the stem and final norms.
LEGACY_BLOCK_EPS, LEGACY_OUTER_EPS = 1e-6, 1e-5


def norm_eps_of(cfg: ModelConfig) -> tuple[float, float]:
    """(eps inside the blocks, eps of the pre-norm and final norms) of a model config."""
    if cfg.norm_eps is None:
        return LEGACY_BLOCK_EPS, LEGACY_OUTER_EPS
    return cfg.norm_eps, cfg.norm_eps


def build_model(cfg: ModelConfig) -> ContrastiveModel:
    v, t = cfg.vision, cfg.text
    block_eps, outer_eps = norm_eps_of(cfg)
    image_stem = ImageStem(v.image_size, v.patch_size, v.width, eps=outer_eps, stem=v.stem,
                           stem_channels=v.stem_channels)
    text_stem = TextStem(t.vocab_size, t.context_length, t.width)
    image_trunk = Trunk(v.width, v.layers, v.heads, v.mlp_ratio, cfg.embed_dim, block_eps, outer_eps, cfg.act)
    if cfg.arch == "sharedclip":
        text_trunk = None  # the config validator has checked that both towers have the same shape
    elif cfg.arch == "clip":
        text_trunk = Trunk(t.width, t.layers, t.heads, t.mlp_ratio, cfg.embed_dim, block_eps, outer_eps, cfg.act)
    else:
        raise ValueError(f"model.arch must be 'clip' or 'sharedclip', got {cfg.arch!r}")
    model = ContrastiveModel(image_stem, text_stem, image_trunk, text_trunk, cfg.init_temperature,
                             cfg.max_logit_scale)
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    model.set_pooled_last_block(cfg.pooled_last_block)
    return model


def main(argv: list[str] | None = None) -> int:
    """Build each model config named (default: every file under configs/model) and print its size."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m alignclip.models",
                                     description="Build each model config and print its parameter count.")
    parser.add_argument("configs", nargs="*", help="model config files or names (default: every configs/model/*.yaml)")
    args = parser.parse_args(argv)
    paths = args.configs or sorted(str(p) for p in (CONFIG_DIR / "model").glob("*.yaml"))
    models = []
    code = run_command("python -m alignclip.models", lambda: models.extend(load_config(p).model for p in paths))
    if code:
        return code
    print(f"{'config':<28} {'arch':<11} {'parameters':>14}  {'token table':>12}")
    for path, cfg in zip(paths, models):
        model = build_model(cfg)
        table = model.text_stem.token_embed.weight.numel()
        name = path.rsplit("/", 1)[-1].removesuffix(".yaml")
        print(f"{name:<28} {cfg.arch:<11} {count_parameters(model):>14,}  {table:>12,}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
