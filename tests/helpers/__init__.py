"""Everything several test modules share: import it from here, never from another test module.

Shared *fixtures* live in ``tests/conftest.py``; shared *functions and constants* live in this
package (``tests/test_suite_hygiene.py`` keeps it that way):

* ``hf_oracle``: tiny transformers OPT models as the reference, and the same weights in optkit.
* ``tokenizer_files``: a tiny OPT-style byte-level BPE written to disk (no Hub access needed).
* ``models``: small optkit models and checkpoints that several modules build the same way.
* ``ranks``: spawning a distributed test's gloo ranks with a deadline (``spawn_ranks``).
* ``tiny_training``: the corpus, BPE and tiny specs the distributed training tests train on.
* ``threads``: one call in several threads at once (``results_of_threads``).
"""

from tests.helpers.hf_oracle import HF_CLASSES, VARIANTS, batch, hf_model, saved_pair
from tests.helpers.models import (
    EXAMPLES,
    OPEN_LLAMA_TINY,
    TEXT_MODEL_MAX_POSITIONS,
    base_hash,
    load_example_plugin,
    make_text_model_dir,
    tiny_open_llama,
)
from tests.helpers.tokenizer_files import SPECIAL_TOKENS, VOCAB_SIZE, build_tiny_bpe, train_tiny_bpe

__all__ = [
    "EXAMPLES",
    "HF_CLASSES",
    "OPEN_LLAMA_TINY",
    "SPECIAL_TOKENS",
    "TEXT_MODEL_MAX_POSITIONS",
    "VARIANTS",
    "VOCAB_SIZE",
    "base_hash",
    "batch",
    "build_tiny_bpe",
    "hf_model",
    "load_example_plugin",
    "make_text_model_dir",
    "saved_pair",
    "tiny_open_llama",
    "train_tiny_bpe",
]
