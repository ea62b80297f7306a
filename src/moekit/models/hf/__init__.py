"""HF checkpoints of MoE families into moekit's own model (and back).

    from_pretrained(folder) -> HFMoELM     safetensors only, see loader.py
    HFMoELM.save_pretrained(folder)        the HF layout transformers loads, see saver.py
Families: one file each in families/, registered in families.HF_FAMILIES.
"""

from moekit.models.hf.families import HF_FAMILIES, lm_config_from_hf
from moekit.models.hf.loader import from_pretrained
from moekit.models.hf.model import HFMoELM
from moekit.models.hf.saver import save_pretrained

__all__ = ["HF_FAMILIES", "HFMoELM", "from_pretrained", "lm_config_from_hf", "save_pretrained"]
