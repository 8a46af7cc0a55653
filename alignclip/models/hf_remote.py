"""transformers' CLIPModel with one of our image stems: the ``modeling_alignclip.py`` of a Hugging Face export.

alignclip.export copies this file and ``stems.py`` into every HF folder of a model whose image stem is not CLIP's
patch conv, and names ``AlignCLIPModel`` in config.json's ``auto_map``, so that

    AutoModel.from_pretrained(folder, trust_remote_code=True)

builds it (transformers' own way to load an architecture it does not ship). Its ``vision_config`` says which stem:
``alignclip_stem`` (conv | hybrid) and, for conv, ``alignclip_stem_channels``. Everything else, the processor and
the tokenizer included, is CLIP's. Imports transformers and torch only (and stems.py beside it).
"""

from transformers import CLIPModel

from .stems import build_stem


class AlignCLIPModel(CLIPModel):
    def __init__(self, config):
        super().__init__(config)
        v = config.vision_config
        self.vision_model.embeddings.patch_embedding = build_stem(
            v.alignclip_stem, v.patch_size, v.hidden_size, getattr(v, "alignclip_stem_channels", None))
