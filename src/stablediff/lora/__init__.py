"""LoRA files: read (kohya/A1111, LyCORIS LoHa and LoKr, diffusers/PEFT and its older format),
apply at run time without touching the base weights, fuse, and write in kohya's format.

Rooms, one concept each: ``formats.py`` (file grammars -> per-module entries), ``names.py`` (which
module of the model an entry means), ``adapters.py`` (LoRA / LoHa / LoKr as torch modules, shapes
checked first), ``network.py`` (one LoRA as a module of adapters, applied by forward hooks),
``load.py`` (file -> network, strictly), ``stack.py`` (several LoRAs on one model: scales, unload,
fuse), ``writer.py`` (kohya files out), ``hashes.py`` (A1111's LoRA hash), ``build.py`` (a new
network to train: its target modules and zero-effect initialisation). The pipeline uses
``LoraStack``; this package never imports the pipeline.
"""

from stablediff.lora.adapters import Adapter, LohaAdapter, LokrAdapter, LoraAdapter
from stablediff.lora.build import lora_targets, new_lora_network
from stablediff.lora.formats import LoraFileError
from stablediff.lora.hashes import addnet_hash, lora_hash
from stablediff.lora.names import ModuleTable
from stablediff.lora.network import LoraNetwork
from stablediff.lora.stack import LoraInfo, LoraStack
from stablediff.lora.writer import kohya_state_dict, save_lora_kohya

__all__ = [
    "Adapter",
    "LoraAdapter",
    "LohaAdapter",
    "LokrAdapter",
    "LoraFileError",
    "LoraInfo",
    "LoraNetwork",
    "LoraStack",
    "ModuleTable",
    "addnet_hash",
    "kohya_state_dict",
    "lora_hash",
    "lora_targets",
    "new_lora_network",
    "save_lora_kohya",
]
