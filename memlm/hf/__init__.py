"""The Hugging Face bridge: export a run as a transformers model directory, and read one back.

    memlm export RUN --hf OUT                         # memlm.hf.export.export_run
    model = memlm.from_pretrained(OUT)                # a memlm LanguageModel again (memlm.hf.load)
    AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)   # modeling_memlm.MemlmForCausalLM

This package sits at the top of memlm's layers, beside the CLI. Only its remote-code modules
(configuration_memlm, modeling_memlm, tokenization_memlm: copied into every export) import
transformers; exporting and `from_pretrained` need none of it.
"""

from memlm.hf.export import export_run, save_pretrained
from memlm.hf.load import ExportError, from_pretrained

__all__ = ["ExportError", "export_run", "from_pretrained", "save_pretrained"]
