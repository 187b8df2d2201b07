"""Training every part from scratch: data (`data/`), exported parts (`exports.py`), the trainer loop
(`trainer.py` and its helpers), the stages (`stages/`) and recipes (`recipe.py`)."""
