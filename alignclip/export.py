"""Export a training checkpoint, and load our own export back without DeepSpeed.

    export_checkpoint(run_dir | checkpoints dir | step dir, "model.safetensors")  # format safetensors
    export_checkpoint(run_dir, "oc", format="openclip")  # open_clip.create_model_and_transforms("local-dir:oc")
    export_checkpoint(run_dir, "hf", format="hf")        # transformers.CLIPModel.from_pretrained("hf")
    model, tokenizer, transform = alignclip.load("model.safetensors")

``safetensors``: one file of fp32 weights with, as safetensors metadata, the run's resolved config (YAML); a sidecar
``<file>.yaml`` repeats the config for people. ``openclip`` / ``hf``: a folder in that library's layout
(alignclip.models.convert maps the weights) with a model card README.md. ZeRO checkpoints are consolidated with
DeepSpeed's own ``zero_to_fp32`` (the fp32 master weights, whatever the training precision); a ZeRO-0
checkpoint's module states are read directly. Exporting reads the training checkpoint, which torch pickles: export
only checkpoints you wrote. Loading an exported file never unpickles anything.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from alignclip.checkpoints import CHECKPOINT_SUBDIR, CheckpointError, checkpoint_problem, newest_verified
from alignclip.config import Config, from_yaml_text, to_yaml
from alignclip.data.transforms import CLIP_MEAN, CLIP_STD

log = logging.getLogger(__name__)

FORMAT_VERSION = "1"
FORMATS = ("safetensors", "openclip", "hf")
META_CONFIG, META_FORMAT, META_SOURCE = "alignclip_config", "alignclip_format", "alignclip_source"
MODEL_STATES_FILE = "mp_rank_00_model_states.pt"
# What a model card says of an image stem other than CLIP's patch conv (alignclip.models.stems)
STEM_NOTES = {"hybrid": " embedded by the hybrid ViT's ResNet-v2 root (7x7 conv, GroupNorm, ReLU, max pool) and a "
                        "patch conv (Dosovitskiy et al. 2021, arXiv:2010.11929)",
              "conv": " embedded by 3x3 stride-2 convolutions with per-image GroupNorm (Xiao et al. 2021, "
                      "arXiv:2106.14881)"}
TIMM_TOWER_DIR = "timm_image_tower"  # an OpenCLIP folder's timm image tower (hybrid stem), a timm local-dir model


def resolve_checkpoint(path: str | Path) -> Path:
    """A step directory from a run directory, a checkpoints directory, or the step dir itself; verified against
    its manifest as a resume verifies it. A run directory gives its newest checkpoint that verifies (a damaged
    newer one is named in a warning); a step directory given itself must verify (``CheckpointError``, exit 2)."""
    p = Path(path)
    if (p / MODEL_STATES_FILE).is_file():
        problem = checkpoint_problem(p)
        if problem is not None:
            raise CheckpointError(f"checkpoint {p} does not verify: {problem}; give its run directory to take the "
                                  f"newest checkpoint that does")
        return p
    run_dir = p.parent if p.name == CHECKPOINT_SUBDIR else p
    return newest_verified(run_dir, warn=log.warning)


def run_config_of(step_dir: Path) -> Config:
    """The run's resolved config: <run_dir>/config.yaml, two levels above the step directory."""
    config_file = step_dir.parent.parent / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: the trainer writes the resolved config into the run "
                                f"directory; pass config= to export_checkpoint for a checkpoint moved elsewhere")
    return from_yaml_text(config_file.read_text())


