"""Export a training checkpoint: safetensors (ours), an OpenCLIP local-dir folder, or a Hugging Face folder."""
from alignclip.commands.export import main

raise SystemExit(main())