def consolidated_state_dict(step_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 module weights of a DeepSpeed checkpoint directory (single file, no ZeRO partitions left)."""
    has_zero_partitions = any(step_dir.glob("*zero_pp_rank_*optim_states.pt"))
    if has_zero_partitions:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)
    else:  # ZeRO stage 0: the engine saved the whole module
        saved = torch.load(step_dir / MODEL_STATES_FILE, map_location="cpu", weights_only=False)
        state = saved["module"]
    return {k.removeprefix("module."): v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
            for k, v in state.items()}


def checkpoint_model(checkpoint: str | Path, config: Config | None = None) -> tuple[nn.Module, Config, Path]:
    """(model with the checkpoint's fp32 weights, its config, the step directory). Unpickles the checkpoint."""
    from alignclip.models import build_model

    step_dir = resolve_checkpoint(checkpoint)
    config = config or run_config_of(step_dir)
    model = build_model(config.model)
    missing, unexpected = model.load_state_dict(consolidated_state_dict(step_dir), strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {step_dir} does not match model config {config.model.arch}: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval(), config, step_dir


EXPORT_MARKERS = ("open_clip_config.json", "config.json")  # what makes a folder one of our OpenCLIP / HF exports


def check_output(out_path: str | Path, overwrite: bool) -> None:
    """Refuse an existing output unless ``overwrite``, and a folder that is not an OpenCLIP / HF export even then
    (it may hold the user's own files)."""
    out = Path(out_path)
    if not out.exists():
        return
    if not overwrite:
        raise FileExistsError(f"{out} exists: pass --force to replace it")
    if out.is_dir() and not any((out / marker).is_file() for marker in EXPORT_MARKERS):
        raise FileExistsError(f"{out} is a folder but not an OpenCLIP / HF export: remove it yourself")


def remove_output(out_path: str | Path) -> None:
    """An existing export (file and sidecar, or folder) gone, so that nothing stale is left beside the new one."""
    import shutil

    out = Path(out_path)
    if out.is_dir():
        shutil.rmtree(out)
    elif out.exists():
        out.unlink()
        Path(str(out) + ".yaml").unlink(missing_ok=True)


def export_checkpoint(checkpoint: str | Path, out_path: str | Path, config: Config | None = None,
                      format: str = "safetensors", allow_inexact: bool = False, overwrite: bool = True) -> Path:
    """Export the checkpoint as ``format`` (FORMATS) into ``out_path`` (a file for safetensors, else a folder).
    An existing output is replaced only with ``overwrite``, and only once the new export is known to work (the
    checkpoint read, the format able to hold the model)."""
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; expected one of {list(FORMATS)}")
    check_output(out_path, overwrite)
    model, config, step_dir = checkpoint_model(checkpoint, config)
    if format != "safetensors":
        _export_eps(config, allow_inexact, format)  # an ExportError here leaves the old output in place
    remove_output(out_path)
    if format == "safetensors":
        return save_exported(model, config, out_path, source=str(step_dir))
    card = ModelCard.of_run(config, step_dir)
    writer = save_openclip if format == "openclip" else save_hf
    return writer(model, config, out_path, card, allow_inexact=allow_inexact)


def save_exported(model: nn.Module, config: Config, out_path: str | Path, source: str = "") -> Path:
    """Write a model and its config as an export (safetensors + metadata, YAML sidecar)."""
    from safetensors.torch import save_model

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    yaml_text = to_yaml(config)
    save_model(model, str(out), metadata={META_CONFIG: yaml_text, META_FORMAT: FORMAT_VERSION, META_SOURCE: source})
    Path(str(out) + ".yaml").write_text(yaml_text)
    log.info("exported %s -> %s", source or "model", out)
    return out


def read_config(path: str | Path) -> Config:
    """The config stored in an exported file's metadata."""
    from safetensors import SafetensorError, safe_open

    if Path(path).is_dir():
        raise ValueError(f"{path} is a folder, not an exported .safetensors (alignclip.load also opens OpenCLIP and "
                         f"Hugging Face CLIP folders; alignclip.interop.open_model also run directories)")
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such exported model (expected a .safetensors written by alignclip-export)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except SafetensorError as err:
        raise ValueError(f"{path}: not a safetensors file ({err})") from None
    if META_CONFIG not in meta:
        raise ValueError(f"{path} has no {META_CONFIG!r} metadata: not a file written by alignclip.export")
    return from_yaml_text(meta[META_CONFIG])


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Config]:
    """The model of an exported file, in eval mode, and its config. Safetensors only: nothing is unpickled."""
    from safetensors.torch import load_model as load_weights

    from alignclip.models import build_model

    config = read_config(path)
    model = build_model(config.model)
    load_weights(model, str(path), strict=True, device=str(device))
    return model.to(device).eval(), config


# ------------------------------------------------------------------------------------- OpenCLIP and HF folders
class ModelCard:
    """The README.md of an OpenCLIP / HF export: architecture, loss recipe, data, steps, known figures."""

    def __init__(self, config: Config, step: int | None = None, source: str = "", figures: dict | None = None):
        self.config, self.step, self.source, self.figures = config, step, source, dict(figures or {})

    @classmethod
    def of_run(cls, config: Config, step_dir: Path) -> "ModelCard":
        """Steps from the step directory; figures from <run>/final_metrics.json if the trainer wrote one."""
        import json

        step = int(step_dir.name.rsplit("_", 1)[-1]) if step_dir.name.startswith("step_") else None
        metrics_file = step_dir.parent.parent / "final_metrics.json"
        figures = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        return cls(config, step, str(step_dir), figures)

    def render(self, library: str, loading: str, eps_note: str) -> str:
        m, loss = self.config.model, self.config.loss
        shared = m.arch == "sharedclip"
        kind = ("SharedCLIP" if loss.imsep_weight == 0 else "AlignCLIP") if shared else "CLIP"
        terms = {k: getattr(loss, k) for k in ("clip_weight", "crsep_weight", "imsep_weight", "uniform_weight",
                                                "xuniform_weight", "align_weight") if getattr(loss, k)}
        lines = [
            f"# {self.config.name} ({kind}, {library} format)", "",
            f"Exported by alignclip from `{self.source or 'a model'}`.", "",
            "## Load it", "", "```python", loading, "```", "",
            "## Architecture", "",
            f"- `{m.arch}`: image {m.vision.image_size} px in {m.vision.patch_size} px patches"
            f"{STEM_NOTES.get(m.vision.stem, '')}; vision width "
            f"{m.vision.width}, {m.vision.layers} layers, {m.vision.heads} heads; text width {m.text.width}, "
            f"{m.text.layers} layers, {m.text.heads} heads, context {m.text.context_length}; embedding "
            f"{m.embed_dim}; {'QuickGELU' if m.act == 'quick_gelu' else 'exact GELU (not QuickGELU)'}; {eps_note}.",
        ]
        if shared:
            lines.append("- SharedCLIP / AlignCLIP share one transformer, final LayerNorm and projection between "
                         "the modalities (Eslami & de Melo, ICLR 2025, arXiv 2406.17639). This format has two "
                         "towers, so the shared trunk is written into both: the two towers hold identical "
                         "weights (the stems differ: patches and class token vs token and position embeddings).")
        lines += ["", "## Training", "",
                  f"- loss recipe: {', '.join(f'{k} {v:g}' for k, v in terms.items()) or 'none recorded'}"
                  + (f" (IMSep sides: {loss.imsep_sides}, rescaled: {loss.imsep_rescale})"
                     if loss.imsep_weight else ""),
                  f"- data: `{self.config.data.train or 'unknown'}`",
                  f"- steps: {self.step if self.step is not None else 'unknown'} (global batch "
                  f"{self.config.train.global_batch_size}, lr {self.config.optim.lr:g})"]
        if self.figures:
            lines += ["", "## Figures at the end of training", "", "| figure | value |", "|---|---|"]
            lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
                      for k, v in sorted(self.figures.items())]
        else:
            lines += ["", "Final gap and zero-shot figures: not recorded with this checkpoint "
                          "(see alignclip's gap_analysis and evaluate tools)."]
        return "\n".join(lines) + "\n"


def _export_eps(config: Config, allow_inexact: bool, library: str) -> tuple[float, str]:
    from alignclip.models.convert import ExportError, check_exportable, exact_norm_eps

    check_exportable(config.model, library)
    try:
        eps = exact_norm_eps(config.model)
        return eps, f"LayerNorm eps {eps:g} everywhere"
    except ExportError:
        if not allow_inexact:
            raise
        log.warning("exporting a model with mixed LayerNorm eps as eps 1e-5: embeddings differ by ~1e-3")
        return 1e-5, ("LayerNorm eps 1e-5 here, but the model was trained with 1e-6 inside its blocks: "
                      "embeddings differ from the original by ~1e-3")


def save_openclip(model: nn.Module, config: Config, out_dir: str | Path, card: ModelCard | None = None,
                  allow_inexact: bool = False) -> Path:
    """A ``local-dir:`` folder for OpenCLIP: open_clip_config.json + open_clip_model.safetensors + README.md. With
    the hybrid stem the image tower is OpenCLIP's timm tower, built from ``timm_image_tower/config.json`` (timm's
    ``local-dir:`` model, named by its absolute path: export again after moving the folder)."""
    import json

    from safetensors.torch import save_file

    from alignclip.models.convert import openclip_config, timm_config, to_openclip

    eps, eps_note = _export_eps(config, allow_inexact, "openclip")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timm_tower = ""
    if config.model.vision.stem == "hybrid":
        tower = out / TIMM_TOWER_DIR
        tower.mkdir(exist_ok=True)
        (tower / "config.json").write_text(json.dumps(timm_config(config.model, CLIP_MEAN, CLIP_STD), indent=2)
                                           + "\n")
        timm_tower = str(tower.resolve())
    state = to_openclip(model.state_dict(), config.model)
    save_file({k: v.float() for k, v in state.items()}, str(out / "open_clip_model.safetensors"),
              metadata={"format": "pt"})
    preprocess = {"image_size": config.model.vision.image_size, "mean": list(CLIP_MEAN), "std": list(CLIP_STD),
                  "interpolation": "bicubic", "resize_mode": "shortest"}
    (out / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": openclip_config(config.model, eps, timm_tower), "preprocess_cfg": preprocess}, indent=2) + "\n")
    loading = (f'import open_clip\nmodel, _, preprocess = open_clip.create_model_and_transforms("local-dir:{out}")'
               f'\ntokenizer = open_clip.get_tokenizer("local-dir:{out}")')
    if timm_tower:
        loading += (f"\n# the image tower is timm's hybrid ViT, configured in {timm_tower}/config.json (named by "
                    f"that absolute path in open_clip_config.json: edit timm_model_name after moving the folder)")
    (out / "README.md").write_text((card or ModelCard(config)).render("OpenCLIP", loading, eps_note))
    log.info("exported OpenCLIP folder %s", out)
    return out


def save_hf(model: nn.Module, config: Config, out_dir: str | Path, card: ModelCard | None = None,
            allow_inexact: bool = False) -> Path:
    """A folder for ``transformers.CLIPModel`` / ``CLIPProcessor.from_pretrained``: config.json,
    model.safetensors, preprocessor and tokenizer files, README.md."""
    import json

    import shutil

    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from alignclip.models.convert import HF_REMOTE_CLASS, hf_config_kwargs, to_hf
    from alignclip.tokenizer import get_tokenizer

    eps, eps_note = _export_eps(config, allow_inexact, "hf")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_config = CLIPConfig(**hf_config_kwargs(config.model, eps))
    remote = config.model.vision.stem != "patch"
    if remote:  # our stem in CLIP's place: transformers runs the modeling file shipped in the folder
        import alignclip.models.hf_remote as hf_remote
        import alignclip.models.stems as stems

        hf_config.auto_map = {"AutoModel": HF_REMOTE_CLASS, "AutoModelForZeroShotImageClassification": HF_REMOTE_CLASS}
        hf_model = hf_remote.AlignCLIPModel(hf_config)
    else:
        hf_model = CLIPModel(hf_config)
    hf_model.load_state_dict(to_hf(model.state_dict(), config.model), strict=True)
    hf_model.save_pretrained(str(out))
    if remote:
        shutil.copyfile(hf_remote.__file__, out / "modeling_alignclip.py")
        shutil.copyfile(stems.__file__, out / "stems.py")
    ours = get_tokenizer(config.model.text.context_length)
    vocab, merges = ours.vocab_and_merges()
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tokenizer = CLIPTokenizer(vocab=str(out / "vocab.json"), merges=str(out / "merges.txt"),
                              model_max_length=config.model.text.context_length)
    size = config.model.vision.image_size
    images = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(str(out))
    images.save_pretrained(str(out))  # preprocessor_config.json: what AutoImageProcessor (and transformers 4) read
    if remote:
        loading = (f'from transformers import AutoModel, CLIPProcessor\n# its image stem is not CLIP\'s patch conv: '
                   f'modeling_alignclip.py (in this folder) builds it\nmodel = AutoModel.from_pretrained("{out}", '
                   f'trust_remote_code=True)\nprocessor = CLIPProcessor.from_pretrained("{out}")')
    else:
        loading = (f'from transformers import CLIPModel, CLIPProcessor\nmodel = CLIPModel.from_pretrained("{out}")\n'
                   f'processor = CLIPProcessor.from_pretrained("{out}")')
    (out / "README.md").write_text((card or ModelCard(config)).render("Hugging Face transformers", loading, eps_note))
    log.info("exported Hugging Face folder %s", out)
    return out
